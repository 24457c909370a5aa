"""Shared test settings: deterministic, one intra-op thread, offline.

Threads: CPU kernels (MKL sgemm, oneDNN convolutions) may split a reduction differently with a
different thread count, so a result computed with 2 threads can differ in the last float32 bits
from one computed with 64. Every test therefore runs with ``TEST_THREADS`` intra-op threads, not
the machine's core count: ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` are set in the environment
before torch is imported (so they also hold for every subprocess a test starts: CLI runs, torchrun
workers, coupling workers, which already ask for 1) and ``torch.set_num_threads`` is applied in
case torch was imported first (by a plugin). One thread is also what the subprocess workers use,
so in-process and worker results are computed the same way, and parallel test processes on a
small shared machine do not oversubscribe it. ``FLOWDISTILL_TEST_THREADS`` overrides the count.
"""

import os

TEST_THREADS = int(os.environ.get("FLOWDISTILL_TEST_THREADS", "1"))
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(TEST_THREADS)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# train.mixed_precision defaults to accelerate's own setting: tests train in the precision they name
os.environ.pop("ACCELERATE_MIXED_PRECISION", None)
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(TEST_THREADS)


@pytest.fixture(autouse=True)
def _seed():
    """Seed torch's global generator before every test; restore the thread count a test changed."""
    torch.manual_seed(0)
    yield
    if torch.get_num_threads() != TEST_THREADS:
        torch.set_num_threads(TEST_THREADS)
