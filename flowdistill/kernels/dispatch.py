"""Backend choice for the fused ops: torch reference now; Triton kernels plug in here."""

from __future__ import annotations

import os

from flowdistill.kernels import reference as _ref

_VALID = ("auto", "torch", "triton")


def backend() -> str:
    """The requested backend from ``FLOWDISTILL_KERNELS`` (default ``auto``)."""
    b = os.environ.get("FLOWDISTILL_KERNELS", "auto").lower()
    if b not in _VALID:
        raise ValueError(f"FLOWDISTILL_KERNELS={b!r}: choose one of {', '.join(_VALID)}")
    return b


lincomb = _ref.lincomb
euler_step = _ref.euler_step
cfg_combine = _ref.cfg_combine
guided_euler_step = _ref.guided_euler_step
flow_map_jump = _ref.flow_map_jump
affine_sample_and_target = _ref.affine_sample_and_target
linear_sample_and_target = _ref.linear_sample_and_target
ema_update_ = _ref.ema_update_
