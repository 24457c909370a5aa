"""Atomic checkpoints: complete ones load, interrupted writes are never picked up."""

import pytest
import torch

from flowdistill.errors import CheckpointError
from flowdistill.training import checkpoint as ck


def _state():
    return {"w": torch.randn(3, 4), "b": torch.zeros(4)}


def test_round_trip_and_retention(tmp_path):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.randn(2))])
    for step in (10, 20, 30):
        ck.save_checkpoint(tmp_path, step, _state(), {"student": opt.state_dict()}, keep=2)
    names = [p.name for p in ck.list_checkpoints(tmp_path)]
    assert names == ["step-0000020", "step-0000030"]
    loaded = ck.load_checkpoint(ck.latest_checkpoint(tmp_path))
    assert loaded["step"] == 30 and set(loaded["model"]) == {"w", "b"}
    assert "student" in loaded["optim"]


def test_interrupted_write_is_ignored(tmp_path, monkeypatch):
    ck.save_checkpoint(tmp_path, 5, _state(), {})

    def boom(*a, **k):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ck.torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path, 6, _state(), {"student": {"x": 1}})
    # an error mid-write removes the half-written one; only complete checkpoints are listed
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-0000005"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000005"]
    # a SIGKILL leaves the temporary (no cleanup runs): it is not listed, and resume removes it
    (tmp_path / ".step-0000006.tmp-4242").mkdir()
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-0000005"]
    assert [p.name for p in ck.clean_temporaries(tmp_path)] == [".step-0000006.tmp-4242"]


def test_corrupt_and_missing(tmp_path):
    p = ck.save_checkpoint(tmp_path, 1, _state(), {})
    (p / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt"):
        ck.load_checkpoint(p)
    (p / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing model.safetensors"):
        ck.load_checkpoint(p)
    with pytest.raises(CheckpointError, match="does not exist"):
        ck.load_checkpoint(tmp_path / "step-9999999")
