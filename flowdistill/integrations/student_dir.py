"""Where a diffusers pipeline run keeps its student, found without importing torch or diffusers
(the CLI asks this of every run it samples, evaluates or exports).

A pipeline run's ``RUN/student/`` — and a ``flowdistill export`` of it — holds ``flowdistill.json``
with ``"format": STUDENT_FORMAT`` beside the LoRA weights, the scheduler config and, for two-time
students, ``second_time.safetensors`` (:mod:`flowdistill.integrations.diffusers.render`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: ``flowdistill.json`` ``format`` of a pipeline run's ``student/`` directory (and of an export of it)
STUDENT_FORMAT = "flowdistill-pipeline-student-v1"


def student_dir_of(run_dir: str | Path) -> Path | None:
    """The directory holding a pipeline student: ``RUN/student`` of a pipeline run, or ``RUN`` itself
    when it is such a directory (a run's ``student/`` or an export); ``None`` for any other run."""
    for d in (Path(run_dir) / "student", Path(run_dir)):
        f = d / "flowdistill.json"
        if f.is_file():
            try:
                meta = json.loads(f.read_text())
            except ValueError:
                return None
            return d if isinstance(meta, dict) and meta.get("format") == STUDENT_FORMAT else None
    return None


def read_student_meta(student_dir: str | Path) -> dict[str, Any]:
    """The ``flowdistill.json`` of a pipeline student directory."""
    return json.loads((Path(student_dir) / "flowdistill.json").read_text())
