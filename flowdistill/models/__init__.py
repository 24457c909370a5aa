"""Reference networks (MLP, UNet, DiT): one- or two-time, optionally class-conditional.

Every net is a diffusers ``ModelMixin`` + ``ConfigMixin`` with
``forward(x [B, ...], t [B], s [B] | None = None, cond LongTensor[B] | None = None) -> [B, ...]``
(docs/architecture.md). Build one by registered name with :func:`build_model`; start a two-time
student from a one-time teacher with :func:`init_from`. Auxiliary nets live in submodules:
:mod:`~flowdistill.models.digits_classifier` (the bundled digits CNN) and
:mod:`~flowdistill.models.perceptual` (perceptual distances for the perceptual losses).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from flowdistill.core.registry import Registry
from flowdistill.errors import ConfigError
from flowdistill.models.dit import DiTFlowNet
from flowdistill.models.embeddings import ConditionEmbedding, sinusoidal_embedding
from flowdistill.models.mlp import MLPFlowNet
from flowdistill.models.tokenizer import TokenizerModel
from flowdistill.models.unet import UNetFlowNet
from flowdistill.models.video_dit import VideoDiTFlowNet

MODELS: Registry = Registry("model")
MODELS.register("mlp")(MLPFlowNet)
MODELS.register("unet")(UNetFlowNet)
MODELS.register("dit")(DiTFlowNet)
MODELS.register("video_dit")(VideoDiTFlowNet)
MODELS.register("tokenizer")(TokenizerModel)


def build_model(name: str, /, **cfg: Any) -> nn.Module:
    """Instantiate the registered net ``name`` with config ``cfg``; a bad argument is a ConfigError."""
    cls = MODELS.get(name)
    try:
        return cls(**cfg)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model {name!r}: {e}") from None


@dataclass
class InitReport:
    """What :func:`init_from` did: copied tensors, and model tensors the teacher lacks."""

    copied: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


@torch.no_grad()
def init_from(model: nn.Module, teacher: nn.Module | dict[str, Tensor]) -> InitReport:
    """Copy every parameter/buffer of ``teacher`` whose name exists in ``model`` into ``model``.

    Made for starting a two-time student from a one-time teacher of the same sizes: the student's
    extra, zero-initialised ``s`` branch stays as it is, so ``u(x, t, s) == v(x, t)`` afterwards.
    A name present in both with different shapes raises ``ValueError``; teacher tensors unknown to
    ``model`` are ignored. Returns an :class:`InitReport`.
    """
    src = teacher.state_dict() if isinstance(teacher, nn.Module) else teacher
    dst = model.state_dict()
    bad = [f"{k}: {tuple(src[k].shape)} vs {tuple(v.shape)}" for k, v in dst.items()
           if k in src and src[k].shape != v.shape]
    if bad:
        raise ValueError(f"init_from: {len(bad)} shape mismatch(es), e.g. {bad[0]} (teacher vs model)")
    report = InitReport()
    for k, v in dst.items():
        if k in src:
            v.copy_(src[k])
            report.copied.append(k)
        else:
            report.missing.append(k)
    if not report.copied:
        raise ValueError("init_from: the teacher shares no tensor names with the model")
    return report


__all__ = [
    "MODELS",
    "ConditionEmbedding",
    "DiTFlowNet",
    "InitReport",
    "MLPFlowNet",
    "TokenizerModel",
    "UNetFlowNet",
    "build_model",
    "init_from",
    "sinusoidal_embedding",
]
