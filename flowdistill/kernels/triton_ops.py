"""Triton kernels for the fused elementwise ops (DESIGN.md §6).

Each op reads its inputs once, computes in fp32 and writes its output(s) once in the dtype of the
first input (fp32, bf16 or fp16; inputs may mix these dtypes, as in the torch reference).
Coefficients are Python floats or per-sample tensors with ``B`` (or 1) elements; a per-sample
coefficient is gathered inside the kernel at ``sample = flat_offset // N`` with ``N`` the number of
elements per sample, so it broadcasts over the trailing dimensions of ``[B, ...]`` inputs.

Layout: contiguous inputs (and 4-D inputs that are all ``channels_last``, whose batch dimension is
still outermost in memory) are used in place; any other layout is copied to a contiguous tensor
first (one extra pass) and the output is contiguous. Shape or device mismatches between ``x`` and
the other tensors and unsupported dtypes raise ``ValueError``. These kernels are not
differentiable; :mod:`flowdistill.kernels.dispatch` sends autograd / ``torch.func`` /
``torch.compile`` calls to the torch reference.

Import this module only when Triton is wanted: it imports ``triton`` at import time (the dispatcher
imports it lazily). Under ``TRITON_INTERPRET=1`` (which must be set before ``triton`` is imported)
the kernels run on CPU tensors through the Triton interpreter with a single launch configuration;
that is how the tests check them against the torch reference (fp32 only: the interpreter computes
bf16 wrongly). On a GPU the launch configuration is autotuned per size class.

GPU-only: speed (bandwidth versus ``copy_``, speed-up over eager torch), the CUDA-graph capture in
:mod:`flowdistill.kernels.graphs`, and the bf16/fp16 kernel checks. Those tests and benchmark rows
skip (or report "absent") on machines without a GPU.

``ema_update_`` has no Triton kernel on purpose: ``torch._foreach_lerp_`` is already a fused
multi-tensor kernel (a handful of launches for the whole parameter list, each a single
read-read-write pass), while a per-tensor Triton kernel would cost one launch per parameter; see
:func:`ema_update_`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from flowdistill.kernels import reference as _ref

Coef = Tensor | float

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_TERMS = 4  # terms per lincomb pass; longer combinations run as chained passes (fp32 carry)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_I32_LIMIT = 2**31 - 2**16  # flat offsets above this use int64 indexing


def _configs() -> list[triton.Config]:
    """Launch configurations to autotune over (one under the interpreter)."""
    if _INTERPRET:
        return [triton.Config({"BLOCK": 1024}, num_warps=4)]
    return [
        triton.Config({"BLOCK": 1024}, num_warps=4),
        triton.Config({"BLOCK": 2048}, num_warps=8),
        triton.Config({"BLOCK": 4096}, num_warps=8),
    ]


def _autotune(fn):
    """Autotune over :func:`_configs`, keyed on the size class (``numel.bit_length()``) and dtypes."""
    return triton.autotune(configs=_configs(), key=["size_class"])(fn)


# --------------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------------


@triton.jit
def _offsets(numel, BLOCK: tl.constexpr, I64: tl.constexpr):
    """Flat element offsets ``pid·BLOCK + [0, BLOCK)`` of this program and their in-bounds mask."""
    pid = tl.program_id(0)
    if I64:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < numel


@triton.jit
def _coef(c, sample, mask, VEC: tl.constexpr):
    """Coefficient ``c[sample]`` (per-sample tensor) or the scalar ``c``, in fp32."""
    if VEC:
        out = tl.load(c + sample, mask=mask, other=0.0).to(tl.float32)
    else:
        out = c
    return out


@triton.jit
def _ld(ptr, offs, mask):
    """Load ``ptr[offs]`` and widen to fp32."""
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@_autotune
@triton.jit
def _lincomb_kernel(x_ptr, out_ptr, k0, k1, k2, k3, c0, c1, c2, c3, numel, N, size_class,
                    NT: tl.constexpr, V0: tl.constexpr, V1: tl.constexpr, V2: tl.constexpr,
                    V3: tl.constexpr, I64: tl.constexpr, BLOCK: tl.constexpr):
    """``out = x + Σ_{i<NT} c_i · k_i`` (``1 ≤ NT ≤ 4``), accumulated left to right in fp32."""
    offs, mask = _offsets(numel, BLOCK, I64)
    sample = offs // N
    acc = _ld(x_ptr, offs, mask)
    acc += _coef(c0, sample, mask, V0) * _ld(k0, offs, mask)
    if NT > 1:
        acc += _coef(c1, sample, mask, V1) * _ld(k1, offs, mask)
    if NT > 2:
        acc += _coef(c2, sample, mask, V2) * _ld(k2, offs, mask)
    if NT > 3:
        acc += _coef(c3, sample, mask, V3) * _ld(k3, offs, mask)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@_autotune
@triton.jit
def _cfg_kernel(vu_ptr, vc_ptr, out_ptr, w, numel, N, size_class,
                VW: tl.constexpr, I64: tl.constexpr, BLOCK: tl.constexpr):
    """``out = v_u + w · (v_c − v_u)``."""
    offs, mask = _offsets(numel, BLOCK, I64)
    sample = offs // N
    vu = _ld(vu_ptr, offs, mask)
    out = vu + _coef(w, sample, mask, VW) * (_ld(vc_ptr, offs, mask) - vu)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@_autotune
@triton.jit
def _guided_euler_kernel(x_ptr, vu_ptr, vc_ptr, out_ptr, w, dt, numel, N, size_class,
                         VW: tl.constexpr, VD: tl.constexpr, I64: tl.constexpr, BLOCK: tl.constexpr):
    """``out = x + dt · (v_u + w · (v_c − v_u))``."""
    offs, mask = _offsets(numel, BLOCK, I64)
    sample = offs // N
    vu = _ld(vu_ptr, offs, mask)
    v = vu + _coef(w, sample, mask, VW) * (_ld(vc_ptr, offs, mask) - vu)
    out = _ld(x_ptr, offs, mask) + _coef(dt, sample, mask, VD) * v
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@_autotune
@triton.jit
def _flow_map_kernel(x_ptr, u_ptr, out_ptr, t, s, numel, N, size_class,
                     VT: tl.constexpr, VS: tl.constexpr, I64: tl.constexpr, BLOCK: tl.constexpr):
    """``out = x + (s − t) · u`` with ``s − t`` formed in fp32."""
    offs, mask = _offsets(numel, BLOCK, I64)
    sample = offs // N
    d = _coef(s, sample, mask, VS) - _coef(t, sample, mask, VT)
    out = _ld(x_ptr, offs, mask) + d * _ld(u_ptr, offs, mask)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@_autotune
@triton.jit
def _affine_kernel(x_ptr, e_ptr, xt_ptr, v_ptr, a, s, da, ds, numel, N, size_class,
                   VA: tl.constexpr, VS: tl.constexpr, VDA: tl.constexpr, VDS: tl.constexpr,
                   I64: tl.constexpr, BLOCK: tl.constexpr):
    """``x_t = a·x + s·ε`` and ``v = a'·x + s'·ε`` in one pass."""
    offs, mask = _offsets(numel, BLOCK, I64)
    sample = offs // N
    x = _ld(x_ptr, offs, mask)
    e = _ld(e_ptr, offs, mask)
    xt = _coef(a, sample, mask, VA) * x + _coef(s, sample, mask, VS) * e
    v = _coef(da, sample, mask, VDA) * x + _coef(ds, sample, mask, VDS) * e
    tl.store(xt_ptr + offs, xt.to(xt_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)


@_autotune
@triton.jit
def _linear_kernel(x_ptr, e_ptr, xt_ptr, v_ptr, t, omt, numel, N, size_class,
                   VT: tl.constexpr, I64: tl.constexpr, BLOCK: tl.constexpr):
    """``x_t = (1 − t)·x + t·ε`` and ``v = ε − x`` in one pass (``omt = 1 − t`` for scalar ``t``)."""
    offs, mask = _offsets(numel, BLOCK, I64)
    sample = offs // N
    if VT:
        tv = _coef(t, sample, mask, VT)
        om = 1.0 - tv
    else:
        tv = t
        om = omt
    x = _ld(x_ptr, offs, mask)
    e = _ld(e_ptr, offs, mask)
    tl.store(xt_ptr + offs, (om * x + tv * e).to(xt_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, (e - x).to(v_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# Host-side preparation
# --------------------------------------------------------------------------------------------------


class _Launch:
    """Validated flat view of one op's tensors: layout, sizes and the launch grid."""

    __slots__ = ("x", "others", "numel", "B", "N", "size_class", "i64")

    def __init__(self, op: str, x: Tensor, others: Sequence[Tensor], names: Sequence[str]):
        if not isinstance(x, Tensor):
            raise ValueError(f"{op}: expected a tensor, got {type(x).__name__}")
        for t, name in zip(others, names, strict=True):
            if not isinstance(t, Tensor):
                raise ValueError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
            if t.shape != x.shape:
                raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(x.shape)}")
            if t.device != x.device:
                raise ValueError(f"{op}: {name} is on {t.device}, expected {x.device}")
        for t in (x, *others):
            if t.dtype not in SUPPORTED_DTYPES:
                raise ValueError(f"{op}: dtype {t.dtype} is not supported by the Triton kernels "
                                 "(fp32, bf16, fp16); use the torch backend")
        tensors = (x, *others)
        if not all(t.is_contiguous() for t in tensors) and not (
                x.ndim == 4 and all(t.is_contiguous(memory_format=torch.channels_last) for t in tensors)):
            tensors = tuple(t.contiguous() for t in tensors)
        self.x, self.others = tensors[0], tensors[1:]
        self.numel = x.numel()
        self.B = x.shape[0] if x.ndim else 1
        self.N = max(self.numel // max(self.B, 1), 1)
        self.size_class = self.numel.bit_length()
        self.i64 = self.numel >= _I32_LIMIT

    def empty(self, dtype: torch.dtype | None = None) -> Tensor:
        """An output like ``x`` (same layout, so flat offsets line up)."""
        return torch.empty_like(self.x, dtype=dtype)

    def coef(self, op: str, c: Coef) -> tuple[Tensor | float, bool]:
        """``(argument, is_per_sample)`` for one coefficient: a float or a fp32 ``[B]`` tensor."""
        if not isinstance(c, Tensor):
            return float(c), False
        if c.numel() not in (1, self.B):
            raise ValueError(f"{op}: per-sample coefficient has {c.numel()} elements, expected "
                             f"{self.B} (batch size) or 1")
        c = c.detach().reshape(-1).to(device=self.x.device, dtype=torch.float32)
        if c.numel() != self.B:
            c = c.expand(self.B)
        return c.contiguous(), True

    def grid(self, meta: dict) -> tuple[int]:
        """Number of programs for the chosen ``BLOCK``."""
        return (triton.cdiv(self.numel, meta["BLOCK"]),)

    def launch(self, kernel, *args, **meta) -> None:
        """Launch ``kernel`` over all elements on the device of ``x`` (``numel, N, size_class`` appended)."""
        args = (*args, self.numel, self.N, self.size_class)
        if self.x.is_cuda and self.x.device.index not in (None, torch.cuda.current_device()):
            with torch.cuda.device(self.x.device):
                kernel[self.grid](*args, I64=self.i64, **meta)
        else:
            kernel[self.grid](*args, I64=self.i64, **meta)


# --------------------------------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------------------------------


def lincomb(x: Tensor, terms: Sequence[Tensor], coefs: Sequence[Coef]) -> Tensor:
    """``x + Σ_i c_i · k_i`` in one pass per four terms (fp32 carry between passes)."""
    terms, coefs = list(terms), list(coefs)
    if len(terms) != len(coefs):
        raise ValueError(f"lincomb: {len(terms)} terms but {len(coefs)} coefficients")
    names = [f"terms[{i}]" for i in range(len(terms))]
    L = _Launch("lincomb", x, terms, names)
    if not terms:
        return L.x.clone()
    if L.numel == 0:
        return L.empty()
    acc = L.x
    chunks = [list(range(i, min(i + MAX_TERMS, len(terms)))) for i in range(0, len(terms), MAX_TERMS)]
    for j, idx in enumerate(chunks):
        last = j == len(chunks) - 1
        out = L.empty(None if last else torch.float32)
        ks = [L.others[i] for i in idx]
        cs = [L.coef("lincomb", coefs[i]) for i in idx]
        nt = len(ks)
        ks += [L.x] * (MAX_TERMS - nt)
        cs += [(0.0, False)] * (MAX_TERMS - nt)
        L.launch(_lincomb_kernel, acc, out, *ks, *(c for c, _ in cs),
                 NT=nt, V0=cs[0][1], V1=cs[1][1], V2=cs[2][1], V3=cs[3][1])
        acc = out
    return acc


def euler_step(x: Tensor, v: Tensor, dt: Coef) -> Tensor:
    """``x + dt · v``."""
    return lincomb(x, [v], [dt])


def cfg_combine(v_u: Tensor, v_c: Tensor, w: Coef) -> Tensor:
    """Classifier-free guidance ``v_u + w · (v_c − v_u)``."""
    L = _Launch("cfg_combine", v_u, [v_c], ["v_c"])
    out = L.empty()
    if L.numel:
        wc, wv = L.coef("cfg_combine", w)
        L.launch(_cfg_kernel, L.x, L.others[0], out, wc, VW=wv)
    return out


def guided_euler_step(x: Tensor, v_u: Tensor, v_c: Tensor, w: Coef, dt: Coef) -> Tensor:
    """Guided Euler step ``x + dt · (v_u + w · (v_c − v_u))``."""
    L = _Launch("guided_euler_step", x, [v_u, v_c], ["v_u", "v_c"])
    out = L.empty()
    if L.numel:
        wc, wv = L.coef("guided_euler_step", w)
        dc, dv = L.coef("guided_euler_step", dt)
        L.launch(_guided_euler_kernel, L.x, *L.others, out, wc, dc, VW=wv, VD=dv)
    return out


def flow_map_jump(x: Tensor, u: Tensor, t: Coef, s: Coef) -> Tensor:
    """Flow-map jump ``X(x, t, s) = x + (s − t) · u``."""
    if not isinstance(t, Tensor) and not isinstance(s, Tensor):
        return lincomb(x, [u], [float(s) - float(t)])  # s − t in double, as the reference
    L = _Launch("flow_map_jump", x, [u], ["u"])
    out = L.empty()
    if L.numel:
        tc, tv = L.coef("flow_map_jump", t)
        sc, sv = L.coef("flow_map_jump", s)
        L.launch(_flow_map_kernel, L.x, L.others[0], out, tc, sc, VT=tv, VS=sv)
    return out


def affine_sample_and_target(x: Tensor, eps: Tensor, a: Coef, s: Coef, da: Coef,
                             ds: Coef) -> tuple[Tensor, Tensor]:
    """``x_t = a·x + s·ε`` and ``v = a'·x + s'·ε`` (two outputs, one pass)."""
    L = _Launch("affine_sample_and_target", x, [eps], ["eps"])
    xt, v = L.empty(), L.empty()
    if L.numel:
        cs = [L.coef("affine_sample_and_target", c) for c in (a, s, da, ds)]
        L.launch(_affine_kernel, L.x, L.others[0], xt, v, *(c for c, _ in cs),
                 VA=cs[0][1], VS=cs[1][1], VDA=cs[2][1], VDS=cs[3][1])
    return xt, v


def linear_sample_and_target(x: Tensor, eps: Tensor, t: Coef) -> tuple[Tensor, Tensor]:
    """Linear path: ``x_t = (1 − t)·x + t·ε`` and ``v = ε − x`` (two outputs, one pass)."""
    L = _Launch("linear_sample_and_target", x, [eps], ["eps"])
    xt, v = L.empty(), L.empty()
    if L.numel:
        tc, tv = L.coef("linear_sample_and_target", t)
        omt = 0.0 if tv else 1.0 - tc  # 1 − t in double for a scalar t, as the reference
        L.launch(_linear_kernel, L.x, L.others[0], xt, v, tc, omt, VT=tv)
    return xt, v


def ema_update_(ema: Sequence[Tensor], params: Sequence[Tensor], decay: float) -> None:
    """In place ``e ← decay · e + (1 − decay) · p`` via ``torch._foreach_lerp_``.

    ``_foreach_lerp_`` is a multi-tensor-apply kernel: it batches many parameters per launch and
    reads ``e`` and ``p`` and writes ``e`` once, i.e. it is already the fused bandwidth-bound pass
    a Triton kernel would be, without one launch per parameter, so no Triton kernel is used here.
    """
    _ref.ema_update_(ema, params, decay)
