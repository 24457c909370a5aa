"""flowdistill.atomic: a write that fails leaves the old file or directory as it was, a finished one
replaces it whole, and the temporaries of a killed writer are recognised and removed."""

from __future__ import annotations

import pytest

from flowdistill.atomic import (
    atomic_dir,
    atomic_file,
    atomic_write_json,
    atomic_write_text,
    clean_temporaries,
)


def test_a_failed_file_write_keeps_the_old_file_and_leaves_nothing_behind(tmp_path):
    f = tmp_path / "a.txt"
    atomic_write_text(f, "old")
    with pytest.raises(RuntimeError), atomic_file(f) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert f.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    atomic_write_json(f, {"b": 1, "a": 2}, sort_keys=True)
    assert f.read_text() == '{\n  "a": 2,\n  "b": 1\n}'


def test_a_directory_is_replaced_whole_or_not_at_all(tmp_path):
    d = tmp_path / "student"
    with atomic_dir(d) as tmp:
        (tmp / "w").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(d) as tmp:
        (tmp / "w").write_text("2")
        raise RuntimeError("killed")
    assert (d / "w").read_text() == "1"
    with atomic_dir(d) as tmp:
        (tmp / "v").write_text("3")
    assert sorted(p.name for p in d.iterdir()) == ["v"]  # the old content went with the old dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]


def test_leftovers_of_killed_writers_are_cleaned(tmp_path):
    (tmp_path / ".a.txt.tmp-123").write_text("x")
    (tmp_path / ".student.tmp-9").mkdir()
    (tmp_path / ".tmp-step-0000010-7").mkdir()  # the checkpoint writer's older naming
    (tmp_path / "keep.tmp-1").write_text("not hidden: not ours")
    gone = clean_temporaries(tmp_path)
    assert len(gone) == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["keep.tmp-1"]
