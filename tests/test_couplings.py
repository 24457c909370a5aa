"""Coupling generation and the coupling store: process-count independence, kill/resume,
refusal of corrupt or foreign shards, and process-independent batches."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flowdistill.api import couple_teacher
from flowdistill.cli import main as cli_main
from flowdistill.core.guidance import GuidanceSpec
from flowdistill.core.rng import StepRNG
from flowdistill.data.coupling_generation import CoupleSpec, shard_inputs
from flowdistill.data.couplings import (
    MANIFEST,
    CouplingError,
    CouplingSource,
    CouplingStore,
    CouplingStream,
    add_shard,
    read_manifest,
    shard_name,
    state_sha256,
    write_shard,
)
from flowdistill.errors import ConfigError
from flowdistill.models.mlp import MLPFlowNet
from tests.helpers import REPO

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1"}


def tiny_teacher(path: Path, seed: int = 0) -> Path:
    """A random (untrained) velocity net saved like a teacher: enough to exercise the store."""
    torch.manual_seed(seed)
    MLPFlowNet(data_dim=2, hidden=32, depth=2).save_pretrained(str(path), safe_serialization=True)
    return path


def cli_args(out: Path, teacher: Path, spec: dict) -> list[str]:
    return ["distiller.name=reflow", f"out_dir={out}", f"teacher={teacher}", "data.name=checkerboard",
            *(f"distiller.couple.{k}={v}" for k, v in spec.items())]


def files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.glob("shard-*.safetensors"))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    d = tmp_path_factory.mktemp("teachers")
    return tiny_teacher(d / "a", 0), tiny_teacher(d / "b", 1)


SMALL = {"n_pairs": 230, "shard_size": 50, "chunk_size": 25, "solver": "rk4", "nfe": 8, "seed": 5}


@pytest.fixture
def small_store(tmp_path, teachers):
    root = couple_teacher(teachers[0], tmp_path / "a", CoupleSpec(**SMALL), (2,), progress=False)
    return root


def test_two_processes_give_byte_identical_store(tmp_path, teachers):
    spec = {"n_pairs": 650, "shard_size": 100, "chunk_size": 40, "solver": "dopri5", "rtol": 1e-4,
            "atol": 1e-4, "seed": 3}
    # the same numerical environment as the workers (OMP_NUM_THREADS=1): CPU GEMMs may sum in a
    # different order with another thread count, and an adaptive solver amplifies the last bit
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = couple_teacher(teachers[0], tmp_path / "one" / "couplings", CoupleSpec(**spec), (2,),
                                 progress=False)
    finally:
        torch.set_num_threads(threads)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(free_port()), "-m", "flowdistill.cli", "couple",
                        *cli_args(tmp_path / "two", teachers[0], spec)],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "couple[0/2]" in r.stderr  # really two processes
    a, b = files(one), files(tmp_path / "two" / "couplings")
    assert list(a) == [shard_name(k) for k in range(7)]
    assert a == b  # byte-identical shards
    ma, mb = read_manifest(one), read_manifest(tmp_path / "two" / "couplings")
    assert ma["shards"] == mb["shards"] and mb["complete"]
    data = CouplingStore(tmp_path / "two" / "couplings").load_all()
    assert data["sample"].shape == (650, 2)
    assert not torch.allclose(data["sample"], data["noise"])  # the teacher moved the points
    # shard k's noise is its own seeded draw, whoever wrote it
    noise3, _ = shard_inputs(CoupleSpec(**spec), 3, (2,), 0)
    assert torch.equal(data["noise"][300:400], noise3)


def test_sigkill_then_resume_gives_exactly_the_requested_pairs(tmp_path, teachers):
    spec = {"n_pairs": 2000, "shard_size": 50, "chunk_size": 50, "solver": "rk4", "nfe": 64, "seed": 11}
    out = tmp_path / "killed"
    root = out / "couplings"
    p = subprocess.Popen([sys.executable, "-m", "flowdistill.cli", "couple",
                          *cli_args(out, teachers[0], spec)], cwd=REPO, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    listed = 0
    while time.time() < deadline and p.poll() is None:
        if (root / MANIFEST).is_file():
            listed = len(json.loads((root / MANIFEST).read_text())["shards"])
            if listed >= 3:
                break
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    man = read_manifest(root)
    assert 3 <= len(man["shards"]) < 40 and not man["complete"], "kill came too late to test resume"
    CouplingStore(root, require_complete=False).verify()  # every listed shard is complete and valid
    with pytest.raises(CouplingError, match="incomplete"):
        CouplingStore(root)
    # what a kill mid-write leaves: a temp file, and an unlisted (half-written) shard
    (root / f".{shard_name(39)}.tmp-123").write_bytes(b"partial")
    (root / shard_name(38)).write_bytes(b"garbage")
    (root / f".{MANIFEST}.tmp-456").write_text('{"half": ')  # a kill during a manifest update
    assert cli_main(["couple", *cli_args(out, teachers[0], spec), "--resume"]) == 0
    store = CouplingStore(root)
    store.verify()
    assert store.load_all()["sample"].shape[0] == 2000
    assert not list(root.glob(".*tmp*"))
    ref = couple_teacher(teachers[0], tmp_path / "ref", CoupleSpec(**spec), (2,), progress=False)
    assert files(ref) == files(root)


def test_corrupt_and_foreign_shards_are_refused_by_name(tmp_path, teachers, small_store):
    root = small_store
    CouplingStore(root).verify()
    # 1. a flipped byte: checksum mismatch, naming the shard
    f1 = root / shard_name(1)
    raw = bytearray(f1.read_bytes())
    raw[-3] ^= 0xFF
    f1.write_bytes(bytes(raw))
    src = CouplingSource(CouplingStore(root))  # lazy: nothing is read yet
    assert src.get_many(torch.tensor([0, 49, 100]))["x"].shape == (3, 2)  # shards 0 and 2 are fine
    with pytest.raises(CouplingError, match=r"shard-000001\.safetensors: checksum mismatch"):
        src.get_many(torch.tensor([0, 60]))  # a batch that needs a row of shard 1
    # resume repairs it (and only it)
    before = files(root)
    couple_teacher(teachers[0], root, CoupleSpec(**SMALL), (2,), resume=True, progress=False)
    after = files(root)
    assert after[shard_name(1)] != bytes(raw)
    assert {k: v for k, v in after.items() if k != shard_name(1)} == \
        {k: v for k, v in before.items() if k != shard_name(1)}
    CouplingStore(root).verify()
    # 2. wrong shape with a matching checksum in the manifest
    good = CouplingStore(root).load_shard(2)
    meta = {"format": "flowdistill-couplings/1", "index": "2", "count": "50",
            "teacher_sha256": read_manifest(root)["teacher_sha256"],
            "teacher_state_sha256": read_manifest(root)["teacher_state_sha256"], "seed": "5"}
    rec = write_shard(root, 2, {"noise": good["noise"][:, :1].contiguous(), "sample": good["sample"]}, meta)
    add_shard(root, rec)
    with pytest.raises(CouplingError, match=r"shard-000002\.safetensors: tensor 'noise' has shape \[50, 1\]"):
        CouplingStore(root).load_shard(2)
    # 3. a shard of another teacher (its own record copied along, so the checksum matches)
    other = couple_teacher(teachers[1], tmp_path / "b", CoupleSpec(**SMALL), (2,), progress=False)
    (root / shard_name(3)).write_bytes((other / shard_name(3)).read_bytes())
    add_shard(root, next(s for s in read_manifest(other)["shards"] if s["index"] == 3))
    with pytest.raises(CouplingError, match=r"shard-000003\.safetensors: made by another teacher"):
        CouplingStore(root).load_shard(3)
    # 4. a missing file
    (root / shard_name(4)).unlink()
    with pytest.raises(CouplingError, match=r"shard-000004\.safetensors: file missing"):
        CouplingStore(root).load_shard(4)
    # 5. the whole store checked against the teacher that is supposed to have made it
    with pytest.raises(CouplingError, match="generated by another teacher"):
        CouplingStore(other, teacher_state_sha256=state_sha256(MLPFlowNet.from_pretrained(str(teachers[0]))))
    CouplingStore(other, teacher_state_sha256=state_sha256(MLPFlowNet.from_pretrained(str(teachers[1]))))


def test_couple_cli_refuses_to_clobber_or_mix_settings(tmp_path, teachers, capsys):
    spec = dict(SMALL)
    args = cli_args(tmp_path / "run", teachers[0], spec)
    assert cli_main(["couple", *args]) == 0
    assert cli_main(["couple", *args]) == 2
    assert "already holds couplings" in capsys.readouterr().err
    assert cli_main(["couple", *args, "distiller.couple.seed=6", "--resume"]) == 2
    assert "coupling setting 'seed' differs" in capsys.readouterr().err
    assert cli_main(["couple", *args, f"teacher={teachers[1]}", "--resume"]) == 2
    assert "teacher_sha256" in capsys.readouterr().err
    # n_pairs may grow on resume: only the new/short shards are (re)made
    before = files(tmp_path / "run" / "couplings")
    assert cli_main(["couple", *args, "distiller.couple.n_pairs=300", "--resume"]) == 0
    after = files(tmp_path / "run" / "couplings")
    assert len(after) == 6 and all(after[k] == before[k] for k in [shard_name(i) for i in range(4)])
    assert CouplingStore(tmp_path / "run" / "couplings").load_all()["sample"].shape[0] == 300
    assert cli_main(["couple", *args, "distiller.couple.n_pairs=300", "--overwrite"]) == 0
    bad = ["couple", "distiller.name=flow_matching", f"out_dir={tmp_path}/x", f"teacher={teachers[0]}"]
    assert cli_main(bad) == 2
    assert "does not train on couplings" in capsys.readouterr().err


def test_batches_and_streams_do_not_depend_on_process_count(small_store):
    src = CouplingSource(CouplingStore(small_store))
    full = src.local_batch(StepRNG(0, 7).generator(), 0, 1, 64)
    parts = [src.local_batch(StepRNG(0, 7).generator(), r, 4, 16) for r in range(4)]
    for k in ("x", "noise"):
        assert torch.equal(full[k], torch.cat([p[k] for p in parts]))
    # the lazily read rows are the store's rows at the drawn indices: pairs stay paired
    data = CouplingStore(small_store).load_all()
    idx = torch.randint(len(src), (64,), generator=StepRNG(0, 7).generator())
    assert torch.equal(full["x"], data["sample"][idx]) and torch.equal(full["noise"], data["noise"][idx])
    store = CouplingStore(small_store)
    seen = [torch.stack([d["noise"] for d in CouplingStream(store, rank=r, world=2, seed=1)])
            for r in range(2)]
    allrows = torch.cat(seen)
    assert allrows.shape[0] == 230
    assert torch.unique(allrows, dim=0).shape[0] == 230


def test_coupling_source_reads_only_the_shards_a_batch_touches(small_store, monkeypatch):
    """Lazy source: nothing read at construction; a batch opens (and checksums, once) only its
    shards; a corrupt shard fails the batch that needs it, not the others."""
    import pickle

    import flowdistill.data.couplings as couplings

    opened, hashed = [], []
    real_open, real_hash = couplings.safe_open, couplings.file_sha256

    def counting_open(path, *a, **kw):
        opened.append(Path(path).name)
        return real_open(path, *a, **kw)

    def counting_hash(path, *a, **kw):
        hashed.append(Path(path).name)
        return real_hash(path, *a, **kw)

    monkeypatch.setattr(couplings, "safe_open", counting_open)
    monkeypatch.setattr(couplings, "file_sha256", counting_hash)
    src = CouplingSource(CouplingStore(small_store))
    assert len(src) == 230 and opened == [] and hashed == []
    idx = torch.tensor([110, 3, 149, 7, 3])  # shard_size 50: rows of shards 2 and 0 only
    got = src.get_many(idx)
    assert sorted(set(opened)) == sorted(set(hashed)) == [shard_name(0), shard_name(2)]
    assert len(hashed) == 2
    again = src.get_many(torch.tensor([0, 120]))
    assert len(hashed) == 2  # each shard verified once, when first opened
    data = CouplingStore(small_store).load_all()
    assert torch.equal(got["x"], data["sample"][idx]) and torch.equal(got["noise"], data["noise"][idx])
    assert torch.equal(again["x"], data["sample"][[0, 120]])
    assert torch.equal(src[149]["noise"], data["noise"][149])
    # a copy for a DataLoader worker carries no open handles and reads the same rows
    clone = pickle.loads(pickle.dumps(src))
    assert clone._open == {} and torch.equal(clone.get_many(idx)["x"], got["x"])
    # corrupt the last shard (rows 200..229): batches elsewhere still work, one that needs it fails
    f4 = small_store / shard_name(4)
    raw = bytearray(f4.read_bytes())
    raw[-5] ^= 0xFF
    f4.write_bytes(bytes(raw))
    fresh = CouplingSource(CouplingStore(small_store))
    assert torch.equal(fresh.get_many(torch.tensor([5, 160]))["x"], data["sample"][[5, 160]])
    with pytest.raises(CouplingError, match=r"shard-000004\.safetensors: checksum mismatch"):
        fresh.get_many(torch.tensor([5, 210]))


def test_conditional_guided_store_keeps_labels_and_null_share(tmp_path):
    torch.manual_seed(0)
    MLPFlowNet(data_dim=2, hidden=32, depth=2, num_classes=8).save_pretrained(str(tmp_path / "t"))
    spec = CoupleSpec(n_pairs=400, shard_size=200, chunk_size=100, solver="euler", nfe=4, uncond_share=0.25)
    cfg = GuidanceSpec(scale=2.0)
    root = couple_teacher(tmp_path / "t", tmp_path / "c", spec, (2,), conditional=True, progress=False,
                              guidance=cfg)
    src = CouplingSource(CouplingStore(root))
    assert src.num_classes == 8 and len(src) == 400
    everything = src.get_many(torch.arange(400))
    assert everything["cond"].shape == (400,) and everything["cond"].dtype == torch.long
    null = (everything["cond"] == 8).float().mean().item()
    assert 0.15 < null < 0.35 and set(everything["cond"].unique().tolist()) == set(range(9))
    assert set(src.local_batch(StepRNG(0, 0).generator(), 0, 1, 16)) == {"x", "noise", "cond"}
    # guidance changed the pairs: an unguided store of the same noise differs
    plain = couple_teacher(tmp_path / "t", tmp_path / "p", spec, (2,), conditional=True, progress=False)
    p = CouplingStore(plain).load_all()
    assert torch.equal(p["noise"], everything["noise"]) and torch.equal(p["cond"], everything["cond"])
    assert not torch.allclose(p["sample"], everything["x"])
    with pytest.raises(ConfigError, match="guidance.scale=2.0 needs a class-conditional teacher"):
        couple_teacher(tmp_path / "t", tmp_path / "u", spec, (2,), conditional=False, progress=False,
                           guidance=cfg)
    # the store records its guidance: resuming it with other guidance is refused, with the same resumes
    with pytest.raises(CouplingError, match="'guidance' differs"):
        couple_teacher(tmp_path / "t", root, spec, (2,), conditional=True, progress=False, resume=True)
    assert read_manifest(root)["guidance"]["scale"] == 2.0
    couple_teacher(tmp_path / "t", root, spec, (2,), conditional=True, progress=False, resume=True,
                       guidance=cfg)
