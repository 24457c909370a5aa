"""LoRA students for large diffusers teachers (via peft).

A LoRA student is a copy of the teacher transformer with low-rank adapters ``W + (α/r)·B·A`` on
its attention projections; only ``A, B`` train (the base weights are frozen, so a distiller's
``optim_groups`` — which keeps parameters with ``requires_grad`` — trains just the adapters).
Wrap the transformer in its teacher adapter
(:func:`~flowdistill.integrations.diffusers.adapters.adapt_teacher`) to give it our call signature.
:func:`save_lora` writes the adapters the way diffusers' training scripts do
(``get_peft_model_state_dict`` + ``<Pipeline>.save_lora_weights`` with the adapter metadata), so
``pipe.load_lora_weights(dir)`` loads them into the base pipeline. With ``scheduler=`` it also writes
the ``FlowDistillScheduler`` config the student samples with (``scheduler_config.json`` beside the
weights), so ``pipe.scheduler = FlowDistillScheduler.from_pretrained(dir)`` completes the swap.

TSCD / LCM / PCM LoRA students are one-time (the transformer's own call); how they read as flow
maps, and which of them serve every step count, is
:mod:`flowdistill.integrations.diffusers.segment_student`.

Needs ``peft`` (``pip install 'flowdistill[lora]'``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")

# transformer class -> pipeline class whose LoRA loader mixin knows it
_LORA_PIPELINES = {
    "SD3Transformer2DModel": "StableDiffusion3Pipeline",
    "FluxTransformer2DModel": "FluxPipeline",
    "UNet2DConditionModel": "StableDiffusionPipeline",
}
# the denoiser's component name in that pipeline's LoRA format (``<component>.…`` keys)
_LORA_COMPONENT = {"UNet2DConditionModel": "unet"}


def require_peft() -> None:
    """Raise ImportError with the install hint when peft is missing."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ImportError("LoRA students need peft: pip install 'flowdistill[lora]' (or pip install peft)") \
            from None


def add_lora(model: nn.Module, rank: int = 8, alpha: float | None = None,
             target_modules: Sequence[str] = DEFAULT_TARGETS, init: str | bool = "gaussian",
             adapter_name: str = "default", copy_model: bool = False) -> nn.Module:
    """Freeze ``model`` and add a LoRA adapter (rank ``rank``, scale ``alpha/rank``, ``alpha = rank``
    by default) to the named sub-modules. ``init="gaussian"`` (peft) starts with ``B = 0`` so the
    student equals the teacher. ``copy_model`` adapts a deep copy (the teacher stays untouched)."""
    require_peft()
    from peft import LoraConfig

    name = type(model).__name__
    if not hasattr(model, "add_adapter"):
        raise ValueError(f"{name} has no peft adapter support (diffusers PeftAdapterMixin); LoRA students "
                         f"are supported for {', '.join(sorted(_LORA_PIPELINES))}")
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if copy_model:
        model = copy.deepcopy(model)
    model.requires_grad_(False)
    cfg = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights=init,
                     target_modules=list(target_modules))
    try:
        model.add_adapter(cfg, adapter_name=adapter_name)
    except ValueError as e:
        raise ValueError(f"no module of {name} matched target_modules {list(target_modules)} "
                         f"({str(e).splitlines()[0]})") from None
    if not lora_parameters(model):
        raise ValueError(f"no module of {name} matched target_modules {list(target_modules)}")
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA parameters (``lora_A``/``lora_B``) of ``model``."""
    return [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """The adapter weights under peft's names (``…to_q.lora_A.weight``)."""
    require_peft()
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=adapter_name)


def _pipeline_class(model: nn.Module):
    import diffusers

    name = type(model).__name__
    if name not in _LORA_PIPELINES:
        raise ValueError(f"no diffusers LoRA format for {name}; supported: "
                         f"{', '.join(sorted(_LORA_PIPELINES))}")
    return getattr(diffusers, _LORA_PIPELINES[name])


def save_lora(model: nn.Module, out_dir: str | Path, adapter_name: str = "default",
              weight_name: str = "pytorch_lora_weights.safetensors",
              scheduler: Mapping[str, Any] | Any | None = None) -> Path:
    """Write ``model``'s LoRA adapter so that ``<Pipeline>.load_lora_weights(out_dir)`` accepts it.

    ``model`` is the diffusers transformer (a teacher adapter or a
    :class:`~flowdistill.integrations.diffusers.segment_student.OneTimeSegmentStudent` around it is
    unwrapped). Keys are prefixed ``transformer.`` (``unet.`` for a UNet2DCondition model, whose
    pipeline is ``StableDiffusionPipeline``) and the peft config is stored as
    ``lora_adapter_metadata`` (safetensors). ``scheduler`` (a ``FlowDistillScheduler`` or its config
    keys) is saved as ``out_dir/scheduler_config.json``.
    """
    for _ in range(4):  # segment student .net / two-time .adapter -> adapter.model -> the transformer
        if getattr(model, "peft_config", None):
            break
        inner = next((getattr(model, a) for a in ("net", "adapter", "model")
                      if isinstance(getattr(model, a, None), nn.Module)), None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    if not getattr(model, "peft_config", None) or adapter_name not in model.peft_config:
        raise ValueError(f"{type(model).__name__} has no LoRA adapter {adapter_name!r}; call add_lora first")
    pipe_cls = _pipeline_class(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    comp = _LORA_COMPONENT.get(type(model).__name__, "transformer")
    layers = {f"{comp}_lora_layers": lora_state_dict(model, adapter_name),
              f"{comp}_lora_adapter_metadata": model.peft_config[adapter_name].to_dict()}
    pipe_cls.save_lora_weights(str(out), **layers, weight_name=weight_name, safe_serialization=True)
    if scheduler is not None:
        from flowdistill.integrations.diffusers.scheduler import FlowDistillScheduler

        if isinstance(scheduler, Mapping):
            scheduler = FlowDistillScheduler(**scheduler)
        scheduler.save_config(str(out))
    return out / weight_name
