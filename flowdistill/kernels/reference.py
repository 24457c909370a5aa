"""Torch reference implementations of the fused elementwise ops.

These are the CPU path and the test oracle for the Triton kernels. Every op takes batch-first
tensors; a per-sample coefficient is a tensor of shape ``[B]`` (or a Python float) and is
broadcast over the trailing dimensions. Low-precision inputs are computed in fp32 and cast back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Coef = Tensor | float


def bcast(c: Coef, like: Tensor) -> Tensor | float:
    """Broadcast a per-sample coefficient ``[B]`` against ``like`` ``[B, ...]``."""
    if isinstance(c, Tensor):
        dt = torch.float64 if like.dtype == torch.float64 else torch.float32
        if c.ndim == 0:
            return c.to(dt)
        return c.to(dt).reshape(-1, *([1] * (like.ndim - 1)))
    return float(c)


def _f32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def lincomb(x: Tensor, terms: Sequence[Tensor], coefs: Sequence[Coef]) -> Tensor:
    """``x + Σ_i c_i · k_i``: Euler, Heun and Runge–Kutta stage combinations in one expression."""
    out = _f32(x)
    for k, c in zip(terms, coefs, strict=True):
        if isinstance(c, Tensor):
            out = torch.addcmul(out, bcast(c, x), _f32(k))
        else:  # one fused axpy for a scalar step
            out = torch.add(out, _f32(k), alpha=float(c))
    return out.to(x.dtype)


def euler_step(x: Tensor, v: Tensor, dt: Coef) -> Tensor:
    """``x + dt · v``."""
    return lincomb(x, [v], [dt])


def cfg_combine(v_u: Tensor, v_c: Tensor, w: Coef) -> Tensor:
    """Classifier-free guidance ``v_u + w · (v_c − v_u)``."""
    wb = bcast(w, v_u)
    vu = _f32(v_u)
    return (vu + wb * (_f32(v_c) - vu)).to(v_u.dtype)


def guided_euler_step(x: Tensor, v_u: Tensor, v_c: Tensor, w: Coef, dt: Coef) -> Tensor:
    """Guided Euler step ``x + dt · (v_u + w · (v_c − v_u))``."""
    wb, db = bcast(w, x), bcast(dt, x)
    vu = _f32(v_u)
    return (_f32(x) + db * (vu + wb * (_f32(v_c) - vu))).to(x.dtype)


def flow_map_jump(x: Tensor, u: Tensor, t: Coef, s: Coef) -> Tensor:
    """Flow-map jump ``X(x, t, s) = x + (s − t) · u`` (DESIGN.md §1)."""
    if isinstance(t, Tensor) or isinstance(s, Tensor):
        d = torch.as_tensor(s, dtype=torch.float32) - torch.as_tensor(t, dtype=torch.float32)
    else:
        d = float(s) - float(t)
    return lincomb(x, [u], [d])


def affine_sample_and_target(
    x: Tensor, eps: Tensor, a: Coef, s: Coef, da: Coef, ds: Coef
) -> tuple[Tensor, Tensor]:
    """Path sample and velocity target in one pass.

    ``x_t = a·x + s·ε`` and ``v = a'·x + s'·ε`` for an affine path ``α(t)x + σ(t)ε``.
    """
    xf, ef = _f32(x), _f32(eps)
    xt = bcast(a, x) * xf + bcast(s, x) * ef
    v = bcast(da, x) * xf + bcast(ds, x) * ef
    return xt.to(x.dtype), v.to(x.dtype)


def linear_sample_and_target(x: Tensor, eps: Tensor, t: Coef) -> tuple[Tensor, Tensor]:
    """Linear path: ``x_t = (1 − t)·x + t·ε`` and ``v = ε − x``."""
    tb = bcast(t, x)
    xf, ef = _f32(x), _f32(eps)
    return ((1 - tb) * xf + tb * ef).to(x.dtype), (ef - xf).to(x.dtype)


@torch.no_grad()
def ema_update_(ema: Sequence[Tensor], params: Sequence[Tensor], decay: float) -> None:
    """In place ``e ← decay · e + (1 − decay) · p`` over parameter lists (foreach)."""
    ema, params = list(ema), list(params)
    if not ema:
        return
    torch._foreach_lerp_(ema, [p.to(e.dtype) for e, p in zip(ema, params, strict=True)],
                         1.0 - decay)
