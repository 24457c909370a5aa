"""Triton kernels under the Triton interpreter on CPU, against the torch reference.

``TRITON_INTERPRET=1`` only takes effect if it is set before ``triton`` is imported, and other
tests in this pytest process import triton first (diffusers does). So this module runs its checks
in a child process: ``python tests/test_kernels_triton.py`` with ``TRITON_INTERPRET=1`` and
``FLOWDISTILL_KERNELS=triton`` runs every check group below and prints one JSON line per group;
the tests read that report (fp32 only: the interpreter computes bf16 wrongly). A second child
compiles every kernel for sm_90 without the interpreter (no GPU needed), which checks the compiled
path's typing. The CUDA checks of bf16/fp16, speed and graphs live in ``test_kernels.py`` and skip
without a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
SIZES = (1, 7, 1000, 4099)  # elements per sample
BATCHES = (1, 3)


# ------------------------------------------------------------------------------------------------
# Checks (run in the child process)
# ------------------------------------------------------------------------------------------------


def _setup():
    import torch

    from flowdistill.kernels import dispatch
    from flowdistill.kernels import reference as R
    from flowdistill.kernels import triton_ops as T

    assert os.environ.get("TRITON_INTERPRET") == "1" and T._INTERPRET
    return torch, T, R, dispatch


def _close(torch, got, want, what):
    """Assert ``got ≈ want`` (same dtype/shape) and return the max abs error."""
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want), what
        return max(_close(torch, g, w, what) for g, w in zip(got, want, strict=True))
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, got.shape, want.shape)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=lambda m: f"{what}: {m}")
    return (got - want).abs().max().item() if got.numel() else 0.0


def _grid(torch):
    """(B, N, x, terms, t, s) over the batch sizes and per-sample sizes, with odd shapes."""
    g = torch.Generator().manual_seed(0)
    for B in BATCHES:
        for N in SIZES:
            shape = (B, N) if N < 1000 else (B, 1, N)
            x = torch.randn(shape, generator=g)
            ks = [torch.randn(shape, generator=g) for _ in range(7)]
            t = torch.rand(B, generator=g)
            s = t * torch.rand(B, generator=g)
            yield B, N, x, ks, t, s


def _op_checks(torch, T, R, op: str) -> float:
    """One op against the reference over sizes, batches, per-sample and scalar coefficients."""
    err = 0.0
    for B, N, x, ks, t, s in _grid(torch):
        tag = f"{op} B={B} N={N}"
        w = 1.0 + 3.0 * t
        if op == "lincomb":
            for n in (1, 2, 3, 4, 7):
                cs = [t if i % 2 == 0 else 0.1 * (i + 1) for i in range(n)]
                got, want = T.lincomb(x, ks[:n], cs), R.lincomb(x, ks[:n], cs)
                err = max(err, _close(torch, got, want, f"{tag} n={n}"))
            cs = [0.5, -0.25]
            got, want = T.lincomb(x, ks[:2], cs), R.lincomb(x, ks[:2], cs)
            err = max(err, _close(torch, got, want, f"{tag} scalars"))
            assert torch.equal(T.lincomb(x, [], []), x)
        elif op == "euler_step":
            for dt in (-0.125, s - t):
                err = max(err, _close(torch, T.euler_step(x, ks[0], dt), R.euler_step(x, ks[0], dt), tag))
        elif op == "cfg_combine":
            for ww in (w, 4.0):
                got, want = T.cfg_combine(ks[0], ks[1], ww), R.cfg_combine(ks[0], ks[1], ww)
                err = max(err, _close(torch, got, want, tag))
        elif op == "guided_euler_step":
            for ww, dt in ((w, s - t), (2.5, -0.2), (w, -0.2), (1.5, s - t)):
                err = max(err, _close(torch, T.guided_euler_step(x, ks[0], ks[1], ww, dt),
                                      R.guided_euler_step(x, ks[0], ks[1], ww, dt), tag))
        elif op == "flow_map_jump":
            for tt, ss in ((t, s), (0.9, 0.4), (t, 0.0), (1.0, s)):
                err = max(err, _close(torch, T.flow_map_jump(x, ks[0], tt, ss),
                                      R.flow_map_jump(x, ks[0], tt, ss), tag))
        elif op == "affine_sample_and_target":
            trig = (torch.cos(t), torch.sin(t), -torch.sin(t), torch.cos(t))
            for coefs in ((1 - t, t, -1.0, 1.0), (0.3, 0.7, -1.0, 1.0), trig):
                err = max(err, _close(torch, T.affine_sample_and_target(x, ks[0], *coefs),
                                      R.affine_sample_and_target(x, ks[0], *coefs), tag))
        elif op == "linear_sample_and_target":
            for tt in (t, 0.3, 0.0, 1.0):
                err = max(err, _close(torch, T.linear_sample_and_target(x, ks[0], tt),
                                      R.linear_sample_and_target(x, ks[0], tt), tag))
        else:
            raise KeyError(op)
    return err


def check_noncontiguous(torch, T, R, dispatch) -> float:
    """Transposed, sliced, expanded and channels_last inputs give the reference result."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(5, 9, 4, generator=g)
    x = base.transpose(1, 2)  # [5, 4, 9], not contiguous
    v = torch.randn(5, 4, 18, generator=g)[..., ::2]  # strided slice
    e = torch.randn(1, 4, 9, generator=g).expand(5, 4, 9)  # zero stride
    t = torch.rand(10, generator=g)[::2]  # strided coefficient
    err = _close(torch, T.euler_step(x, v, t), R.euler_step(x, v, t), "euler transposed")
    err = max(err, _close(torch, T.lincomb(x, [v, e], [t, 0.5]), R.lincomb(x, [v, e], [t, 0.5]), "lincomb"))
    err = max(err, _close(torch, T.affine_sample_and_target(x, e, t, 1 - t, 0.2, -0.3),
                          R.affine_sample_and_target(x, e, t, 1 - t, 0.2, -0.3), "affine"))
    got, want = T.linear_sample_and_target(e, x, t), R.linear_sample_and_target(e, x, t)
    err = max(err, _close(torch, got, want, "linear"))
    err = max(err, _close(torch, T.cfg_combine(x, v, t), R.cfg_combine(x, v, t), "cfg"))
    cl = torch.randn(3, 4, 5, 6, generator=g).to(memory_format=torch.channels_last)
    cu = torch.randn(3, 4, 5, 6, generator=g).to(memory_format=torch.channels_last)
    tt = torch.rand(3, generator=g)
    out = T.flow_map_jump(cl, cu, tt, 0.0)
    assert out.is_contiguous(memory_format=torch.channels_last)  # used in place, layout kept
    err = max(err, _close(torch, out, R.flow_map_jump(cl, cu, tt, 0.0), "channels_last"))
    mixed = T.guided_euler_step(cl, cu.contiguous(), cu, tt, -0.5)  # mixed layouts: copied
    err = max(err, _close(torch, mixed, R.guided_euler_step(cl, cu, cu, tt, -0.5), "mixed layouts"))
    one = torch.tensor([0.7])  # a one-element coefficient broadcasts over the batch
    err = max(err, _close(torch, T.euler_step(cl, cu, one), R.euler_step(cl, cu, one), "1-element coef"))
    empty = torch.empty(0, 3)
    assert T.euler_step(empty, empty, 0.5).shape == (0, 3)
    return err


