"""The training loop as a user meets it: readable logs in files and pipes, one key set in
metrics.jsonl with elapsed time that continues across --resume, accelerate's mixed-precision
setting honoured, and a Trainer used from Python that makes its own run directory."""

from __future__ import annotations

import io
import json

import pytest
import torch
from accelerate.state import AcceleratorState

from flowdistill.api import build_distiller_for, train
from flowdistill.config import load_config
from flowdistill.data.registry import build_dataset, sample_shape_of
from flowdistill.errors import ConfigError
from flowdistill.resources import config_path
from flowdistill.training import engine
from flowdistill.training.loop import Trainer
from flowdistill.training.metrics_log import MetricsLog
from tests.helpers import TINY_TEACHER, cli


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_progress_in_a_pipe_is_plain_lines(tmp_path):
    """stderr to a pipe (not a terminal): one ``\\n``-ended progress line per log record, no tqdm
    ``\\r`` updates, no giant line."""
    out = tmp_path / "run"
    r = cli("train-teacher", f"out_dir={out}", *TINY_TEACHER, "train.steps=20", "train.ckpt_every=0",
            "train.trackers=none")
    assert r.returncode == 0, r.stderr
    err = r.stderr
    assert "\r" not in err
    lines = err.split("\n")
    progress = [ln for ln in lines if ln.startswith("train ")]
    assert [ln.split()[1] for ln in progress] == ["5/20", "10/20", "15/20", "20/20"]  # log_every=5
    assert all("loss=" in ln and "it/s" in ln for ln in progress)
    assert max(len(ln) for ln in lines) < 500


def test_progress_on_a_terminal_is_a_bar(tmp_path):
    """A terminal gets tqdm's bar (``\\r`` updates) and no plain lines."""
    cfg = load_config(None, [f"out_dir={tmp_path / 'r'}", *TINY_TEACHER, "train.steps=10",
                             "train.ckpt_every=0", "train.trackers=none"])
    source = build_dataset(cfg.data)
    trainer = Trainer(build_distiller_for(cfg, source), cfg.train, cfg.out_dir, source=source)

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    trainer.fit(progress=tty)
    assert "\r" in tty.getvalue() and "train 5/10" not in tty.getvalue()


def test_trainer_from_python_makes_its_run_directory(tmp_path):
    """``Trainer(distiller, cfg, run_dir)`` + ``fit()`` on a path that does not exist yet."""
    cfg = load_config(None, [f"out_dir={tmp_path / 'unused'}", *TINY_TEACHER, "train.steps=10",
                             "train.ckpt_every=5", "train.trackers=none"])
    source = build_dataset(cfg.data)
    run = tmp_path / "deep" / "new" / "run"
    trainer = Trainer(build_distiller_for(cfg, source), cfg.train, run, source=source,
                      sample_shape=sample_shape_of(cfg.data))
    assert not run.exists()  # nothing is written before fit()
    trainer.fit(progress=io.StringIO())
    assert [r["step"] for r in _records(run)] == [5, 10]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000005", "step-0000010"]


class _Stop(Exception):
    pass


def test_metrics_keys_equal_and_elapsed_continues_across_resume(tmp_path):
    """Two optimiser groups (FreeFlow: fake + student) and a loss term switched on later: every line
    has the same keys (null where not measured). A run stopped after its step-6 checkpoint and
    resumed keeps elapsed_s increasing across the join, from the checkpoint's elapsed time."""
    teacher = train(load_config(None, [f"out_dir={tmp_path / 'teacher'}", *TINY_TEACHER, "train.steps=10",
                                       "train.ckpt_every=0", "train.trackers=none"]))
    args = [f"out_dir={tmp_path / 'ff'}", f"teacher={teacher}", "train.steps=12", "train.batch_size=64",
            "train.log_every=2", "train.ckpt_every=3", "train.warmup_steps=0", "train.trackers=none",
            "distiller.correction_warmup=5", "train.plot_every=8"]
    cfg = load_config(config_path("freeflow_checkerboard.yaml"), args, default_distiller="freeflow")

    def stop(trainer, step):  # a stop after step 8 (the newest checkpoint is step 6)
        raise _Stop

    with pytest.raises(_Stop):
        train(cfg, on_plot=stop)
    first = _records(tmp_path / "ff")
    assert [r["step"] for r in first] == [2, 4, 6, 8]
    ck_state = json.loads((tmp_path / "ff" / "checkpoints" / "step-0000006" / "state.json").read_text())
    run = train(cfg, resume=True, on_plot=lambda trainer, step: None)
    recs = _records(run)
    assert [r["step"] for r in recs] == [2, 4, 6, 8, 10, 12]  # step 8 of the stopped run was cut
    keys = list(recs[0])
    assert all(list(r) == keys for r in recs), [list(r) for r in recs]
    assert {"fake/loss", "student/loss", "student/corr", "elapsed_s", "lr"} <= set(keys)
    assert recs[0]["student/corr"] is None and recs[-1]["student/corr"] is not None  # switched on at step 5
    elapsed = [r["elapsed_s"] for r in recs]
    assert elapsed == sorted(elapsed) and len(set(elapsed)) == len(elapsed), elapsed
    assert ck_state["elapsed_s"] >= recs[2]["elapsed_s"]  # saved after the step-6 record
    assert recs[3]["elapsed_s"] > ck_state["elapsed_s"]  # the resumed run starts from it, not from 0


