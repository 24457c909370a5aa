"""Two-time students of diffusers models: the teacher architecture plus a second time embedding.

A flow-map student ``u(x, t, s)`` (DESIGN.md §1: ``X(x, t, s) = x + (s − t)·u(x, t, s)``,
``u(x, t, t) = v(x, t)``) needs the target time ``s`` as an input; a diffusers transformer or UNet
embeds one time. :func:`add_second_time` gives it a second one, the way our reference nets do
(:mod:`flowdistill.models.embeddings`): the model's conditioning vector becomes

    c(t, s) = c_teacher(t, …) + MLP₂(proj(scale·(t − s))),

where ``c_teacher`` is the model's own time (+ pooled text / guidance) embedding, ``proj`` is a copy
of the model's own sinusoidal timestep projection (diffusers ``Timesteps``, same channels, flip and
shift) and ``MLP₂`` is a diffusers ``TimestepEmbedding`` (``Linear → SiLU → Linear``) whose **last
layer is zero-initialised**. At step 0 the added term is exactly ``0``, so
``u(x, t, s) = v(x, t)`` bit for bit for every ``s`` (in particular ``u(x, t, t) = v(x, t)``),
in float32 and bf16 alike. ``scale`` is ``delta_time_scale``, **5 by default**
(``DEFAULT_DELTA_TIME_SCALE``): ``u`` then varies smoothly with ``s``, which FreeFlow's prediction
target needs (it contains ``∂_s u``, by finite difference or JVP). Measured on the tiny SD3 model
(LoRA r4 student, FreeFlow prediction with the finite-difference ``∂_s u``, 12 Adam steps on a fixed
batch of 8, lr 1e-3): with scale 5 the prediction MSE fell 0.0057 → 0.0035; with 1000 (the range
of the teachers' own timesteps: SD3/Flux embed ``1000·σ``) it rose 0.0057 → 0.028 — the
self-reinforcing high-frequency target that ``flowdistill.distillers.freeflow`` describes for
``1000·(t − s)`` features. The scale is stored with the weights.

Where the term is added (the least invasive place: the model's call, its state-dict keys and its
LoRA export stay unchanged):

- ``SD3Transformer2DModel`` / ``FluxTransformer2DModel``: the output of ``time_text_embed`` (the
  ``temb`` every block's AdaLN and the final norm read);
- ``UNet2DConditionModel`` / ``UNet2DModel``: the output of ``time_embedding`` (before class /
  added embeddings are summed in).

A forward hook on that sub-module adds ``MLP₂(…)``; the new weights live in the model as the
child ``flowdistill_second_time`` (so ``.to()``, ``.parameters()``, DDP/FSDP and ``deepcopy`` carry
them) and ``t − s`` is set per call through :meth:`SecondTimeEmbedding.delta` (a context). A call
made without one (the adapter alone, the pipeline's own call) means ``s = t``: ``u(x, t, t)``.
With CFG's doubled batch (``[x; x]``) a ``[B]`` delta is repeated to ``[2B]``.

Use::

    student = add_second_time(transformer)             # or add_second_time(adapter)
    u = student(x, t, s, cond=TextCondition(pe, pooled))   # forward(x, t, s, cond), our convention

``student`` is a :class:`TwoTimeStudent` around the teacher adapter
(:func:`~flowdistill.integrations.diffusers.adapters.adapt_teacher`; adapter keywords such as a
UNet's ``scheduler_config`` pass through). **LoRA**: call :func:`~.lora.add_lora` *first* (peft
freezes every non-LoRA weight when it injects the adapter) and then :func:`add_second_time`, which
leaves the new embedding trainable; :func:`second_time_parameters` lists it. The extra weights
save and load as safetensors (:func:`save_second_time`, :func:`load_second_time`: file
``second_time.safetensors`` with its settings in the metadata).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flowdistill.integrations.diffusers.adapters import adapt_teacher

ATTR = "flowdistill_second_time"
WEIGHT_NAME = "second_time.safetensors"
DEFAULT_DELTA_TIME_SCALE = 5.0  # features of 5·(t − s): smooth in s (module docstring)
FORMAT = "flowdistill-second-time-v1"

# class name -> the sub-module whose output is the model's time (conditioning) embedding
_HOOKED = {
    "SD3Transformer2DModel": "time_text_embed",
    "FluxTransformer2DModel": "time_text_embed",
    "UNet2DConditionModel": "time_embedding",
    "UNet2DModel": "time_embedding",
}


def _unwrap(model: nn.Module) -> nn.Module:
    """The diffusers model inside a :class:`TwoTimeStudent`, a teacher adapter or a segment student."""
    for _ in range(4):
        if type(model).__name__ in _HOOKED:
            return model
        inner = None
        for name in ("adapter", "net", "model"):
            cand = getattr(model, name, None)
            if isinstance(cand, nn.Module):
                inner = cand
                break
        if inner is None:
            break
        model = inner
    if type(model).__name__ not in _HOOKED:
        raise ValueError(f"no second time embedding for {type(model).__name__}; supported diffusers classes: "
                         f"{', '.join(sorted(_HOOKED))}")
    return model


def _projection_of(model: nn.Module) -> tuple[nn.Module, int]:
    """The model's own sinusoidal timestep projection and the width of its time embedding."""
    from diffusers.models.embeddings import Timesteps

    name = type(model).__name__
    if _HOOKED[name] == "time_text_embed":
        proj = model.time_text_embed.time_proj
        dim = model.time_text_embed.timestep_embedder.linear_2.out_features
    else:
        proj = model.time_proj
        dim = model.time_embedding.linear_2.out_features
    if not isinstance(proj, Timesteps):
        raise ValueError(f"{name} uses a {type(proj).__name__} time projection; a second time embedding "
                         f"needs the sinusoidal one (time_embedding_type='positional')")
    return proj, int(dim)