def check_errors(torch, T, R, dispatch) -> float:
    """Shape/device/dtype/coefficient mismatches raise ValueError; fp64 routes to the reference."""
    x = torch.randn(2, 3)
    bad = [
        lambda: T.euler_step(x, torch.randn(2, 4), 0.1),
        lambda: T.lincomb(x, [x, torch.randn(3, 3)], [0.1, 0.2]),
        lambda: T.cfg_combine(x, torch.empty(2, 3, device="meta"), 1.0),
        lambda: T.flow_map_jump(x.double(), x.double(), 1.0, 0.0),
        lambda: T.linear_sample_and_target(x, x.long(), 0.5),
        lambda: T.euler_step(x, x, torch.rand(3)),
        lambda: T.lincomb(x, [x], [0.1, 0.2]),
    ]
    for i, call in enumerate(bad):
        try:
            call()
        except ValueError:
            continue
        raise AssertionError(f"bad call {i} did not raise ValueError")
    xd = x.double()
    assert dispatch.resolve(xd, xd) == "torch"
    assert torch.equal(dispatch.euler_step(xd, xd, 0.1), R.euler_step(xd, xd, 0.1))
    return 0.0


def check_dispatch(torch, T, R, dispatch) -> float:
    """The public API routes to Triton (forced, interpreter) and the solvers/samplers still agree."""
    from flowdistill import kernels as K
    from flowdistill.core import solvers

    x = torch.randn(4, 2, 3)
    t = torch.rand(4)
    assert K.backend() == "triton" and K.resolve(x, x, t) == "triton"
    seen: list[str] = []
    orig = {n: getattr(T, n) for n in ("lincomb", "flow_map_jump")}

    def spy(name):
        def call(*a, **k):
            seen.append(name)
            return orig[name](*a, **k)
        return call

    for n in orig:
        setattr(T, n, spy(n))
    try:
        err = _close(torch, K.flow_map_jump(x, x, t, 0.0), R.flow_map_jump(x, x, t, 0.0), "api jump")
        err = max(err, _close(torch, K.euler_step(x, x, 0.3), R.euler_step(x, x, 0.3), "api euler"))
    finally:
        for n, f in orig.items():
            setattr(T, n, f)
    assert seen == ["flow_map_jump", "lincomb"], seen

    def field(xx, tt, cond=None):
        return -xx * tt.view(-1, 1, 1) + torch.sin(xx)

    grid = torch.linspace(1, 0, 5)
    for method in ("euler", "heun", "rk4", "dopri5"):
        os.environ["FLOWDISTILL_KERNELS"] = "triton"
        a = solvers.solve(field, x, grid, method=method).x
        os.environ["FLOWDISTILL_KERNELS"] = "torch"
        b = solvers.solve(field, x, grid, method=method).x
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=method)
    os.environ["FLOWDISTILL_KERNELS"] = "triton"
    return err


