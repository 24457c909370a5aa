"""Image NFE sweep (flowdistill.eval.image_eval) on a tiny digits run: protocol, ordering, files."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from flowdistill.api import load_run, train
from flowdistill.config import load_config
from flowdistill.data.digits import digits_tensors
from flowdistill.eval.image_eval import IMAGE_COLUMNS, evaluate_image_run, image_sweep, reference_images
from flowdistill.models.unet import UNetFlowNet

TINY_DIGITS = [
    "model.name=unet", "model.params.base_channels=8", "model.params.channel_mults=[1,2]",
    "model.params.attention=false", "data.name=digits", "data.image_size=8", "data.conditional=true",
    "train.steps=300", "train.batch_size=64", "train.lr=3e-3", "train.ema_decay=0.9",
    "train.log_every=100", "train.ckpt_every=1000", "train.seed=0",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny conditional digits teacher (8x8, ~46k parameters, 300 steps: seconds)."""
    out = tmp_path_factory.mktemp("digits_run") / "run"
    return train(load_config(None, [f"out_dir={out}", *TINY_DIGITS]))


def _png_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def test_sweep_rows_files_and_ordering(run_dir, tmp_path):
    """Rows carry fid/fid_floor/kid/n at the asked n; floor < trained < untrained; PNGs decode."""
    run = load_run(run_dir)
    out = tmp_path / "eval"
    md = evaluate_image_run(run, [1, 8], n=360, out_dir=out, seed=3)
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["nfe"] for r in rows] == [1, 8]
    for r in rows:
        assert set(IMAGE_COLUMNS) <= set(r)
        assert r["n"] == 360 and r["model"] == "flow_matching" and r["solver"] == "euler"
        assert all(isinstance(r[k], float) for k in ("fid", "fid_floor", "kid_mean", "kid_floor"))
    assert rows[0]["fid_floor"] == rows[1]["fid_floor"]
    # the same metric on an untrained net (zero-initialised output: samples are the noise itself)
    ref, real, _ = reference_images(run)
    untrained = UNetFlowNet(sample_size=8, base_channels=8, attention=False).eval()
    g_rows, _ = image_sweep(
        {"untrained": lambda k, nfe, s: run.distiller.sample(
            torch.randn(k, 1, 8, 8, generator=torch.Generator().manual_seed(s)), nfe, model=untrained)},
        {"untrained": [8]}, ref, real, seed=3)
    bad = g_rows[0]
    floor, trained = rows[0]["fid_floor"], rows[1]["fid"]
    assert bad["fid_floor"] == pytest.approx(floor, rel=1e-6)  # same protocol, same floor
    print(f"n=360 FID: floor {floor:.3f}, 300-step net at NFE 8 {trained:.3f}, untrained {bad['fid']:.3f}")
    assert floor < 0.1 * bad["fid"], (floor, bad["fid"])
    assert trained < 0.6 * bad["fid"], (trained, bad["fid"])  # 300 steps already beat noise clearly
    assert rows[0]["kid_floor"] < rows[1]["kid_mean"] < bad["kid_mean"]
    assert md.splitlines()[0] == "| " + " | ".join(IMAGE_COLUMNS) + " |"
    assert (out / "sweep.md").read_text().strip() == md.strip()
    for name in ("grid_nfe1.png", "grid_nfe8.png", "fid_vs_nfe.png"):
        w, h = _png_size(out / name)
        assert w > 32 and h > 32
    # an 8x8 grid of 8x8 digits at scale 4: (8 * 9 + 1) * 4 pixels a side
    assert _png_size(out / "grid_nfe1.png") == (292, 292)


def test_n_is_capped_at_reference_and_solvers_share_a_folder(run_dir, tmp_path):
    """n above the test split uses all 360 (equal n); a second solver does not overwrite the first."""
    run = load_run(run_dir)
    out = tmp_path / "eval"
    evaluate_image_run(run, [2], n=4000, out_dir=out, seed=0, solver="euler")
    evaluate_image_run(run, [2], n=50, out_dir=out, seed=0, solver="heun")
    assert not (out / "sweep.json").exists()
    euler = json.loads((out / "sweep_euler.json").read_text())
    heun = json.loads((out / "sweep_heun.json").read_text())
    assert euler[0]["n"] == digits_tensors("test", 8)[0].shape[0] == 360
    assert heun[0]["n"] == 50 and heun[0]["solver"] == "heun" and euler[0]["solver"] == "euler"
    assert (out / "grid_euler_nfe2.png").is_file() and (out / "grid_heun_nfe2.png").is_file()
    assert (out / "fid_vs_nfe_euler.png").is_file() and (out / "fid_vs_nfe_heun.png").is_file()
    # FID is biased by set size (DESIGN §7): the floor at n = 50 sits well above the n = 360 one
    assert 0.0 < euler[0]["fid_floor"] < 3.0 < heun[0]["fid_floor"]


def test_sweep_is_seeded(run_dir, tmp_path):
    """The same seed gives the same numbers; another seed gives other samples."""
    run = load_run(run_dir)

    def fid(seed: int, name: str) -> float:
        evaluate_image_run(run, [4], 64, tmp_path / name, seed=seed)
        return json.loads((tmp_path / name / "sweep.json").read_text())[0]["fid"]

    a = fid(5, "a")
    assert fid(5, "b") == a
    assert fid(6, "c") != a


def test_cli_eval_on_digits_run(run_dir, tmp_path, capsys):
    """``flowdistill eval RUN --solver heun --nfe 4 --n 40`` prints the table and writes its files;
    an NFE heun cannot spend is skipped with a note, and when none is left it is a one-line error
    (status 2) before anything is sampled."""
    from flowdistill.cli import main

    out = tmp_path / "cli_eval"
    assert main(["eval", str(run_dir), "--solver", "heun", "--nfe", "4", "--n", "40", "--out", str(out)]) == 0
    assert "| flow_matching | heun | 4 |" in capsys.readouterr().out
    rows = json.loads((out / "sweep_heun.json").read_text())
    assert rows[0]["n"] == 40 and rows[0]["nfe"] == 4
    assert (out / "grid_heun_nfe4.png").is_file()
    some = tmp_path / "some"
    assert main(["eval", str(run_dir), "--solver", "heun", "--nfe", "2,3", "--n", "40",
                 "--out", str(some)]) == 0
    assert "NFE 3 skipped" in capsys.readouterr().out
    assert [r["nfe"] for r in json.loads((some / "sweep_heun.json").read_text())] == [2]
    bad = tmp_path / "bad"
    assert main(["eval", str(run_dir), "--solver", "heun", "--nfe", "1,3", "--out", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "multiple" in err and len(err.strip().splitlines()) == 1
    assert not bad.exists()
