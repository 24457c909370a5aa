"""Small configs and utilities shared by tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]

TINY_TEACHER = [
    "model.name=mlp", "model.params.hidden=64", "model.params.depth=2",
    "data.name=checkerboard", "train.batch_size=256", "train.lr=1e-3", "train.log_every=5",
    "train.ema_decay=0.99", "train.lr_schedule=cosine",
]

#: The tiny checkerboard teacher of the CLI input tests (test_cli_input.py, test_cli_runs.py,
#: test_cli_plugin.py).
TINY = [
    "model.name=mlp",
    "model.params.hidden=32",
    "model.params.depth=1",
    "data.name=checkerboard",
    "train.batch_size=64",
    "train.log_every=1",
    "train.lr=1e-3",
]


def cli(*args: str, env: dict | None = None, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """Run ``python -m flowdistill.cli ARGS`` and capture its output."""
    e = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "flowdistill.cli", *args], capture_output=True,
                          text=True, env=e, timeout=timeout, cwd=REPO, **kw)


def student_weights(run_dir: Path) -> dict:
    """The exported student's tensors."""
    return load_file(str(Path(run_dir) / "student" / "diffusion_pytorch_model.safetensors"))


def free_port() -> int:
    """A TCP port free right now (for torchrun rendezvous; a fixed port collides with parallel runs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main_in_process(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``flowdistill.cli.main(ARGS)`` in this process: ``(exit status, stdout, stderr)``.

    ``main`` returns the status for errors it handles; argparse errors raise ``SystemExit(2)``
    after printing, so both are turned into the status a shell would see. ``capsys`` is pytest's
    fixture; what was captured before the call is discarded.
    """
    from flowdistill.cli import main

    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """``main(argv)`` in-process: (exit status, stdout, stderr); argparse's SystemExit is caught."""
    from flowdistill.cli import main

    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(result: tuple[int, str, str], *needles: str) -> str:
    """Assert status 2 and a single ``error:`` line on stderr holding every needle; return the line."""
    rc, out, err = result
    assert rc == 2, (rc, out, err)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (and ``root`` itself): file bytes, ``None`` for a directory."""
    root = Path(root)
    if not root.exists():
        return {}
    if root.is_file():
        return {".": root.read_bytes()}
    snap: dict[str, bytes | None] = {".": None}
    for p in sorted(root.rglob("*")):
        snap[str(p.relative_to(root))] = None if p.is_dir() else p.read_bytes()
    return snap


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every descendant at once (torchrun starts its workers in sessions of
    their own, so killing torchrun's process group would leave them running)."""
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny nets: one intra-op thread is faster and immune to an oversubscribed CPU (a test module
    opts in with ``from tests.helpers import single_thread  # noqa: F401``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