def compile_for_hopper() -> str:
    """Compile one variant of every kernel to PTX/cubin for sm_90 (no GPU needed; not interpreted).

    The interpreter is more lenient than the compiler, so this catches type errors in the compiled
    path. Returns a skip reason if this Triton build has no CUDA backend.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        return "triton has no CUDA backend"
    from flowdistill.kernels import triton_ops as T

    assert not T._INTERPRET
    target = GPUTarget("cuda", 90, 32)
    ints = {"numel", "N", "size_class"}

    def build(kernel, consts: dict, floats=(), dtypes=None):
        fn = kernel.fn
        sig = {}
        for n in fn.arg_names:
            if n in consts:
                sig[n] = "constexpr"
            elif n in ints:
                sig[n] = "i32"
            elif n in floats:
                sig[n] = "fp32"
            else:
                sig[n] = "*" + (dtypes or {}).get(n, "fp32")
        cx = {(fn.arg_names.index(k),): v for k, v in consts.items()}
        k = triton.compile(ASTSource(fn, sig, constexprs=cx), target=target, options={"num_warps": 4})
        assert "ld.global" in k.asm["ptx"]

    build(T._lincomb_kernel, dict(NT=4, V0=True, V1=False, V2=True, V3=False, I64=False, BLOCK=1024),
          floats=("c1", "c3"), dtypes={"x_ptr": "bf16", "out_ptr": "bf16", "k2": "fp16"})
    build(T._lincomb_kernel, dict(NT=1, V0=False, V1=False, V2=False, V3=False, I64=True, BLOCK=4096),
          floats=("c0", "c1", "c2", "c3"))
    build(T._cfg_kernel, dict(VW=False, I64=False, BLOCK=2048), floats=("w",), dtypes={"out_ptr": "fp16"})
    build(T._guided_euler_kernel, dict(VW=True, VD=False, I64=False, BLOCK=1024), floats=("dt",))
    build(T._flow_map_kernel, dict(VT=True, VS=False, I64=False, BLOCK=1024), floats=("s",))
    build(T._affine_kernel, dict(VA=True, VS=True, VDA=False, VDS=False, I64=False, BLOCK=1024),
          floats=("da", "ds"), dtypes={"xt_ptr": "bf16", "v_ptr": "bf16"})
    build(T._linear_kernel, dict(VT=True, I64=False, BLOCK=1024), floats=("omt",))
    build(T._linear_kernel, dict(VT=False, I64=False, BLOCK=1024), floats=("t", "omt"))
    return ""


OPS = ("lincomb", "euler_step", "cfg_combine", "guided_euler_step", "flow_map_jump",
       "affine_sample_and_target", "linear_sample_and_target")
GROUPS = (*OPS, "noncontiguous", "errors", "dispatch")


def main() -> int:
    """Run every check group and print one JSON line per group; exit 1 if any failed."""
    if sys.argv[1:] == ["--compile"]:
        reason = compile_for_hopper()
        print("SKIP " + reason if reason else "COMPILED", flush=True)
        return 0
    torch, T, R, dispatch = _setup()
    failed = 0
    for name in GROUPS:
        try:
            if name in OPS:
                err = _op_checks(torch, T, R, name)
            else:
                err = globals()[f"check_{name}"](torch, T, R, dispatch)
            rec = {"group": name, "ok": True, "max_abs_err": err}
        except Exception:
            failed += 1
            rec = {"group": name, "ok": False, "error": traceback.format_exc()[-3000:]}
        print("RESULT " + json.dumps(rec), flush=True)
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------------
# Tests (run in the pytest process)
# ------------------------------------------------------------------------------------------------

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


@pytest.fixture(scope="module")
def report() -> dict:
    """Run the checks once in a child process with the Triton interpreter on."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "FLOWDISTILL_KERNELS": "triton", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(HERE)], capture_output=True, text=True, env=env,
                          timeout=300, cwd=HERE.parents[1])
    recs = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            rec = json.loads(line[len("RESULT "):])
            recs[rec["group"]] = rec
    recs["__proc__"] = {"rc": proc.returncode, "stderr": proc.stderr[-3000:], "stdout": proc.stdout[-2000:]}
    return recs


@needs_triton
@pytest.mark.parametrize("group", GROUPS)
def test_interpreted_kernel(report, group):
    rec = report.get(group)
    assert rec is not None, f"no result for {group}: {report['__proc__']}"
    assert rec["ok"], rec.get("error")


@needs_triton
def test_kernels_compile_for_sm90():
    """The compiled (not interpreted) path type-checks and assembles for Hopper, without a GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(HERE), "--compile"], capture_output=True, text=True,
                          env={**env, "CUDA_VISIBLE_DEVICES": ""}, timeout=300, cwd=HERE.parents[1])
    if proc.stdout.startswith("SKIP"):
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0 and "COMPILED" in proc.stdout, proc.stderr[-3000:]


@needs_triton
def test_child_exit_status(report):
    proc = report["__proc__"]
    assert proc["rc"] == 0, proc


if __name__ == "__main__":
    sys.exit(main())
