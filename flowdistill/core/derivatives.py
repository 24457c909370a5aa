"""Directional (time) derivatives of a network output: forward-mode JVP or finite differences.

Several methods need ``d/dτ f(p + τ·d)`` at ``τ = 0`` for inputs ``p`` (state, times) and a
tangent ``d`` (e.g. ``∂_s u(x, t, s)`` is the tangent ``(0, 0, 1)``). ``method="jvp"`` runs
``torch.func.jvp`` on ``fn`` under the math attention backend, since fused attention kernels have
no forward-mode rule; ``method="fd"`` uses a central difference ``(f(p + h·d) − f(p − h·d))/(2h)``
with no graph. Both return ``(f(p), derivative)`` with the derivative detached.

``fn`` is a function, not a module, so this helper cannot peel wrappers itself: ``fn`` must call
the *bare* module — a distiller's own attribute (``self.student``) or :func:`unwrap` of an engine
wrapper — because JVP cannot pass DDP's hooks (nor a ``torch.compile`` wrapper).

Under DDP the gradient must flow through the wrapper's own forward (that is where DDP hooks its
all-reduce), while JVP needs the bare module: pass the wrapped call as ``forward`` and the bare
call as ``fn``; the returned value is then ``forward(p)`` (with gradient) and the derivative is
taken on ``fn`` without a graph — one extra forward, no custom all-reduce.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from torch import Tensor, nn


def unwrap(module: nn.Module) -> nn.Module:
    """Peel DDP/compile wrappers (``.module`` / ``._orig_mod``): the bare module that a JVP's
    ``fn`` calls (and whose state dict the engine saves)."""
    while True:
        if hasattr(module, "module") and isinstance(module.module, nn.Module):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


def _math_attention():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    except Exception:  # pragma: no cover - older torch
        return nullcontext()


def directional_derivative(fn: Callable[..., Tensor], primals: Sequence[Tensor],
                           tangents: Sequence[Tensor | None], method: str = "jvp",
                           h: float = 1e-3, forward: Callable[..., Tensor] | None = None
                           ) -> tuple[Tensor, Tensor]:
    """``(fn(*primals), d/dτ fn(primals + τ·tangents))``; ``None`` tangents are zero.

    ``forward``: the same function through an engine wrapper; when given (and not ``fn``), the
    value comes from it and the derivative from ``fn`` under no-grad (see the module doc)."""
    if forward is not None and forward is not fn:
        with torch.no_grad():
            _, d = directional_derivative(fn, primals, tangents, method=method, h=h)
        return forward(*primals), d
    tangents = [torch.zeros_like(p) if d is None else d.to(p.dtype) for p, d in zip(primals, tangents,
                                                                                     strict=True)]
    if method == "jvp":
        with _math_attention():
            out, d = torch.func.jvp(fn, tuple(primals), tuple(tangents))
        return out, d.detach()
    if method == "fd":
        with torch.no_grad():
            plus = fn(*[p + h * d for p, d in zip(primals, tangents, strict=True)])
            minus = fn(*[p - h * d for p, d in zip(primals, tangents, strict=True)])
        return fn(*primals), (plus - minus) / (2 * h)
    raise ValueError(f"derivative method must be 'jvp' or 'fd', got {method!r}")


def backward_difference(fn: Callable[..., Tensor], primals: Sequence[Tensor],
                        tangents: Sequence[Tensor | None], h: float,
                        value: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One-sided (backward) difference along a tangent, without graph:

        d ≈ (f(p) − f(p − h·d_p)) / h,     error O(h) (first order, unlike the central difference),

    returned as ``(f(p), d)``. ``value``: ``f(p)`` already computed (e.g. the online student's own
    forward, detached), which saves one call. MDT-dist's velocity matching uses it with the
    tangent ``(v_T, 1)`` on ``(x, t)``: ``p − h·d_p = (x_t − Δ·v_T, t − Δ)`` is one teacher Euler step,
    so the difference is taken along the teacher's trajectory (arXiv 2509.04406)."""
    tangents = [torch.zeros_like(p) if d is None else d.to(p.dtype) for p, d in zip(primals, tangents,
                                                                                     strict=True)]
    with torch.no_grad():
        here = fn(*primals) if value is None else value.detach()
        back = fn(*[p - h * d for p, d in zip(primals, tangents, strict=True)])
    return here, (here - back) / h
