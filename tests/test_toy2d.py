"""Toy 2-D targets: exact, deterministic samplers with the stated geometry, scale and labels."""

import math

import pytest
import torch

from flowdistill.core.registry import UnknownNameError
from flowdistill.data import TOY_DATASETS, get_toy, toy_batch
from flowdistill.data.toy2d import Checkerboard, EightGaussians, TwoMoons, TwoSpirals

NAMES = ["checkerboard", "8gaussians", "moons", "spirals"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_registry_lists_all_and_unknown_name_lists_available():
    assert set(NAMES) <= set(TOY_DATASETS.names())
    with pytest.raises(UnknownNameError) as err:
        get_toy("swissroll_typo")
    msg = str(err.value)
    assert "swissroll_typo" in msg
    for name in NAMES:
        assert name in msg


@pytest.mark.parametrize("name", NAMES)
def test_shapes_dtypes_labels_and_determinism(name):
    ds = get_toy(name)
    x, y = ds.sample(4000, _gen(3))
    assert x.shape == (4000, 2) and x.dtype == torch.float32
    assert y.shape == (4000,) and y.dtype == torch.long
    assert torch.isfinite(x).all()
    # every class appears, nothing outside [0, num_classes)
    assert set(y.tolist()) == set(range(ds.num_classes))
    x2, y2 = ds.sample(4000, _gen(3))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = ds.sample(4000, _gen(4))
    assert not torch.equal(x, x3)


@pytest.mark.parametrize("name", NAMES)
def test_global_rng_when_no_generator(name):
    ds = get_toy(name)
    torch.manual_seed(11)
    a, _ = ds.sample(50)
    torch.manual_seed(11)
    b, _ = ds.sample(50)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_zero_mean_and_unit_average_variance(name):
    x, _ = get_toy(name).sample(40_000, _gen(0))
    assert x.mean(0).abs().max() < 0.03
    # scale is chosen so that tr Cov = 2 exactly (average per-axis variance 1)
    assert abs(float(x.var(0).sum()) - 2.0) < 0.06


def test_sample_size_validation():
    ds = get_toy("moons")
    x, y = ds.sample(0, _gen(0))
    assert x.shape == (0, 2) and y.shape == (0,)
    with pytest.raises(ValueError):
        ds.sample(-1)


def test_checkerboard_points_lie_in_their_filled_square():
    ds = Checkerboard()
    x, y = ds.sample(5000, _gen(1))
    assert x.abs().max() <= math.sqrt(3) + 1e-5  # board [-2, 2]² scaled by √3/2
    raw = ds.to_raw(x.double())
    col, row = Checkerboard.square_of(raw)
    assert ((col + row) % 2 == 0).all()  # only the 8 filled squares
    assert torch.equal(y, 2 * row + col // 2)  # the documented label
    # uniform over the 8 squares
    counts = torch.bincount(y, minlength=8).double() / len(y)
    assert (counts - 1 / 8).abs().max() < 0.025


def test_eight_gaussians_cluster_at_their_centres():
    ds = EightGaussians()
    x, y = ds.sample(8000, _gen(2))
    c = ds.centres
    assert c.shape == (8, 2)
    torch.testing.assert_close(c.norm(dim=1), torch.full((8,), ds.scale), atol=1e-5, rtol=0)
    nearest = torch.cdist(x, c).argmin(dim=1)
    assert torch.equal(nearest, y)
    std = ds.scale * ds.component_std
    for k in range(8):
        pts = x[y == k]
        torch.testing.assert_close(pts.mean(0), c[k], atol=4 * std / math.sqrt(len(pts)) + 1e-3, rtol=0)
        assert abs(float(pts.std(0).mean()) - std) < 0.1 * std


def test_moons_lie_on_their_half_circles():
    ds = TwoMoons(noise=0.05)
    x, y = ds.sample(5000, _gen(5))
    raw = ds.to_raw(x.double())
    centre = torch.where((y == 0)[:, None], torch.tensor([0.0, 0.0], dtype=torch.float64),
                         torch.tensor([1.0, 0.5], dtype=torch.float64))
    dist = (raw - centre).norm(dim=1)
    assert ((dist - 1).abs() < 5 * ds.noise).all()
    # moon 0 is the upper arc, moon 1 the lower one (up to noise)
    assert (raw[y == 0, 1] > -5 * ds.noise).all()
    assert (raw[y == 1, 1] < 0.5 + 5 * ds.noise).all()
    # noise-free moons are exactly on the arcs
    x0, y0 = TwoMoons(noise=0.0).sample(500, _gen(6))
    r0 = TwoMoons(noise=0.0).to_raw(x0.double())
    c0 = torch.where((y0 == 0)[:, None], torch.tensor([0.0, 0.0], dtype=torch.float64),
                     torch.tensor([1.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close((r0 - c0).norm(dim=1), torch.ones(500, dtype=torch.float64), atol=1e-6, rtol=0)


def test_spirals_lie_on_their_arm():
    clean = TwoSpirals(noise=0.0)
    x, y = clean.sample(2000, _gen(7))
    raw = clean.to_raw(x.double())
    r = raw.norm(dim=1)
    torch.testing.assert_close(raw, clean.arm(r, y), atol=1e-5, rtol=0)
    assert r.max() <= 1 + 1e-6

    ds = TwoSpirals()
    x, y = ds.sample(3000, _gen(8))
    raw = ds.to_raw(x.double())
    grid = torch.linspace(0, 1, 4001, dtype=torch.float64)
    d = torch.stack([torch.cdist(raw, ds.arm(grid, k)).min(dim=1).values for k in (0, 1)], dim=1)
    own = d.gather(1, y[:, None]).squeeze(1)
    assert (own < 5 * ds.noise).float().mean() > 0.995
    # the label is recoverable from the geometry except near the centre where the arms meet
    assert (d.argmin(dim=1) == y).float().mean() > 0.97


def test_toy_batch_matches_sampler():
    b = toy_batch("checkerboard", 64, _gen(9))
    x, y = get_toy("checkerboard").sample(64, _gen(9))
    assert set(b) == {"x", "cond"}
    assert torch.equal(b["x"], x) and torch.equal(b["cond"], y)
    b2 = toy_batch(get_toy("checkerboard"), 64, _gen(9), device="cpu")
    assert torch.equal(b2["x"], x)
