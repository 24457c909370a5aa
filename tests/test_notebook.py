"""The quickstart notebook runs end to end (small settings) and its 1-step student beats the teacher.

Executes ``notebooks/quickstart.ipynb`` with nbclient in a ``python3`` kernel, with
``FLOWDISTILL_NOTEBOOK_QUICK=1``, then reads the ``RESULT student1=<x> teacher1=<y>`` line that its
last cell prints. Skipped when nbclient/nbformat or a ``python3`` kernel is not installed.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
RESULT = re.compile(r"RESULT student1=(\S+) teacher1=(\S+)")

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


def _kernel_available(name: str = "python3") -> bool:
    try:
        from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    except ImportError:
        return False
    try:
        KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel:
        return False
    return True


def _stream_text(cell) -> str:
    """Concatenated stdout of a code cell."""
    return "".join(o.get("text", "") for o in cell.get("outputs", [])
                   if o.get("output_type") == "stream" and o.get("name") == "stdout")


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has no code cells"
    assert all(not c.outputs and c.execution_count is None for c in code)
    assert "QUICK = True" in code[0].source and "FLOWDISTILL_NOTEBOOK_QUICK" in code[0].source


@pytest.mark.skipif(not _kernel_available(), reason="no 'python3' jupyter kernel installed")
def test_quickstart_notebook_runs_and_student_beats_teacher(tmp_path, monkeypatch):
    # the kernel inherits this environment: small settings, one thread per op (shared CPUs)
    monkeypatch.setenv("FLOWDISTILL_NOTEBOOK_QUICK", "1")
    monkeypatch.delenv("FLOWDISTILL_NOTEBOOK_TEACHER", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError (with the traceback) if any cell fails

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    assert "QUICK=True" in _stream_text(code[0])
    errors = [o for c in code for o in c.outputs if o.get("output_type") == "error"]
    assert not errors
    # the two plot cells rendered inline figures
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 2

    match = RESULT.search(_stream_text(code[-1]))
    assert match, f"no RESULT line in the last cell's output: {_stream_text(code[-1])!r}"
    student1, teacher1 = float(match.group(1)), float(match.group(2))
    assert math.isfinite(student1) and math.isfinite(teacher1)
    assert student1 < teacher1, (student1, teacher1)
    assert not list(tmp_path.iterdir()), "the notebook left files in its working directory"
