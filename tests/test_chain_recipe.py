"""The latent chain as a recipe (tokenizer → encode → latent flow-matching teacher → few-step
student → report): a tiny chain runs end to end on CPU and its samples decode to images; the
encode stage refuses what is not a tokenizer, and checks its keys before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flowdistill.errors import ConfigError
from flowdistill.recipes import load_recipe, run_recipe
from tests.latent_stub import save_stub

TINY = """\
out_dir: {out}
vars: {{tokenizer: {tok}}}
stages:
  - name: encode
    kind: encode
    tokenizer: ${{recipe:tokenizer}}
    data: {{name: digits, image_size: 32, conditional: true}}
    encode: {{batch_size: 256, shard_size: 512}}
  - name: teacher
    kind: train
    job:
      model: {{name: dit, params: {{patch_size: 2, hidden: 16, depth: 1, heads: 2}}}}
      data: {{name: tokenizer_latents, root: "${{stage:encode}}", conditional: false}}
      train: {{steps: 4, batch_size: 16, lr: 1.0e-3, warmup_steps: 0, log_every: 2, ckpt_every: 2}}
      eval: {{n_samples: 40, seed: 1}}
  - name: student
    kind: distill
    job:
      teacher: ${{stage:teacher}}
      model: {{name: dit}}
      data: {{name: tokenizer_latents, root: "${{stage:encode}}", conditional: false}}
      train: {{steps: 2, batch_size: 8, lr: 1.0e-4, warmup_steps: 0, log_every: 1, ckpt_every: 2}}
      eval: {{n_samples: 40, seed: 1}}
      distiller: {{name: freeflow, derivative: fd, correction_warmup: 0, fake_repeats: 1}}
  - name: report
    kind: report
    runs: {{teacher: "${{stage:teacher}}", student: "${{stage:student}}"}}
    nfe: {{teacher: [2], student: [1]}}
    n: 40
"""


def tiny_recipe(tmp_path: Path, tok: Path) -> Path:
    """The tiny chain recipe over the tokenizer at ``tok``, written to ``tmp_path/chain.yaml``."""
    f = tmp_path / "chain.yaml"
    f.write_text(TINY.format(out=tmp_path / "out", tok=tok))
    return f


def test_tiny_chain_runs_end_to_end_and_decodes_to_images(tmp_path):
    from flowdistill.api import load_run
    from flowdistill.eval.image_eval import sample_decoder

    tok = save_stub(tmp_path / "tok", latent_channels=4)
    f = tiny_recipe(tmp_path, tok)
    runs = run_recipe(f, progress=False)
    out = tmp_path / "out"
    assert runs["encode"] == out / "encode" and (out / "encode" / "manifest.json").is_file()
    student = load_run(runs["student"])
    z = student.sample(6, 1, seed=0)
    assert z.shape == (6, 4, 8, 8)  # the student samples latents ...
    x = sample_decoder(student.cfg.data)(z)
    assert x.shape == (6, 1, 32, 32) and torch.isfinite(x).all()  # ... which decode to digits-sized images
    rows = json.loads((out / "report.json").read_text())
    assert [(r["model"], r["nfe"]) for r in rows] == [("teacher", 2), ("student", 1)]
    assert all(r["n"] == 40 and r["fid"] > r["fid_floor"] > 0 for r in rows)  # decoded samples vs real
    timings = json.loads((out / "timings.json").read_text())
    assert {"encode/encode", "teacher/train", "student/train"} <= set(timings)
    # rerunning skips every finished stage: the cache is re-verified, nothing is re-encoded
    before = (out / "encode" / "manifest.json").read_bytes()
    run_recipe(f, progress=False, report=False)
    assert (out / "encode" / "manifest.json").read_bytes() == before


def test_encode_stage_refuses_a_non_tokenizer_run_and_bad_keys(tmp_path):
    f = tiny_recipe(tmp_path, Path("assets/digits_teacher"))  # a flow-matching UNet, not a tokenizer
    with pytest.raises(ConfigError, match="recipe stage 'encode': tokenizer: .*digits_teacher holds a "
                                          "UNet.*not a tokenizer"):
        run_recipe(f, progress=False, only=["encode"])
    with pytest.raises(ConfigError, match="stages.encode.encode.mdoe' is unknown"):
        load_recipe(f, ["stages.encode.encode.mdoe=sample"])
    with pytest.raises(ConfigError, match="stages.encode.data.name'.*unknown dataset 'nope'"):
        load_recipe(f, ["stages.encode.data.name=nope"])
    # data is an encode-stage key only for encode stages: elsewhere it is still the job's data
    r = load_recipe(f, ["stages.teacher.data.conditional=true"])
    assert r.stage("teacher").job.data.conditional is True
    enc = r.stage("encode")
    assert enc.encode["mode"] == "mean" and enc.encode["data"].image_size == 32
