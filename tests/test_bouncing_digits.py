"""The bouncing-digits generator is exact and the video datasets serve contract-shaped batches."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from flowdistill.config import DataSpec
from flowdistill.data.bouncing_digits import digit_sprites, generate_clips, position_bounds, render
from flowdistill.data.registry import build_dataset, dataset_entry, sample_shape_of
from flowdistill.errors import ConfigError


def _clips(n=64, frames=40, seed=0, **kw):
    return generate_clips(n, frames, generator=torch.Generator().manual_seed(seed), **kw)


def test_positions_follow_constant_velocity_with_reflection():
    """Step the dynamics by hand (p += v; mirror p and flip v at a wall) and match every frame.

    Tolerance 1e-4 px: the generator's closed form is evaluated in float64 and stored in float32."""
    c = _clips()
    lo, hi = c.bounds
    p = c.positions[:, 0].double().clone()
    v = c.velocities[:, 0].double().clone()
    for f in range(1, c.positions.shape[1]):
        p = p + v
        below, above = p < lo, p > hi
        p = torch.where(below, 2 * lo - p, torch.where(above, 2 * hi - p, p))
        v = torch.where(below | above, -v, v)
        ok = c.present.view(-1, c.present.shape[1], 1)
        torch.testing.assert_close(
            p.where(ok, 0.0), c.positions[:, f].double().where(ok, 0.0), atol=1e-4, rtol=0
        )
        torch.testing.assert_close(
            v.where(ok, 0.0), c.velocities[:, f].double().where(ok, 0.0), atol=1e-5, rtol=0
        )
    pos = c.positions[c.present.unsqueeze(1).expand_as(c.positions[..., 0])]
    assert pos.min() >= lo - 1e-5 and pos.max() <= hi + 1e-5
    speed = c.velocities.norm(dim=-1)[c.present.unsqueeze(1).expand_as(c.positions[..., 0])]
    assert speed.min() >= 1.0 - 1e-5 and speed.max() <= 2.5 + 1e-5
    bounced = (c.velocities[:, 1:] * c.velocities[:, :-1] < 0).any()
    assert bounced, "40 frames of 64 clips at >= 1 px/frame must contain bounces"


def test_deterministic_per_generator_and_well_formed():
    a, b, other = _clips(seed=3), _clips(seed=3), _clips(seed=4)
    assert torch.equal(a.frames, b.frames) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.frames, other.frames)
    assert a.frames.shape == (64, 40, 1, 32, 32) and a.positions.shape == (64, 40, 2, 2)
    assert a.frames.min() >= -1.0 and a.frames.max() <= 1.0
    counts = a.present.sum(1)
    assert set(counts.tolist()) == {1, 2} and bool(a.present[:, 0].all())
    assert bool((a.labels[~a.present] == -1).all()) and bool(
        a.positions[~a.present.unsqueeze(1).expand(-1, 40, -1)].isnan().all()
    )


def test_subpixel_rendering_moves_the_ink_centroid_exactly():
    """Bilinear placement conserves ink and moves its centroid with the position (no threshold):
    centroid − position is constant along a lone digit's track to 1e-3 px (float32 sums)."""
    sprites, _ = digit_sprites("train", 12)
    lo, hi = position_bounds(32, 12)
    t = torch.linspace(0, 1, 23)
    pos = torch.stack([lo + 0.5 + (hi - lo - 1) * t, lo + 1 + 3.3 * t], dim=-1)
    img = render(sprites[5:6].expand(23, 12, 12), pos, 32)
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    mass = img.sum((1, 2))
    cen = torch.stack([(img * xs).sum((1, 2)) / mass, (img * ys).sum((1, 2)) / mass], dim=-1)
    torch.testing.assert_close(mass, mass[:1].expand(23), atol=1e-3, rtol=0)
    off = cen - pos
    torch.testing.assert_close(off, off[:1].expand(23, 2), atol=1e-3, rtol=0)


def test_train_and_test_clips_use_their_own_digits():
    tr, te = digit_sprites("train", 12), digit_sprites("test", 12)
    assert tr[0].shape[0] == 1437 and te[0].shape[0] == 360
    a = _clips(n=4, frames=2, split="train")
    b = _clips(n=4, frames=2, split="test")
    assert not torch.equal(a.frames, b.frames)


def test_bad_ranges_are_config_errors():
    with pytest.raises(ConfigError, match="speed"):
        _clips(speed=(3.0, 1.0))
    with pytest.raises(ConfigError, match="digits"):
        _clips(digits=(0, 3.5))


def test_bouncing_digits_dataset_batches_have_the_contract_shape():
    spec = DataSpec(name="bouncing_digits", params={"frames": 8})
    assert dataset_entry("bouncing_digits").kind == "video"
    assert sample_shape_of(spec) == (8, 1, 32, 32)
    src = build_dataset(spec, "train")
    b1 = src.local_batch(torch.Generator().manual_seed(0), 0, 1, 4)
    b2 = src.local_batch(torch.Generator().manual_seed(0), 0, 1, 4)
    assert set(b1) == {"x"} and b1["x"].shape == (4, 8, 1, 32, 32)
    assert torch.equal(b1["x"], b2["x"])
    half = src.local_batch(torch.Generator().manual_seed(0), 1, 2, 2)  # rank 1 of 2 = second half
    assert torch.equal(half["x"], b1["x"][2:])
    with pytest.raises(ConfigError, match="unknown key"):
        build_dataset(DataSpec(name="bouncing_digits", params={"frame": 8}))


def _write_folder(root, lengths=(20, 12), size=40):
    """One GIF and one safetensors clip (uint8) of the given lengths."""
    from flowdistill.eval.video_io import save_gif

    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    save_gif(torch.rand(lengths[0], 1, size, size, generator=g) * 2 - 1, root / "a.gif", scale=1)
    save_file(
        {"frames": (torch.rand(lengths[1], 3, size, size, generator=g) * 255).to(torch.uint8)},
        str(root / "b.safetensors"),
    )


def test_video_folder_reads_random_windows(tmp_path):
    _write_folder(tmp_path / "clips")
    spec = DataSpec(name="video_folder", root=str(tmp_path / "clips"), image_size=16, params={"frames": 10})
    assert sample_shape_of(spec) == (10, 3, 16, 16)
    src = build_dataset(spec)
    assert len(src) == 2 and src.lengths == [20, 12]
    b = src.local_batch(torch.Generator().manual_seed(1), 0, 1, 6)
    assert b["x"].shape == (6, 10, 3, 16, 16) and b["x"].min() >= -1 and b["x"].max() <= 1
    again = src.local_batch(torch.Generator().manual_seed(1), 0, 1, 6)
    assert torch.equal(b["x"], again["x"])
    gray = build_dataset(
        DataSpec(
            name="video_folder",
            root=str(tmp_path / "clips"),
            image_size=16,
            params={"frames": 10, "channels": 1},
        )
    )
    assert gray.local_batch(torch.Generator(), 0, 1, 2)["x"].shape == (2, 10, 1, 16, 16)


def test_video_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no clips"):
        build_dataset(DataSpec(name="video_folder", root=str(tmp_path / "empty")))
    _write_folder(tmp_path / "clips")
    with pytest.raises(ConfigError, match="shorter than data.params.frames=16"):
        build_dataset(DataSpec(name="video_folder", root=str(tmp_path / "clips"), params={"frames": 16}))
    with pytest.raises(ConfigError, match="data.root"):
        build_dataset(DataSpec(name="video_folder"))
