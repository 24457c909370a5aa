"""Text conditions of diffusers teachers (:class:`TextCondition`: precomputed prompt embeddings,
pooled embeddings, Flux's guidance) and classifier-free guidance with a negative prompt
(:class:`TextCFGField`), shared by the teacher adapters (:mod:`.adapters`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flowdistill.core.guidance import GuidedField


@dataclass
class TextCondition:
    """Text conditioning of a diffusers model (precomputed by its text encoders).

    ``prompt_embeds [B or 1, L, D]`` (``encoder_hidden_states``), ``pooled_prompt_embeds
    [B or 1, P]`` (SD3/Flux ``pooled_projections``; unused by UNets) and, for guidance-distilled
    Flux models, ``guidance`` (a float or ``[B]``). A batch of 1 is broadcast to the batch of ``x``.
    """

    prompt_embeds: Tensor
    pooled_prompt_embeds: Tensor | None = None
    guidance: float | Tensor | None = None

    @classmethod
    def coerce(cls, cond: Any) -> TextCondition | None:
        """``None``, a :class:`TextCondition` or a mapping with the same keys."""
        if cond is None or isinstance(cond, TextCondition):
            return cond
        if isinstance(cond, Mapping):
            unknown = set(cond) - {"prompt_embeds", "pooled_prompt_embeds", "guidance"}
            if unknown:
                raise ValueError(f"unknown condition keys {sorted(unknown)}; expected prompt_embeds, "
                                 f"pooled_prompt_embeds, guidance")
            return cls(**cond)
        raise TypeError(f"condition must be a TextCondition or a dict, got {type(cond).__name__}")

    def batched(self, b: int) -> TextCondition:
        """The condition with every tensor expanded to batch ``b`` (from 1 or ``b``)."""

        def ex(v):
            if not isinstance(v, Tensor) or v.ndim == 0:
                return v
            if v.shape[0] == b:
                return v
            if v.shape[0] == 1:
                return v.expand(b, *v.shape[1:])
            raise ValueError(f"condition batch {v.shape[0]} does not match the sample batch {b}")

        return TextCondition(ex(self.prompt_embeds), ex(self.pooled_prompt_embeds), ex(self.guidance))

    def to(self, device=None, dtype: torch.dtype | None = None) -> TextCondition:
        """The condition with its tensors on ``device`` (embeddings also cast to ``dtype``)."""

        def mv(v, cast: bool):
            if not isinstance(v, Tensor):
                return v
            return v.to(device=device, dtype=dtype if cast and dtype is not None else v.dtype)

        return TextCondition(mv(self.prompt_embeds, True), mv(self.pooled_prompt_embeds, True),
                             mv(self.guidance, False))


def _cat_cond(a: TextCondition, b: TextCondition) -> TextCondition:
    """Batch-concatenate two conditions of equal batch (``[a; b]``)."""

    def cat(u, v):
        if (u is None) != (v is None):
            raise ValueError("the positive and negative conditions need the same fields")
        if isinstance(u, Tensor) and isinstance(v, Tensor) and u.ndim > 0 and v.ndim > 0:
            return torch.cat([u, v])
        return u  # None, or a scalar (e.g. Flux guidance) shared by both halves

    return TextCondition(cat(a.prompt_embeds, b.prompt_embeds),
                         cat(a.pooled_prompt_embeds, b.pooled_prompt_embeds), cat(a.guidance, b.guidance))


class TextCFGField(GuidedField):
    """Classifier-free guidance of a text-conditioned field with a negative (or empty) prompt:

        v = v(x, t, c₋) + w·(v(x, t, c₊) − v(x, t, c₋))

    as the SD3/SD pipelines do (both branches in one batched call). ``negative`` is a
    :class:`TextCondition` of batch 1 or ``B`` (its prompt length must match the positive one's).
    A :class:`~flowdistill.core.guidance.GuidedField` (Ho & Salimans 2022) with the negative prompt
    as the low branch: the guidance interval, per-sample scales (``w=``), the fused Euler combine
    and :func:`~flowdistill.core.guidance.unguided` (a fake-velocity net copies ``field``) all apply.
    """

    def __init__(self, field: nn.Module, scale: float, negative: TextCondition | Mapping,
                 interval: tuple[float, float] | None = None, scale_range: tuple[float, float] | None = None):
        super().__init__(scale, interval, scale_range)
        self.field = field
        self.negative = TextCondition.coerce(negative)

    @property
    def base(self) -> nn.Module:
        """The conditional field under the guidance."""
        return self.field

    def _velocities(self, x: Tensor, t: Tensor, cond: Any, scale: Any) -> tuple[Tensor, Tensor]:
        """``(v(x, t, c₋), v(x, t, c₊))`` in one batched call (one call when ``scale`` is 1)."""
        pos = TextCondition.coerce(cond)
        if pos is None:
            raise ValueError("TextCFGField needs the positive condition as cond")
        if not isinstance(scale, Tensor) and float(scale) == 1.0:
            v = self.field(x, t, cond=pos)
            return v, v
        b = x.shape[0]
        both = _cat_cond(self.negative.batched(b), pos.batched(b))
        v = self.field(torch.cat([x, x]), torch.cat([t, t]), cond=both)
        v_neg, v_pos = v.chunk(2)
        return v_neg, v_pos

    def forward(self, x: Tensor, t: Tensor, s: Tensor | None = None, cond: Any = None,
                w: Any = None) -> Tensor:
        """Guided velocity; ``cond`` is the positive :class:`TextCondition` (or dict), ``s`` ignored."""
        return super().forward(x, t, cond=cond, w=w)
