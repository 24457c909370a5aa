"""Toy distances (sliced W2, energy), their data floors, tables and plots."""

import math

import pytest
import torch

import flowdistill.eval.toy_metrics as tm
from flowdistill.data.toy2d import get_toy
from flowdistill.eval.plots import image_grid, metric_vs_nfe, scatter_grid
from flowdistill.eval.toy_metrics import (
    data_floor,
    energy_distance,
    evaluate_samples,
    markdown_table,
    sliced_wasserstein2,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=_gen(seed))


# -- sliced W2 -----------------------------------------------------------------------------
def test_sw2_of_a_sample_with_itself_is_zero_and_permutation_invariant():
    x = _randn(1000, 2, 0)
    assert sliced_wasserstein2(x, x) == 0.0
    perm = torch.randperm(1000, generator=_gen(1))
    assert sliced_wasserstein2(x, x[perm]) < 1e-12


def test_sw2_is_exact_w2_in_one_dimension():
    x, y = _randn(300, 1, 2), 2 * _randn(300, 1, 3) + 0.5
    w2 = math.sqrt(float(((x.sort(0).values - y.sort(0).values) ** 2).mean()))
    assert sliced_wasserstein2(x, y, n_projections=7) == pytest.approx(w2, rel=1e-6)


@pytest.mark.parametrize("d", [2, 3])
def test_sw2_of_a_shift_is_norm_over_sqrt_d(d):
    # E_θ[(θ·m)²] = |m|²/d for θ uniform on the sphere, so SW2(N(0,I), N(m,I)) = |m|/√d
    m = torch.zeros(d)
    m[0], m[1] = 3.0, 4.0
    x = _randn(3000, d, 4)
    y = _randn(3000, d, 5) + m
    assert sliced_wasserstein2(x, y, n_projections=1000) == pytest.approx(5.0 / math.sqrt(d), rel=0.04)


def test_sw2_same_distribution_small_relative_to_shifted():
    x, y = _randn(2000, 2, 6), _randn(2000, 2, 7)
    same = sliced_wasserstein2(x, y)
    shifted = sliced_wasserstein2(x, y + torch.tensor([0.5, 0.0]))
    assert same < 0.1
    assert shifted > 3 * same
    assert shifted == pytest.approx(0.5 / math.sqrt(2), rel=0.25)


def test_sw2_deterministic_default_directions_and_symmetry():
    x, y = _randn(500, 2, 8), _randn(500, 2, 9) * 1.5
    assert sliced_wasserstein2(x, y) == sliced_wasserstein2(x, y)
    assert sliced_wasserstein2(x, y) == pytest.approx(sliced_wasserstein2(y, x), rel=1e-12)
    a = sliced_wasserstein2(x, y, n_projections=16, generator=_gen(1))
    b = sliced_wasserstein2(x, y, n_projections=16, generator=_gen(2))
    assert a != b


def test_sw2_chunked_projections_match_unchunked(monkeypatch):
    x, y = _randn(700, 2, 10), _randn(700, 2, 11) + 0.3
    full = sliced_wasserstein2(x, y, n_projections=64)
    monkeypatch.setattr(tm, "_BLOCK_ELEMS", 700 * 5)  # 5 projections per chunk
    assert sliced_wasserstein2(x, y, n_projections=64) == pytest.approx(full, rel=1e-12)


def test_sw2_errors_on_mismatched_inputs():
    with pytest.raises(ValueError, match="equal sizes"):
        sliced_wasserstein2(_randn(10, 2, 0), _randn(11, 2, 0))
    with pytest.raises(ValueError, match="dimension"):
        sliced_wasserstein2(_randn(10, 2, 0), _randn(10, 3, 0))
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        sliced_wasserstein2(torch.randn(10), torch.randn(10))


# -- energy distance -----------------------------------------------------------------------
def test_energy_matches_brute_force_v_statistic_with_blocks(monkeypatch):
    x, y = _randn(90, 2, 12), _randn(70, 2, 13) + 0.4  # unequal sizes are allowed
    x64, y64 = x.double(), y.double()
    ref = 2 * torch.cdist(x64, y64).mean() - torch.cdist(x64, x64).mean() - torch.cdist(y64, y64).mean()
    assert energy_distance(x, y) == pytest.approx(float(ref), rel=1e-9)
    monkeypatch.setattr(tm, "_BLOCK_ELEMS", 200)  # a few rows per block, exercises the triangle path
    assert energy_distance(x, y) == pytest.approx(float(ref), rel=1e-9)


def test_energy_point_masses():
    # D² between δ_0 and δ_a is 2|a|
    assert energy_distance(torch.zeros(5, 2), torch.tensor([[3.0, 4.0]] * 4)) == pytest.approx(10.0)


