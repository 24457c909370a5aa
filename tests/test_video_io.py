"""GIF / frame-grid writing round-trips; mp4 without an encoder is a clear error."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from flowdistill.errors import ConfigError
from flowdistill.eval.video_io import load_gif, save_frame_grid, save_gif, save_mp4, save_video


def _clip(frames=6, rows=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (frames, 1, 8, 8) if rows is None else (rows, frames, 1, 8, 8)
    return torch.rand(shape, generator=g) * 2 - 1


def test_gif_round_trip_keeps_frames_to_one_grey_level(tmp_path):
    x = _clip()
    y = load_gif(save_gif(x, tmp_path / "a.gif", scale=1, pad=0))
    assert y.shape == x.shape
    assert (y - x).abs().max() <= 1 / 127.5 + 1e-6  # uint8 rounding: half a level each way


def test_gif_of_several_clips_is_side_by_side_and_scaled(tmp_path):
    y = load_gif(save_gif(_clip(rows=3), tmp_path / "b.gif", scale=2, pad=1))
    assert y.shape == (6, 1, 16, 3 * 16 + 2)


def test_frame_grid_rows_are_clips_columns_are_frames(tmp_path):
    x = _clip(frames=10, rows=2)
    p = save_frame_grid(x, tmp_path / "g.png", scale=1, pad=1, every=2)
    im = Image.open(p)
    assert im.size == (5 * 8 + 4, 2 * 8 + 1)
    top_left = torch.from_numpy(np.asarray(im.crop((0, 0, 8, 8)), dtype=np.float32))
    assert (top_left / 127.5 - 1 - x[0, 0, 0]).abs().max() <= 1 / 127.5 + 1e-6
    third = torch.from_numpy(np.asarray(im.crop((18, 9, 26, 17)), dtype=np.float32))
    assert (third / 127.5 - 1 - x[1, 4, 0]).abs().max() <= 1 / 127.5 + 1e-6  # row 1, column 2 = frame 4


@pytest.mark.skipif(
    importlib.util.find_spec("imageio_ffmpeg") is not None or importlib.util.find_spec("av") is not None,
    reason="an mp4 encoder is installed",
)
def test_mp4_without_an_encoder_names_the_extra(tmp_path):
    with pytest.raises(ConfigError, match="imageio-ffmpeg"):
        save_mp4(_clip(), tmp_path / "a.mp4")


def test_bad_inputs(tmp_path):
    with pytest.raises(ConfigError, match="suffix"):
        save_video(_clip(), tmp_path / "a.avi")
    with pytest.raises(ValueError, match="clips must be"):
        save_gif(torch.zeros(8, 8), tmp_path / "a.gif")