def test_metrics_log_backfills_new_keys(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    log.write({"step": 1, "a": 1.0})
    log.write({"step": 2, "a": 2.0, "b": 3.0})
    log.write({"step": 3, "b": 4.0})
    assert log.read() == [{"step": 1, "a": 1.0, "b": None}, {"step": 2, "a": 2.0, "b": 3.0},
                          {"step": 3, "a": None, "b": 4.0}]
    log.truncate_after(2)
    assert MetricsLog(tmp_path / "m.jsonl").keys == ["step", "a", "b"]


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state whose precision cannot change: reset around the test."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _trainer(tmp_path, *extra) -> Trainer:
    cfg = load_config(None, [f"out_dir={tmp_path / 'r'}", *TINY_TEACHER, "train.steps=2", "train.cpu=true",
                             "train.ckpt_every=0", "train.trackers=none", *extra])
    source = build_dataset(cfg.data)
    return Trainer(build_distiller_for(cfg, source), cfg.train, cfg.out_dir, source=source)


def test_accelerate_mixed_precision_used_unless_config_says(tmp_path, monkeypatch, fresh_accelerate_state):
    """``accelerate launch --mixed_precision bf16`` (ACCELERATE_MIXED_PRECISION) with the config's
    default ``auto``: the run trains in bf16 (bf16 autocast works on the CPU); an explicit
    ``train.mixed_precision=no`` wins; unset means fp32."""
    monkeypatch.setenv(engine.ACCELERATE_PRECISION_ENV, "bf16")
    assert engine.resolve_mixed_precision("auto") == ("bf16", engine.ACCELERATE_PRECISION_ENV)
    assert engine.resolve_mixed_precision("no") == ("no", "train.mixed_precision")
    tr = _trainer(tmp_path, "train.ckpt_every=2")
    assert tr.cfg.mixed_precision == "bf16" and tr.mixed_precision == "bf16"  # resolved when loaded
    with tr.acc.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    tr.fit(progress=io.StringIO())
    state = json.loads((tmp_path / "r" / "checkpoints" / "step-0000002" / "state.json").read_text())
    assert state["mixed_precision"] == "bf16"

    AcceleratorState._reset_state(reset_partial_state=True)
    tr = _trainer(tmp_path, "train.mixed_precision=no")
    assert tr.mixed_precision == "no"
    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.delenv(engine.ACCELERATE_PRECISION_ENV)
    assert engine.resolve_mixed_precision("auto") == ("no", "default")
    assert _trainer(tmp_path).mixed_precision == "no"


def test_accelerate_precision_errors(monkeypatch):
    """fp16 from accelerate's setting on the CPU is the same config error as an explicit fp16; a
    setting flowdistill does not train in is named."""
    monkeypatch.setenv(engine.ACCELERATE_PRECISION_ENV, "fp16")
    with pytest.raises(ConfigError, match="fp16 needs CUDA .*ACCELERATE_MIXED_PRECISION=fp16"):
        engine.build_accelerator(True, "auto", "auto")
    with pytest.raises(ConfigError, match="fp16 needs CUDA .*ACCELERATE_MIXED_PRECISION=fp16"):
        load_config(None, ["out_dir=x", "train.cpu=true"])  # when the config is loaded
    monkeypatch.setenv(engine.ACCELERATE_PRECISION_ENV, "fp8")
    with pytest.raises(ConfigError, match="ACCELERATE_MIXED_PRECISION=fp8"):
        engine.resolve_mixed_precision("auto")
    with pytest.raises(ConfigError, match="train.mixed_precision must be one of auto, no, bf16, fp16"):
        engine.resolve_mixed_precision("fp32")
