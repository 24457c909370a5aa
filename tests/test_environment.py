"""The test environment conftest.py promises: a fixed thread count in-process and in subprocesses."""

import subprocess
import sys

import torch

from tests.conftest import TEST_THREADS


def test_fixed_thread_count_in_process_and_in_subprocesses():
    """torch uses TEST_THREADS here, and a plain subprocess (no env passed explicitly) inherits it."""
    assert torch.get_num_threads() == TEST_THREADS
    r = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                       capture_output=True, text=True, timeout=120, check=True)
    assert int(r.stdout.strip()) == TEST_THREADS
