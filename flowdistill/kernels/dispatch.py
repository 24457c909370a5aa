"""Backend choice for the fused ops: Triton kernels on CUDA, the torch reference otherwise.

``FLOWDISTILL_KERNELS`` picks the backend (read at every call, so it can be changed at run time):

- ``auto`` (default): Triton for CUDA tensors when ``triton`` imports, the torch reference for
  everything else.
- ``torch``: always the torch reference.
- ``triton``: Triton for CUDA tensors; for CPU tensors only when ``TRITON_INTERPRET=1`` is set (the
  Triton interpreter, used by the tests), otherwise a ``RuntimeError``. Also a ``RuntimeError`` when
  ``triton`` does not import.

Under every backend a call is sent to the torch reference when the Triton kernels cannot serve it:
an input needs a gradient (autograd on), it is a ``torch.func`` wrapper (``jvp``/``vmap``/``grad``),
forward-mode AD is active, ``torch.compile`` is tracing (inductor fuses the reference itself), or
a tensor is not fp32/bf16/fp16 (e.g. fp64). ``triton`` is imported lazily, on the first call that
needs it, so importing :mod:`flowdistill` never imports Triton.

Overhead on the torch path is a cached environment lookup, ``x.is_cuda`` and one shape/device
check per extra tensor (well under a microsecond per tensor); ``scripts/bench_kernels.py``
measures the dispatch API against the eager torch expression.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import ModuleType

import torch
from torch import Tensor

from flowdistill.kernels import reference as _ref

Coef = Tensor | float

_VALID = ("auto", "torch", "triton")
_KEY = "FLOWDISTILL_KERNELS"
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
# os.environ.get costs ~1 µs (key encoding); the underlying bytes dict it keeps in sync costs ~50 ns.
_ENV_DATA = os.environ._data if os.name == "posix" and hasattr(os.environ, "_data") else None
_ENV_KEY = os.environ.encodekey(_KEY) if _ENV_DATA is not None else None
_MODE_CACHE: dict = {}
_TRITON: list = []  # [module or None] once the import was tried
_is_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)


def backend() -> str:
    """The requested backend from ``FLOWDISTILL_KERNELS`` (default ``auto``)."""
    b = os.environ.get(_KEY, "auto").lower()
    if b not in _VALID:
        raise ValueError(f"{_KEY}={b!r}: choose one of {', '.join(_VALID)}")
    return b


def _mode() -> str:
    """:func:`backend`, memoised on the raw environment value (the hot-path variant)."""
    raw = _ENV_DATA.get(_ENV_KEY) if _ENV_DATA is not None else os.environ.get(_KEY)
    m = _MODE_CACHE.get(raw)
    if m is None:
        m = backend()
        _MODE_CACHE[raw] = m
    return m


def triton_ops() -> ModuleType | None:
    """:mod:`flowdistill.kernels.triton_ops`, imported on first use; ``None`` without Triton."""
    if not _TRITON:
        try:
            from flowdistill.kernels import triton_ops as mod
        except ImportError:
            mod = None
        _TRITON.append(mod)
    return _TRITON[0]


def _triton_can_serve(tensors: Sequence) -> bool:
    """Whether the (non-differentiable, eager-only) kernels can compute this call."""
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    fwd_ad = getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0
    for t in tensors:
        if isinstance(t, Tensor):
            if t.dtype not in _FLOATS or (grad and t.requires_grad) or fwd_ad:
                return False
            if _is_wrapped is not None and _is_wrapped(t):
                return False
    return True


def _use_triton(x: Tensor, tensors: Sequence) -> bool:
    """Route one call: ``True`` for the Triton kernels, ``False`` for the torch reference."""
    m = _mode()
    if m == "torch" or (m == "auto" and not x.is_cuda):
        return False
    if not _triton_can_serve(tensors):
        return False
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"{_KEY}=triton with CPU tensors needs the Triton interpreter: set "
                           "TRITON_INTERPRET=1 before triton is imported (or use "
                           f"{_KEY}=auto/torch, which runs the torch reference on CPU)")
    if triton_ops() is None:
        if m == "auto":
            return False
        raise RuntimeError(f"{_KEY}=triton but triton does not import; install triton or use "
                           f"{_KEY}=torch/auto")
    return True


def resolve(x: Tensor, *others: Tensor | float) -> str:
    """The implementation a call on these inputs would use: ``"triton"`` or ``"torch"``."""
    return "triton" if _use_triton(x, (x, *others)) else "torch"


def _check(op: str, x: Tensor, others: Sequence[Tensor], names: Sequence[str]) -> None:
    """``ValueError`` unless every tensor in ``others`` has the shape and device of ``x``.

    The ops test ``shape``/``device`` inline (cheap) and call this only to build the message.
    """
    shape, dev = x.shape, x.device
    for t, name in zip(others, names, strict=True):
        if t.shape != shape:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if t.device != dev:
            raise ValueError(f"{op}: {name} is on {t.device}, expected {dev}")


def lincomb(x: Tensor, terms: Sequence[Tensor], coefs: Sequence[Coef]) -> Tensor:
    """``x + Σ_i c_i · k_i``: Euler, Heun and Runge–Kutta stage combinations in one pass."""
    if len(terms) != len(coefs):
        raise ValueError(f"lincomb: {len(terms)} terms but {len(coefs)} coefficients")
    if _use_triton(x, (x, *terms, *coefs)):
        return triton_ops().lincomb(x, terms, coefs)
    sh, dev = x.shape, x.device
    for k in terms:
        if k.shape != sh or k.device != dev:
            _check("lincomb", x, terms, [f"terms[{i}]" for i in range(len(terms))])
    return _ref.lincomb(x, terms, coefs)


def euler_step(x: Tensor, v: Tensor, dt: Coef) -> Tensor:
    """``x + dt · v``."""
    if _use_triton(x, (x, v, dt)):
        return triton_ops().lincomb(x, (v,), (dt,))
    if v.shape != x.shape or v.device != x.device:
        _check("euler_step", x, (v,), ("v",))
    return _ref.lincomb(x, (v,), (dt,))


def cfg_combine(v_u: Tensor, v_c: Tensor, w: Coef) -> Tensor:
    """Classifier-free guidance ``v_u + w · (v_c − v_u)``."""
    if _use_triton(v_u, (v_u, v_c, w)):
        return triton_ops().cfg_combine(v_u, v_c, w)
    if v_c.shape != v_u.shape or v_c.device != v_u.device:
        _check("cfg_combine", v_u, (v_c,), ("v_c",))
    return _ref.cfg_combine(v_u, v_c, w)


def guided_euler_step(x: Tensor, v_u: Tensor, v_c: Tensor, w: Coef, dt: Coef) -> Tensor:
    """Guided Euler step ``x + dt · (v_u + w · (v_c − v_u))``."""
    if _use_triton(x, (x, v_u, v_c, w, dt)):
        return triton_ops().guided_euler_step(x, v_u, v_c, w, dt)
    sh, dev = x.shape, x.device
    if v_u.shape != sh or v_c.shape != sh or v_u.device != dev or v_c.device != dev:
        _check("guided_euler_step", x, (v_u, v_c), ("v_u", "v_c"))
    return _ref.guided_euler_step(x, v_u, v_c, w, dt)


def flow_map_jump(x: Tensor, u: Tensor, t: Coef, s: Coef) -> Tensor:
    """Flow-map jump ``X(x, t, s) = x + (s − t) · u`` (DESIGN.md §1)."""
    if _use_triton(x, (x, u, t, s)):
        return triton_ops().flow_map_jump(x, u, t, s)
    if u.shape != x.shape or u.device != x.device:
        _check("flow_map_jump", x, (u,), ("u",))
    return _ref.flow_map_jump(x, u, t, s)


def affine_sample_and_target(x: Tensor, eps: Tensor, a: Coef, s: Coef, da: Coef,
                             ds: Coef) -> tuple[Tensor, Tensor]:
    """``x_t = a·x + s·ε`` and ``v = a'·x + s'·ε`` for an affine path, in one pass."""
    if _use_triton(x, (x, eps, a, s, da, ds)):
        return triton_ops().affine_sample_and_target(x, eps, a, s, da, ds)
    if eps.shape != x.shape or eps.device != x.device:
        _check("affine_sample_and_target", x, (eps,), ("eps",))
    return _ref.affine_sample_and_target(x, eps, a, s, da, ds)


def linear_sample_and_target(x: Tensor, eps: Tensor, t: Coef) -> tuple[Tensor, Tensor]:
    """Linear path: ``x_t = (1 − t)·x + t·ε`` and ``v = ε − x``, in one pass."""
    if _use_triton(x, (x, eps, t)):
        return triton_ops().linear_sample_and_target(x, eps, t)
    if eps.shape != x.shape or eps.device != x.device:
        _check("linear_sample_and_target", x, (eps,), ("eps",))
    return _ref.linear_sample_and_target(x, eps, t)


def ema_update_(ema: Sequence[Tensor], params: Sequence[Tensor], decay: float) -> None:
    """In place ``e ← decay · e + (1 − decay) · p`` over parameter lists.

    Every backend uses ``torch._foreach_lerp_`` (a fused multi-tensor kernel on CUDA, faster than
    one Triton launch per parameter); see :func:`flowdistill.kernels.triton_ops.ema_update_`.
    """
    _ref.ema_update_(ema, params, decay)
