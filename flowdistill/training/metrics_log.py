"""Append-only JSON-lines metrics log that survives crashes and resumes.

Every line of ``metrics.jsonl`` has the same keys, in the same order: a metric that a record
does not measure (an optimiser group not due at that step, a loss term switched on later) is
``null`` there. When a new metric first appears, the lines already written get it as ``null``
(the file is rewritten through a temporary file and a rename, so a kill leaves either version).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from flowdistill.atomic import atomic_write_text


class MetricsLog:
    """One JSON object per line in ``metrics.jsonl``; flushed and fsynced on every write."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._keys: list[str] | None = None  # the file's keys, read from it on first use

    @property
    def keys(self) -> list[str]:
        """The keys every record of the file has (in order)."""
        if self._keys is None:
            self._keys = []
            for rec in self.read():
                self._keys += [k for k in rec if k not in self._keys]
        return list(self._keys)

    def truncate_after(self, step: int) -> None:
        """Drop records of steps beyond ``step`` (after a resume from that step)."""
        if not self.enabled or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if rec.get("step", 0) <= step:
                keep.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in keep))
        self._keys = None

    def _line(self, record: dict[str, Any]) -> str:
        return json.dumps({k: record.get(k) for k in self.keys})

    def write(self, record: dict[str, Any]) -> dict[str, Any]:
        """Append one record; returns it as written (every key of the file, ``None`` where unmeasured)."""
        if not self.enabled:
            return dict(record)
        keys = self.keys
        new = [k for k in record if k not in keys]
        if new:
            self._keys = keys + new
            old = self.read()
            if old:  # earlier lines get the new keys as null
                self._rewrite(old)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(self._line(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return {k: record.get(k) for k in self._keys}

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        atomic_write_text(self.path, "".join(self._line(r) + "\n" for r in records))

    def read(self) -> list[dict[str, Any]]:
        """All complete records."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return out
