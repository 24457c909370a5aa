"""Pipeline-native rendering of a distilled diffusers student: the user's own pipeline class, the
run's LoRA weights loaded with ``pipe.load_lora_weights`` (or a full student's denoiser), the
student's scheduler swapped in (``FlowDistillScheduler``; for DDPM-UNet pipelines
:class:`~.vp_scheduler.FlowDistillVPScheduler`), a two-time student's second time embedding driven
by the scheduler (:func:`follow_scheduler_time`), VAE decode, PNGs and a labelled grid (rows =
prompts, columns = NFE).

Noise: one draw ``ε ~ N(0, I)`` of the *unpacked* latent shape ``[P·m, C, h, w]`` (``P`` prompts,
``m`` images each) from ``torch.Generator().manual_seed(seed)``, reused at every NFE, so the columns
of the grid differ only by the number of steps. It is handed to the pipeline as ``latents=`` (packed
into 2×2 patches for Flux, :func:`~flowdistill.integrations.diffusers.adapters.pack_latents`), so
the pipeline's first state is ``x_1 = ε`` exactly as the run's own sampler starts (the same draw as
``load_run(RUN).sample(n, nfe, seed)``).

Each pipeline step is then ``x_s = x_t + (s − t)·u`` (the scheduler's step) with ``u`` the
student's output at the scheduler's level ``t`` (and target ``s`` for two-time students) — the same
update the run's own Euler / jump sampler takes on the same grid, so ``output_type="latent"`` equals
the run's latents to float tolerance (tests/test_pipeline_render.py, tests/test_pipeline_cli.py).

Guidance: a student distilled from a guided teacher samples without CFG (:func:`run_guidance`:
``guidance_scale=1``; a guidance-distilled Flux gets the run's ``guidance.scale`` as its embedded
guidance). :func:`guidance_kwargs` maps a CFG scale ``w`` with the empty negative prompt to each
pipeline's own arguments — ``guidance_scale=w`` for SD3 / SD (``w ≤ 1``: off), ``true_cfg_scale=w``
with ``negative_prompt=""`` for Flux, whose ``guidance_scale`` is the distilled-guidance embedding.

What differs per pipeline class (kind, denoiser, default size, latent layout, guidance arguments)
lives in :mod:`.pipeline_kinds` (re-exported here).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flowdistill.errors import ConfigError
from flowdistill.integrations.diffusers.pipeline_kinds import (  # noqa: F401  (re-exported)
    PIPELINE_KINDS,
    default_size,
    denoiser,
    from_pipeline_latents,
    guidance_kwargs,
    latent_shape,
    pipeline_kind,
    to_pipeline_latents,
)
from flowdistill.integrations.student_dir import (  # noqa: F401  (STUDENT_FORMAT re-exported)
    STUDENT_FORMAT,
    read_student_meta,
    student_dir_of,
)


def draw_noise(shape: Sequence[int], n: int, seed: int) -> Tensor:
    """``n`` seeded draws ``ε ~ N(0, I)`` of ``shape`` (float32, CPU): the shared starting noise."""
    return torch.randn(int(n), *shape, generator=torch.Generator().manual_seed(int(seed)))


LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
SECOND_TIME_WEIGHTS = "second_time.safetensors"


def scheduler_for(pipe: Any, keys: Mapping[str, Any]) -> Any:
    """The student's scheduler for ``pipe``: ``FlowDistillScheduler(**keys)`` for flow pipelines; for a
    DDPM-UNet pipeline :class:`~.vp_scheduler.FlowDistillVPScheduler` with the pipeline's own beta
    schedule and prediction type plus ``keys``."""
    import inspect

    from flowdistill.integrations.diffusers.scheduler import FlowDistillScheduler

    keys = {k: v for k, v in dict(keys).items() if not k.startswith("_")}
    if pipeline_kind(pipe) != "sd":
        return FlowDistillScheduler(**keys)
    from flowdistill.integrations.diffusers.vp_scheduler import FlowDistillVPScheduler

    if type(pipe.scheduler).__name__ == "FlowDistillVPScheduler":
        return FlowDistillVPScheduler.from_config({**dict(pipe.scheduler.config), **keys})
    take = set(inspect.signature(FlowDistillVPScheduler.__init__).parameters) - {"self"}
    base = {k: v for k, v in dict(pipe.scheduler.config).items() if k in take}
    return FlowDistillVPScheduler(**{**base, **{k: v for k, v in keys.items() if k in take}})


def swap_scheduler(pipe: Any, scheduler_config: Mapping[str, Any] | str | Path) -> Any:
    """Swap the student's scheduler in (:func:`scheduler_for`), from a config mapping or a directory /
    ``scheduler_config.json`` file; returns ``pipe``."""
    from flowdistill.integrations.diffusers.scheduler import FlowDistillScheduler

    if isinstance(scheduler_config, (str, Path)):
        p = Path(scheduler_config)
        cfg = dict(FlowDistillScheduler.load_config(str(p.parent if p.is_file() else p)))
    else:
        cfg = dict(scheduler_config)
    pipe.scheduler = scheduler_for(pipe, cfg)
    return pipe


def follow_scheduler_time(pipe: Any) -> None:
    """Give a two-time denoiser (:mod:`.two_time`) its target time inside the pipeline's own loop: a
    forward pre-hook sets ``r = t − s'`` from ``pipe.scheduler.sigma_pair()`` (the current level and
    the jump's target) around every denoiser call, so each scheduler step ``x + (s' − t)·u`` uses
    ``u(x, t, s')``, the run's flow-map jump. Idempotent."""
    from flowdistill.integrations.diffusers.two_time import second_time_embedding

    net = denoiser(pipe)
    if getattr(net, "_flowdistill_follows_scheduler", False):
        return
    emb = second_time_embedding(net)
    if emb is None:
        raise ValueError(f"{type(net).__name__} has no second time embedding to follow the scheduler with")
    active: list[Any] = []

    def enter(module, args, kwargs):
        """Set ``r = t − s'`` of the scheduler's current step for this call."""
        t, s = pipe.scheduler.sigma_pair()
        ctx = emb.delta((t - s).reshape(1).to(torch.float32))
        ctx.__enter__()
        active.append(ctx)

    def leave(module, args, kwargs, output):
        """Restore the embedding's previous ``r``."""
        if active:
            active.pop().__exit__(None, None, None)

    net.register_forward_pre_hook(enter, with_kwargs=True)
    net.register_forward_hook(leave, with_kwargs=True)
    net._flowdistill_follows_scheduler = True


def apply_student(pipe: Any, student_dir: str | Path) -> Any:
    """Turn the teacher pipeline into the student's: the LoRA weights (``pipe.load_lora_weights``) or
    the full denoiser saved under ``transformer/`` / ``unet/``, a two-time student's second time
    embedding (installed and driven by the scheduler, :func:`follow_scheduler_time`), and the
    student's scheduler (``scheduler_config.json``, :func:`swap_scheduler`). Returns ``pipe``."""
    d = Path(student_dir)
    net = denoiser(pipe)
    if (d / LORA_WEIGHTS).is_file():
        pipe.load_lora_weights(str(d), weight_name=LORA_WEIGHTS)
    else:
        sub = next((s for s in ("transformer", "unet") if (d / s).is_dir()), None)
        if sub is None:
            raise ConfigError(f"{d}: neither {LORA_WEIGHTS} nor a transformer/ or unet/ directory")
        full = type(net).from_pretrained(str(d / sub), dtype=net.dtype, local_files_only=True)
        pipe.register_modules(**{sub: full.to(net.device).eval()})
    if (d / SECOND_TIME_WEIGHTS).is_file():
        from flowdistill.integrations.diffusers.two_time import load_second_time

        load_second_time(denoiser(pipe), d, trainable=False)
        follow_scheduler_time(pipe)
    swap_scheduler(pipe, d)
    return pipe


def load_student_pipeline(pipeline_dir: str | Path, student_dir: str | Path | None, *,
                          dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                          scheduler_config: Mapping[str, Any] | None = None) -> Any:
    """The original pipeline class loaded from ``pipeline_dir`` (local files only) with the student of
    ``student_dir`` applied (:func:`apply_student`; ``None``: the teacher with only the scheduler
    swapped, from ``scheduler_config``)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(pipeline_dir), dtype=dtype, local_files_only=True)
    pipeline_kind(pipe)  # a class we cannot sample natively: one clear error before anything else
    if student_dir is not None:
        apply_student(pipe, student_dir)
    elif scheduler_config is not None:
        swap_scheduler(pipe, scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_run_pipeline(run_dir: str | Path, device: str | torch.device = "cpu",
                      dtype: str | torch.dtype | None = None) -> Any:
    """The pipeline a pipeline run (or an export of one) samples with: the teacher pipeline its
    ``flowdistill.json`` names (``pipeline``), in the run's ``teacher.dtype`` unless ``dtype``, with the
    student applied. ConfigError when ``run_dir`` holds no pipeline student."""
    d = student_dir_of(run_dir)
    if d is None:
        raise ConfigError(f"{run_dir} is not a diffusers pipeline run (no student/flowdistill.json of "
                          f"format {STUDENT_FORMAT})")
    meta = read_student_meta(d)
    root = meta.get("pipeline")
    if not root:
        raise ConfigError(f"{d}/flowdistill.json names no teacher pipeline ('pipeline')")
    if not Path(root).is_dir():
        raise ConfigError(f"the teacher pipeline {root} of {run_dir} is not a directory here (it was "
                          f"distilled from it; the student needs it)")
    if dtype is None:
        cfg = run_config(d)
        dtype = meta.get("dtype") or (str(getattr(cfg.teacher, "dtype", "float32")) if cfg is not None
                                       and not isinstance(cfg.teacher, str) else "float32")
    if isinstance(dtype, str):
        dtype = _DTYPES[dtype]
    return load_student_pipeline(root, d, dtype=dtype, device=device)


def run_config(student_dir: str | Path) -> Any | None:
    """The job config of the run a student directory belongs to (``RUN/config.yaml``), else ``None``
    (an export carries what it needs in its ``flowdistill.json``)."""
    f = Path(student_dir).parent / "config.yaml"
    if not f.is_file() or Path(student_dir).name != "student":
        return None
    from flowdistill.config import load_config

    return load_config(f)


def run_guidance(pipe: Any, student_dir: str | Path) -> dict[str, Any]:
    """The pipeline keyword arguments the student samples with: no CFG (a student distilled from a
    guided teacher has the guidance built in; its own sampler calls it once per step), and for a
    guidance-distilled Flux the embedded guidance the run trained with (``guidance.scale``).
    An export records them in its ``flowdistill.json`` (``pipeline_kwargs``)."""
    meta = read_student_meta(student_dir)
    if "pipeline_kwargs" in meta:
        return dict(meta["pipeline_kwargs"])
    flux_guidance = None
    if pipeline_kind(pipe) == "flux" and getattr(pipe.transformer.config, "guidance_embeds", False):
        cfg = run_config(student_dir)
        flux_guidance = float(cfg.guidance.scale) if cfg is not None else 3.5
    return guidance_kwargs(pipe, 1.0, flux_guidance)


def run_image_size(pipe: Any, student_dir: str | Path) -> tuple[int, int]:
    """``(height, width)`` in pixels the run trained at (its ``latent_shape`` × the VAE factor), else
    the pipeline's default size."""
    shape = read_student_meta(student_dir).get("latent_shape")
    if not shape:
        return default_size(pipe)
    f = int(pipe.vae_scale_factor)
    return int(shape[1]) * f, int(shape[2]) * f


def to_pil(img: Tensor) -> Any:
    """One image ``[C, H, W]`` in [-1, 1] as a PIL RGB image."""
    from PIL import Image

    from flowdistill.eval.image_io import to_uint8

    x = to_uint8(img.detach().float().clamp(-1, 1)[None])[0]
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return Image.fromarray(x.permute(1, 2, 0).contiguous().numpy())


@torch.no_grad()
def generate(pipe: Any, nfe: int, noise: Tensor, *, prompts: Sequence[str] | None = None,
             embeds: Mapping[str, Tensor] | None = None, output_type: str = "latent",
             guidance: Mapping[str, Any] | None = None, height: int | None = None,
             width: int | None = None, **pipe_kwargs: Any) -> Any:
    """One pipeline call at ``nfe`` steps from ``noise [B, C, h, w]``.

    The condition is ``prompts`` (B strings, encoded by the pipeline) or ``embeds`` (the cache's
    ``prompt_embeds [B, L, D]`` and, SD3/Flux, ``pooled_prompt_embeds [B, P]``; with CFG also
    ``negative_prompt_embeds`` / ``negative_pooled_prompt_embeds``). ``output_type="latent"`` returns
    unpacked latents ``[B, C, h, w]``; ``"pil"`` a list of images; ``"pt"`` ``[B, 3, H, W]`` in [0, 1].
    ``guidance``: pipeline keyword arguments (:func:`guidance_kwargs`; default: no CFG, w = 1);
    ``pipe_kwargs`` go to the pipeline call as well (e.g. ``max_sequence_length``).
    """
    if (prompts is None) == (embeds is None):
        raise ValueError("pass exactly one of prompts= or embeds=")
    b = noise.shape[0]
    if prompts is not None and len(prompts) != b:
        raise ValueError(f"{len(prompts)} prompts for {b} noise draws")
    f = int(pipe.vae_scale_factor)
    if height is None or width is None:
        height, width = noise.shape[-2] * f, noise.shape[-1] * f
    dev = pipe._execution_device
    dt = denoiser(pipe).dtype
    kw: dict[str, Any] = {**(guidance_kwargs(pipe) if guidance is None else guidance), **pipe_kwargs}
    if prompts is not None:
        kw["prompt"] = list(prompts)
    else:
        kw.update({k: v.to(dev, dt) for k, v in embeds.items() if v is not None})
    out = pipe(num_inference_steps=int(nfe), latents=to_pipeline_latents(pipe, noise).to(dev, dt),
               height=int(height), width=int(width), output_type=output_type, **kw).images
    if output_type == "latent":
        return from_pipeline_latents(pipe, out, noise.shape[1:])
    if output_type == "pt" and isinstance(out, Tensor) and out.ndim == 4 and out.shape[-1] in (1, 3):
        out = out.permute(0, 3, 1, 2)
    return out


# -------------------------------------------------------------------------------- grid and files


def labelled_grid(cells: Sequence[Sequence[Any]], row_labels: Sequence[str], col_labels: Sequence[str],
                  path: str | Path, cell: int = 128, label_width: int = 180) -> Path:
    """Tile PIL images ``cells[r][c]`` into one PNG with the column labels on top and the row labels
    (wrapped) on the left; every image is resized (nearest) to ``cell × cell`` pixels."""
    from PIL import Image, ImageDraw, ImageFont

    rows, cols = len(cells), len(col_labels)
    if rows == 0 or rows != len(row_labels) or any(len(r) != cols for r in cells):
        raise ValueError(f"labelled_grid needs {len(row_labels)} rows of {cols} images, got "
                         f"{[len(r) for r in cells]}")
    font = ImageFont.load_default()
    pad, head = 4, 22
    size = (label_width + cols * (cell + pad) + pad, head + rows * (cell + pad) + pad)
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    for c, text in enumerate(col_labels):
        draw.text((label_width + pad + c * (cell + pad) + 4, 5), str(text), fill="black", font=font)
    chars = max(8, label_width // 7)
    for r, text in enumerate(row_labels):
        top = head + pad + r * (cell + pad)
        lines = textwrap.wrap(str(text), chars)[: max(1, cell // 14)] or [""]
        for i, line in enumerate(lines):
            draw.text((4, top + 4 + 14 * i), line, fill="black", font=font)
        for c in range(cols):
            img = cells[r][c].convert("RGB").resize((cell, cell), Image.NEAREST)
            canvas.paste(img, (label_width + pad + c * (cell + pad), top))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


@dataclass
class RenderResult:
    """What :func:`render_prompts` wrote: ``images[nfe]`` (PIL, prompt-major), the PNG paths per NFE
    and the grid."""

    prompts: list[str]
    nfes: list[int]
    images: dict[int, list[Any]] = field(default_factory=dict)
    files: dict[int, list[Path]] = field(default_factory=dict)
    grid: Path | None = None


def render_prompts(pipe: Any, prompts: Sequence[str], nfes: Sequence[int], out_dir: str | Path, *,
                   seed: int = 0, per_prompt: int = 1, height: int | None = None, width: int | None = None,
                   guidance: Mapping[str, Any] | None = None, batch_size: int = 8) -> RenderResult:
    """Render every prompt at every NFE from the same seeded noise; write
    ``OUT/nfe{K}/p{I}_{J}.png`` (prompt ``I``, image ``J``) and ``OUT/grid.png`` (rows = prompts ×
    images, columns = NFE)."""
    if not prompts:
        raise ConfigError("no prompts to render: give --prompt TEXT or --prompts FILE")
    if per_prompt < 1 or batch_size < 1:
        raise ConfigError(f"--n (images per prompt) and the batch size must be positive, got {per_prompt}, "
                          f"{batch_size}")
    if height is None or width is None:
        dh, dw = default_size(pipe)
        height, width = height or dh, width or dw
    shape = latent_shape(pipe, height, width)
    flat = [p for p in prompts for _ in range(per_prompt)]
    noise = draw_noise(shape, len(flat), seed)
    out = Path(out_dir)
    res = RenderResult(list(prompts), [int(k) for k in nfes])
    width_i = max(2, len(str(len(prompts) - 1)))
    for nfe in res.nfes:
        imgs: list[Any] = []
        for lo in range(0, len(flat), batch_size):
            imgs += generate(pipe, nfe, noise[lo:lo + batch_size], prompts=flat[lo:lo + batch_size],
                             output_type="pil", guidance=guidance, height=height, width=width)
        d = out / f"nfe{nfe}"
        d.mkdir(parents=True, exist_ok=True)
        paths = []
        for k, img in enumerate(imgs):
            i, j = divmod(k, per_prompt)
            paths.append(d / f"p{i:0{width_i}d}_{j}.png")
            img.save(paths[-1])
        res.images[nfe], res.files[nfe] = imgs, paths
    rows = [[res.images[nfe][k] for nfe in res.nfes] for k in range(len(flat))]
    labels = [p if per_prompt == 1 else f"{p} [{k % per_prompt}]" for k, p in enumerate(flat)]
    cell = max(96, min(256, 2 ** math.ceil(math.log2(max(height, width)))))
    res.grid = labelled_grid(rows, labels, [f"NFE {k}" for k in res.nfes], out / "grid.png", cell=cell)
    return res


def read_prompts_arg(prompts: Sequence[str] | None, prompts_file: str | Path | None) -> list[str]:
    """``--prompt`` values followed by the prompts of ``--prompts FILE`` (txt: one per line; jsonl:
    ``{"prompt": ...}``; csv: a ``prompt`` column; read by :func:`.prompt_cache.read_prompts`)."""
    out = list(prompts or [])
    if prompts_file is not None:
        from flowdistill.integrations.diffusers.prompt_cache import read_prompts

        try:
            out += read_prompts(prompts_file)
        except ConfigError as e:
            raise ConfigError(str(e).replace("PROMPTS:", "--prompts", 1)) from None
    if not out:
        raise ConfigError("no prompts: give --prompt TEXT (repeatable) or --prompts FILE")
    return out
