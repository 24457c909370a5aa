"""``flowdistill stream``: a tiny trained StreamDiT run streams a GIF with the requested frame count
(and a grid PNG); bad outputs and non-streaming runs are one-line errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from PIL import Image

from flowdistill.api import train
from flowdistill.config import load_config
from tests.helpers import main_in_process
from tests.test_streamdit import TINY


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A StreamDiT run trained for 2 steps (the stream's content does not matter here)."""
    out = tmp_path_factory.mktemp("stream") / "run"
    train(load_config(None, [f"out_dir={out}", *TINY, "train.steps=2"]))
    return out


def test_stream_writes_a_gif_with_the_requested_frames(run_dir, tmp_path, capsys):
    gif, grid = tmp_path / "clip.gif", tmp_path / "frames.png"
    code, out, err = main_in_process(capsys, "stream", str(run_dir), "--frames", "13", "--n", "2",
                                     "--seed", "1", "--out", str(gif), "--grid", str(grid))
    assert code == 0, err
    with Image.open(gif) as im:
        assert im.n_frames == 13
    assert grid.is_file() and grid.stat().st_size > 0
    assert "frames per network call" in out and "frames per second" in out


def test_stream_solver_heun_doubles_the_calls(run_dir, tmp_path, capsys):
    """``--solver heun`` streams the teacher with two network calls per step (the printed count)."""
    calls = {}
    for solver in ("euler", "heun"):
        code, out, err = main_in_process(capsys, "stream", str(run_dir), "--frames", "6", "--solver", solver,
                                         "--out", str(tmp_path / f"{solver}.gif"))
        assert code == 0, err
        calls[solver] = int(out.split(": ")[1].split(" network calls")[0])
    assert calls["heun"] == 2 * calls["euler"] > 0


def test_stream_errors_are_one_line(run_dir, tmp_path, capsys):
    code, _, err = main_in_process(capsys, "stream", str(run_dir), "--out", str(tmp_path / "clip.avi"))
    assert code == 2 and err.strip().startswith("error:") and ".gif or .mp4" in err
    code, _, err = main_in_process(capsys, "stream", str(run_dir), "--teacher-steps",
                                   "--out", str(tmp_path / "c.gif"))
    assert code == 2 and "--teacher-steps" in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(importlib.util.find_spec("imageio_ffmpeg") is not None
                    or importlib.util.find_spec("av") is not None, reason="an MP4 encoder is installed")
def test_mp4_without_an_encoder_is_a_clear_error(run_dir, tmp_path, capsys):
    code, _, err = main_in_process(capsys, "stream", str(run_dir), "--frames", "4",
                                   "--out", str(tmp_path / "clip.mp4"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error:")
    assert not (tmp_path / "clip.mp4").exists()