class SecondTimeEmbedding(nn.Module):
    """``e₂(r) = MLP₂(proj(scale·r))`` with ``r = t − s`` (module docstring); zero at initialisation.

    ``proj`` is a diffusers ``Timesteps`` with the teacher's settings (features in float32),
    ``mlp`` a ``TimestepEmbedding(channels → dim)`` whose ``linear_2`` starts at zero.
    """

    def __init__(self, channels: int, dim: int, flip_sin_to_cos: bool = True,
                 downscale_freq_shift: float = 0.0, proj_scale: float = 1.0,
                 delta_time_scale: float = DEFAULT_DELTA_TIME_SCALE):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        if not delta_time_scale > 0:
            raise ValueError(f"delta_time_scale must be positive, got {delta_time_scale}")
        self.settings = {"channels": int(channels), "dim": int(dim), "flip_sin_to_cos": bool(flip_sin_to_cos),
                         "downscale_freq_shift": float(downscale_freq_shift), "proj_scale": float(proj_scale),
                         "delta_time_scale": float(delta_time_scale)}
        self.proj = Timesteps(int(channels), bool(flip_sin_to_cos), float(downscale_freq_shift),
                              scale=proj_scale)
        self.mlp = TimestepEmbedding(int(channels), int(dim))
        nn.init.zeros_(self.mlp.linear_2.weight)
        nn.init.zeros_(self.mlp.linear_2.bias)
        self._delta: Tensor | None = None

    @contextmanager
    def delta(self, r: Tensor | None) -> Iterator[None]:
        """Within the block, the hooked model embeds ``r = t − s`` (``[B]``; ``None``: ``s = t``)."""
        prev, self._delta = self._delta, r
        try:
            yield
        finally:
            self._delta = prev

    def forward(self, r: Tensor) -> Tensor:
        """``[B] → [B, dim]``: ``MLP₂(proj(scale·r))`` (sinusoid in float32, MLP in its own dtype)."""
        feats = self.proj(r.float() * self.settings["delta_time_scale"])
        return self.mlp(feats.to(self.mlp.linear_1.weight.dtype))

    def _hook(self, module: nn.Module, args: Any, output: Tensor) -> Tensor:
        """Forward hook on the teacher's time embedding: ``output + e₂(r)`` (``r`` broadcast to its batch)."""
        n = output.shape[0]
        r = self._delta
        if r is None:
            r = torch.zeros(n, device=output.device)
        r = r.to(output.device).reshape(-1)
        if r.shape[0] != n:
            if r.shape[0] == 0 or n % r.shape[0]:
                raise ValueError(f"second time: t − s has batch {r.shape[0]}, the model's time embedding {n}")
            r = r.repeat(n // r.shape[0])  # CFG's [x; x] doubling
        return output + self(r).to(output.dtype)


def second_time_embedding(model: nn.Module) -> SecondTimeEmbedding | None:
    """The installed :class:`SecondTimeEmbedding` of ``model`` (or of the model inside it), else ``None``."""
    emb = getattr(_unwrap(model), ATTR, None)
    return emb if isinstance(emb, SecondTimeEmbedding) else None


def install_second_time(model: nn.Module, delta_time_scale: float = DEFAULT_DELTA_TIME_SCALE,
                        trainable: bool = True) -> SecondTimeEmbedding:
    """Add the zero-initialised second time embedding to a diffusers ``model`` in place (idempotent:
    an installed one is returned as it is). Its weights take the model's device and dtype and are
    left trainable unless ``trainable=False``; the rest of the model is untouched."""
    model = _unwrap(model)
    existing = second_time_embedding(model)
    if existing is not None:
        if existing.settings["delta_time_scale"] != float(delta_time_scale):
            have = existing.settings["delta_time_scale"]
            raise ValueError(f"{type(model).__name__} already has a second time embedding with "
                             f"delta_time_scale={have}, not {delta_time_scale}")
        return existing
    proj, dim = _projection_of(model)
    ref = next(model.parameters())
    emb = SecondTimeEmbedding(proj.num_channels, dim, proj.flip_sin_to_cos, proj.downscale_freq_shift,
                              proj.scale, delta_time_scale).to(device=ref.device, dtype=ref.dtype)
    emb.requires_grad_(trainable)
    model.add_module(ATTR, emb)
    model.get_submodule(_HOOKED[type(model).__name__]).register_forward_hook(emb._hook)
    return emb


def second_time_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model``'s second time embedding (empty if none is installed)."""
    emb = second_time_embedding(model)
    return [] if emb is None else list(emb.parameters())


class TwoTimeStudent(nn.Module):
    """``u(x, t, s, cond)``: a teacher adapter whose model carries a second time embedding.

    ``forward(x [B, …], t [B], s [B] | None, cond)`` runs ``adapter(x, t, cond=cond)`` with
    ``r = t − s`` set on the embedding (``s=None`` means ``s = t``), so the output is
    ``v(x, t)`` of the teacher architecture conditioned on the extra ``e₂(t − s)``: a flow-map
    student in our convention (``X = x + (s − t)·u``), identical to the teacher at step 0.
    """

    def __init__(self, adapter: nn.Module):
        super().__init__()
        self.adapter = adapter
        if second_time_embedding(adapter) is None:
            raise ValueError("the adapter's model has no second time embedding: "
                             "build the student with add_second_time")

    @property
    def model(self) -> nn.Module:
        """The diffusers model (for LoRA export and ``enable_gradient_checkpointing``)."""
        return _unwrap(self.adapter)

    @property
    def embedding(self) -> SecondTimeEmbedding:
        """The installed :class:`SecondTimeEmbedding`."""
        return second_time_embedding(self.adapter)

    def forward(self, x: Tensor, t: Tensor, s: Tensor | None = None, cond: Any = None) -> Tensor:
        """Average velocity ``u(x, t, s)`` (module docstring)."""
        if s is not None and s.shape != t.shape:
            raise ValueError(f"s must have the shape of t {list(t.shape)}, got {list(s.shape)}")
        r = None if s is None else t - s.to(t.dtype)
        with self.embedding.delta(r):
            return self.adapter(x, t, cond=cond)


def add_second_time(model: nn.Module, delta_time_scale: float = DEFAULT_DELTA_TIME_SCALE,
                    trainable: bool = True, **adapter_kw: Any) -> TwoTimeStudent:
    """A two-time student ``u(x, t, s, cond)`` of a diffusers model (module docstring).

    ``model``: an ``SD3Transformer2DModel``, ``FluxTransformer2DModel``, ``UNet2DConditionModel`` or
    ``UNet2DModel`` (wrapped with :func:`adapt_teacher` and ``adapter_kw``, e.g. a UNet's
    ``scheduler_config``), or an existing teacher adapter around one. The model is changed in
    place (:func:`install_second_time`); call :func:`~.lora.add_lora` on it before this.
    """
    if type(model).__name__ in _HOOKED:
        adapter = adapt_teacher(model, **adapter_kw)
    else:
        if adapter_kw:
            raise ValueError(f"adapter keywords {sorted(adapter_kw)} apply only when add_second_time builds "
                             f"the adapter (pass the diffusers model itself)")
        adapter = model
    install_second_time(_unwrap(adapter), delta_time_scale, trainable)
    return TwoTimeStudent(adapter)


def save_second_time(model: nn.Module, out_dir: str | Path, weight_name: str = WEIGHT_NAME) -> Path:
    """Write the second time embedding of ``model`` (or of the model inside a student / adapter) to
    ``out_dir/second_time.safetensors``; its settings and the model class go in the metadata."""
    from safetensors.torch import save_file

    base = _unwrap(model)
    emb = second_time_embedding(base)
    if emb is None:
        raise ValueError(f"{type(base).__name__} has no second time embedding to save")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "model_class": type(base).__name__, "settings": json.dumps(emb.settings)}
    state = {k: v.detach().contiguous().cpu() for k, v in emb.state_dict().items()}
    save_file(state, str(out / weight_name), metadata=meta)
    return out / weight_name


def load_second_time(model: nn.Module, path: str | Path, weight_name: str = WEIGHT_NAME,
                     trainable: bool = True) -> SecondTimeEmbedding:
    """Load ``path`` (a directory holding ``second_time.safetensors``, or the file) into ``model``,
    installing the embedding first when it has none. Weights take the model's device and dtype."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = Path(path)
    f = p / weight_name if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"no second time weights at {f}")
    with safe_open(str(f), framework="pt") as h:
        meta = h.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{f} is not a flowdistill second time embedding "
                         f"(metadata format {meta.get('format')!r})")
    base = _unwrap(model)
    if meta.get("model_class") != type(base).__name__:
        raise ValueError(f"{f} was saved from a {meta.get('model_class')}, not a {type(base).__name__}")
    settings = json.loads(meta["settings"])
    emb = install_second_time(base, settings["delta_time_scale"], trainable)
    if {k: emb.settings[k] for k in settings} != settings:
        raise ValueError(f"{f}: settings {settings} do not match the model's embedding {emb.settings}")
    ref = emb.mlp.linear_1.weight
    emb.load_state_dict({k: v.to(ref.device, ref.dtype) for k, v in load_file(str(f)).items()})
    return emb
