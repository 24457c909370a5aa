"""Trackers through accelerate: TensorBoard gets the same scalars as metrics.jsonl, and the
progress plots as images."""

import json

import pytest

from flowdistill.api import train
from flowdistill.config import load_config
from flowdistill.errors import ConfigError
from flowdistill.training.trackers import resolve_trackers
from tests.helpers import TINY_TEACHER

pytest.importorskip("tensorboard")  # a dev dependency: installed wherever the suite runs in CI


def _events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # trackers/flowdistill/ holds the run's events; a sub-folder holds the hyper-parameters
    files = sorted((run_dir / "trackers" / "flowdistill").glob("events.out.tfevents.*"))
    assert files, "no TensorBoard event file was written"
    acc = EventAccumulator(str(files[0].parent), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_tensorboard_scalars_match_metrics_and_plots_are_images(tmp_path):
    out = train(load_config(None, [f"out_dir={tmp_path / 'r'}", *TINY_TEACHER, "train.steps=20",
                                   "train.ckpt_every=0", "train.plot_every=10", "train.trackers=tensorboard",
                                   "eval.nfe=[1,4]"]))
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ev = _events(out)
    loss = {e.step: e.value for e in ev.Scalars("loss")}
    assert sorted(loss) == [r["step"] for r in recs] == [5, 10, 15, 20]
    for r in recs:  # the event file stores float32
        assert loss[r["step"]] == pytest.approx(r["loss"], rel=1e-6)
    images = ev.Images("samples")
    assert [im.step for im in images] == [10, 20]
    assert images[0].width > 100 and images[0].height > 100
    assert (out / "plots" / "step-0000010.png").is_file()


def test_tracker_names_resolve_or_fail_clearly():
    assert resolve_trackers("none") == []
    assert resolve_trackers("auto") == ["tensorboard"]  # tensorboard is installed here
    with pytest.raises(ConfigError, match="unknown tracker 'nope'"):
        resolve_trackers("nope")
