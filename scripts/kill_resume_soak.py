"""Kill a training run with SIGKILL at random moments, resume it each time, compare the end.

Each round starts (or resumes) the tiny checkerboard teacher under 1 process or torchrun with N
gloo processes, checkpointing every step (so many kills land inside a checkpoint write), kills
the whole process group after a random delay, and counts whether a temporary checkpoint
directory was left (a kill during a write). When the kills are used up the run is resumed to the
end and its exported weights are compared with an uninterrupted one-process run.

    python scripts/kill_resume_soak.py --kills 8 --nproc 1
    python scripts/kill_resume_soak.py --kills 5 --nproc 2
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARGS = ["model.name=mlp", "model.params.hidden=64", "model.params.depth=2", "data.name=checkerboard",
        "train.batch_size=256", "train.log_every=5", "train.ema_decay=0.99", "train.lr_schedule=cosine",
        "train.steps=800", "train.ckpt_every=1", "train.keep_checkpoints=2", "train.cpu=true",
        "train.trackers=none"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1"}


def _cmd(nproc: int, out: Path, resume: bool) -> list[str]:
    worker = [str(REPO / "tests" / "dist_train_worker.py"), f"out_dir={out}", *ARGS]
    if resume:
        worker.append("--resume")
    if nproc == 1:
        return [sys.executable, *worker]
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(port), *worker]


def main() -> None:
    """Run the soak and print one line per kill and the final comparison."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=8)
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from flowdistill.training.checkpoint import list_checkpoints
    from tests.helpers import kill_tree, student_weights

    rnd = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="soak-"))
    ref, run = root / "ref", root / "run"
    subprocess.run(_cmd(1, ref, False), env=ENV, check=True, capture_output=True)
    during_write = 0
    for k in range(args.kills):
        p = subprocess.Popen(_cmd(args.nproc, run, k > 0 and run.exists()), env=ENV, cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        def newest() -> int:
            cks = list_checkpoints(run / "checkpoints")
            return int(cks[-1].name.split("-")[1]) if cks else -1

        before = newest()
        t0 = time.time()
        while time.time() - t0 < 120 and newest() <= before and p.poll() is None:
            time.sleep(0.01)  # until this round has written a checkpoint of its own
        time.sleep(rnd.uniform(0.0, 1.0))
        if p.poll() is not None:
            print(f"kill {k}: run had already ended (rc {p.returncode})")
            break
        kill_tree(p.pid)  # torchrun and its workers (they run in sessions of their own)
        p.wait()
        tmp = [q.name for q in (run / "checkpoints").iterdir() if q.name.startswith(".tmp-")] \
            if (run / "checkpoints").is_dir() else []
        during_write += bool(tmp)
        steps = [int(c.name.split("-")[1]) for c in list_checkpoints(run / "checkpoints")]
        print(f"kill {k}: complete checkpoints {steps}, temporary dirs left {tmp}")
    subprocess.run(_cmd(args.nproc, run, True), env=ENV, cwd=REPO, check=True, capture_output=True)
    a, b = student_weights(ref), student_weights(run)
    worst = max((a[key] - b[key]).abs().max().item() for key in a)
    left = [q.name for q in (run / "checkpoints").iterdir() if q.name.startswith(".tmp-")]
    print("| processes | kills | kills during a checkpoint write | max |w - w_ref| | temp dirs left |")
    print(f"| {args.nproc} | {args.kills} | {during_write} | {worst:.2e} | {len(left)} |")


if __name__ == "__main__":
    main()