def test_energy_nonnegative_zero_on_self_and_grows_with_shift():
    x, y = _randn(800, 2, 14), _randn(800, 2, 15)
    assert energy_distance(x, x) == 0.0
    vals = [energy_distance(x, y + torch.tensor([s, 0.0])) for s in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert all(v >= 0 for v in vals)
    assert all(a < b for a, b in zip(vals, vals[1:], strict=False))


def test_energy_errors_and_nan():
    with pytest.raises(ValueError, match="dimension"):
        energy_distance(_randn(10, 2, 0), _randn(10, 3, 0))
    bad = _randn(10, 2, 0)
    bad[3, 1] = float("nan")
    assert math.isnan(energy_distance(bad, _randn(10, 2, 1)))


# -- floors and evaluation -----------------------------------------------------------------
@pytest.mark.parametrize("metric", ["sw2", "energy"])
def test_floor_positive_deterministic_and_shrinks_with_n(metric):
    ds = get_toy("8gaussians")
    small = data_floor(ds, 200, metric, seed=0)
    big = data_floor(ds, 3200, metric, seed=0)
    assert small > 0 and big > 0
    assert big < small / 2  # sw2 ~ n^{-1/2}, V-statistic energy ~ n^{-1}
    assert data_floor("8gaussians", 200, metric, seed=0) == small
    assert data_floor(ds, 200, metric, seed=1) != small


def test_floor_accepts_callable_and_rejects_unknown_metric():
    def mean_gap(a, b):
        return float((a.mean(0) - b.mean(0)).norm())

    assert data_floor("moons", 500, mean_gap, seed=0) > 0
    with pytest.raises(ValueError, match="unknown metric"):
        data_floor("moons", 100, "fid", seed=0)


def test_evaluate_samples_against_floor():
    ds = get_toy("checkerboard")
    n = 1500
    good, _ = ds.sample(n, _gen(100))
    res = evaluate_samples(good, ds, seed=3, n_projections=256)
    assert set(res) == {"sw2", "energy", "sw2_floor", "energy_floor", "n"}
    assert res["n"] == n
    # floors are the documented data_floor values at the same (n, seed)
    assert res["sw2_floor"] == data_floor(ds, n, "sw2", seed=3, n_projections=256)
    assert res["energy_floor"] == pytest.approx(data_floor(ds, n, "energy", seed=3), rel=1e-12)
    # true samples score like the floor; a wrong distribution scores far above it
    assert res["sw2"] < 3 * res["sw2_floor"]
    assert res["energy"] < 5 * res["energy_floor"]
    bad = evaluate_samples(torch.randn(n, 2, generator=_gen(101)) * 0.5, ds, seed=3, n_projections=256)
    assert bad["sw2"] > 3 * bad["sw2_floor"]
    assert bad["energy"] > 10 * bad["energy_floor"]
    assert bad["sw2_floor"] == res["sw2_floor"]


def test_evaluate_samples_nan_and_shape_errors():
    ds = get_toy("spirals")
    x = torch.randn(200, 2)
    x[0, 0] = float("inf")
    res = evaluate_samples(x, ds, seed=0, n_projections=32)
    assert math.isnan(res["sw2"]) and math.isnan(res["energy"])
    assert math.isfinite(res["sw2_floor"]) and math.isfinite(res["energy_floor"])
    with pytest.raises(ValueError, match="d=3"):
        evaluate_samples(torch.randn(20, 3), ds, seed=0)


# -- tables --------------------------------------------------------------------------------
def test_markdown_table():
    rows = [{"model": "a|b", "nfe": 1, "sw2": 0.123456, "extra": 1},
            {"model": "c", "nfe": 8, "sw2": float("nan")}]
    md = markdown_table(rows, ["model", "nfe", "sw2", "energy"])
    lines = md.splitlines()
    assert lines[0] == "| model | nfe | sw2 | energy |"
    assert lines[1] == "|---|---:|---:|---|"
    assert lines[2] == "| a\\|b | 1 | 0.1235 |  |"
    assert lines[3] == "| c | 8 | nan |  |"
    assert len(lines) == 4 and "extra" not in md
    with pytest.raises(ValueError):
        markdown_table(rows, [])


# -- plots ---------------------------------------------------------------------------------
def test_scatter_grid_writes_png_with_one_panel_per_entry(tmp_path):
    from matplotlib.image import imread

    ds = get_toy("checkerboard")
    data, _ = ds.sample(500, _gen(0))
    diverged = torch.randn(300, 2) * 100
    diverged[0] = float("nan")
    one = scatter_grid({"data": data}, tmp_path / "one.png")
    five = scatter_grid({"data": data, **{f"NFE {k}": diverged for k in (1, 2, 4, 8)}},
                        tmp_path / "sub" / "five.png", title="t", lim=2.5)
    for p in (one, five):
        assert p.exists() and p.read_bytes()[:8] == PNG_MAGIC
    h1, w1 = imread(one).shape[:2]
    h5, w5 = imread(five).shape[:2]
    assert w5 > 3 * w1 and h5 > 1.8 * h1  # a 2×4 grid vs a single panel
    with pytest.raises(ValueError):
        scatter_grid({}, tmp_path / "none.png")


def test_metric_vs_nfe_and_image_grid_write_pngs(tmp_path):
    p = metric_vs_nfe({"teacher": {1: 0.9, 2: 0.5, 8: 0.2, 128: 0.05}, "student": {1: 0.1, 4: float("nan")}},
                      tmp_path / "m.png", ylabel="sliced W2", floor=0.03, logy=True)
    assert str(p).endswith("m.png") and p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 1000
    with pytest.raises(ValueError):
        metric_vs_nfe({"x": {0: 1.0}}, tmp_path / "bad.png", ylabel="y")

    from matplotlib.image import imread

    g = image_grid(torch.rand(10, 1, 8, 8) * 2 - 1, tmp_path / "g.png", nrow=5, scale=2)
    arr = imread(g)
    assert arr.shape[:2] == (2 * (2 * 9 + 1), 2 * (5 * 9 + 1))  # 2 rows × 5 cols of 8 px + 1 px pads
