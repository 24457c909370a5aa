"""The RecTok distiller (flowdistill/distillers/rectok.py): time shift, mask ratios, the loss terms,
semantic alignment, stage 2, the AE baseline config and resume = uninterrupted.

A tiny tokenizer and a stand-in semantic teacher (a fixed random 4×4 patch projection, so the tests
need no trained net) keep every test to a few seconds."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import flowdistill.distillers.rectok as rt
from flowdistill.config import DataSpec, load_config
from flowdistill.core.rng import StepRNG
from flowdistill.data.registry import build_dataset
from flowdistill.errors import ConfigError
from flowdistill.models.tokenizer import TokenizerModel
from flowdistill.training.loop import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
SEM_DIM = 8


class StandInSemantic(nn.Module):
    """A frozen random patch projection ``[B, 1, 32, 32] → [B, 64, SEM_DIM]`` (4×4 patches)."""

    def __init__(self, tokens: int):
        super().__init__()
        g = torch.Generator().manual_seed(123)
        self.dim = SEM_DIM
        self.w = nn.Parameter(torch.randn(SEM_DIM, 1, 4, 4, generator=g), requires_grad=False)
        assert tokens == 64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Patch features in token (row-major grid) order."""
        return torch.nn.functional.conv2d(x, self.w, stride=4).flatten(2).transpose(1, 2)


@pytest.fixture(autouse=True)
def stand_in(monkeypatch):
    """Every distiller here gets the stand-in semantic teacher instead of the registry's."""
    monkeypatch.setattr(rt, "build_semantic", lambda spec, tokens: StandInSemantic(tokens).eval())


def tiny(sem_dim: int = SEM_DIM, channels: int = 4) -> TokenizerModel:
    """A ~20 k-parameter tokenizer on 1×32×32 (64 tokens)."""
    torch.manual_seed(0)
    return TokenizerModel(latent_channels=channels, hidden=16, enc_depth=1, dec_depth=1, heads=2,
                          sem_dim=sem_dim, sem_hidden=16, sem_depth=1)


def digits(n: int = 16) -> torch.Tensor:
    """The first ``n`` digits train images at 32×32."""
    from flowdistill.data.digits import digits_tensors

    return digits_tensors("train", 32)[0][:n]


def make(sem_dim: int = SEM_DIM, **kw) -> rt.RecTok:
    """A RecTok distiller on the tiny tokenizer with config overrides ``kw``."""
    cfg = rt.RecTokConfig(perceptual="none", **kw)
    cfg.validate()
    return rt.RecTok(cfg, tiny(sem_dim))


def test_time_shift_formula_and_k():
    """k = √(tokens·channels/4096); t = k·u/(1+(k−1)·u) keeps 0 and 1, is the identity at k = 1,
    is monotone, and t(½) = k/(1+k)."""
    assert rt.time_shift_k(64, 64) == 1.0
    assert rt.time_shift_k(64, 8) == pytest.approx(math.sqrt(512 / 4096), abs=1e-15)
    assert rt.time_shift_k(256, 128) == pytest.approx(2 * math.sqrt(2), abs=1e-12)  # the paper's ≈ 2.83
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.equal(rt.shift_time(u, 1.0), u)
    for k in (0.35, 2.83):
        t = rt.shift_time(u, k)
        assert t[0] == 0 and t[-1] == pytest.approx(1.0, abs=1e-15)
        assert (t.diff() > 0).all()
        half = float(rt.shift_time(torch.tensor(0.5, dtype=torch.float64), k))
        assert half == pytest.approx(k / (1 + k), abs=1e-15)
    d = make()
    assert d.k == pytest.approx(math.sqrt(64 * 4 / 4096))  # from the tokenizer: 64 tokens × 4 channels
    assert make(time_shift=3.0).k == 3.0


def test_mask_ratio_distribution():
    """r = max(0, U(−0.1, 0.4)): P(r = 0) = 0.1/0.5 = 0.2, r ≤ 0.4, the positive part uniform.
    2000 per-step draws through the distiller's RNG: the zero fraction's std is √(.2·.8/2000) ≈ 0.009,
    so ±0.035 is ~4σ; the mean of r is 0.4²/(2·0.5) = 0.16 (std of the mean ≈ 0.003)."""
    d = make()
    rs = torch.tensor([d.batch_mask_ratio(StepRNG(0, step)) for step in range(2000)])
    assert abs(float((rs == 0).float().mean()) - 0.2) < 0.035
    assert float(rs.max()) <= 0.4 and float(rs.min()) == 0.0
    assert abs(float(rs.mean()) - 0.16) < 0.015
    assert rt.mask_ratio(0.2, 0.0, 0.0) == 0.0  # the AE baseline never masks


def test_loss_terms_present_and_finite():
    """Stage 1 reports rec, kl, sem, perceptual (off: 0), mask ratio and mean t; all finite, and the
    total is their weighted sum."""
    d = make(kl_weight=1e-3)
    out = d.loss({"x": digits()}, 0, "student", StepRNG(0, 3))
    for key in ("loss", "rec", "kl", "sem", "perceptual", "mask_ratio", "t"):
        assert key in out and torch.isfinite(out[key]).all(), key
    want = out["rec"] + 1e-3 * out["kl"] + out["sem"]
    assert float(out["loss"].detach()) == pytest.approx(float(want), rel=1e-6)
    assert 0 <= float(out["sem"]) <= 2  # 1 − cos ∈ [0, 2]
    out["loss"].backward()
    assert all(p.grad is not None for p in d.student.sem_decoder.parameters())


def _alignment(d: rt.RecTok, x: torch.Tensor) -> tuple[float, float]:
    """(semantic loss, mean cosine at visible tokens) on a fixed batch, mask and noise."""
    with torch.no_grad():
        enc = d.student.encode(x, mask_ratio=0.25, generator=torch.Generator().manual_seed(1))
        z = enc.latent_dist.mode()
        target = d.semantic_teacher(x.device)(x)
        eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(2))
        feats = d.student.decode_semantic(0.8 * z + 0.2 * eps, mask=enc.mask)
        cos = torch.nn.functional.cosine_similarity(feats, target, dim=-1)
        visible = 1 - enc.mask
        return float(d.semantic_loss(feats, target, enc.mask)), float((cos * visible).sum() / visible.sum())


def test_semantic_term_decreases_and_alignment_improves():
    """20 Adam steps on one fixed batch: the semantic loss drops by more than a third and the cosine
    at visible tokens rises (a random init starts near cos ≈ 0)."""
    d = make()
    x = digits(32)
    sem0, cos0 = _alignment(d, x)
    opt = torch.optim.Adam(d.student.parameters(), lr=3e-3)
    for step in range(20):
        out = d.loss({"x": x}, step, "student", StepRNG(0, step))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    sem1, cos1 = _alignment(d, x)
    assert sem1 < 0.67 * sem0, (sem0, sem1)
    assert cos1 > cos0 + 0.2, (cos0, cos1)


def test_stage2_touches_only_the_decoder_and_writes_latent_stats():
    """Stage 2 optimises the pixel decoder alone: every other tensor is bit-identical after training
    steps; the loss has no KL / semantic term; the latent statistics land in the student's config."""
    d = make(stage=2)
    groups = d.optim_groups(1e-2)
    names = {id(p): n for n, p in d.student.named_parameters()}
    assert all(names[id(p)].startswith("decoder.") for p in groups[0].params)
    before = {k: v.clone() for k, v in d.student.state_dict().items()}
    opt = torch.optim.Adam(groups[0].params, lr=1e-2)
    x = digits()
    for step in range(3):
        out = d.loss({"x": x}, step, "student", StepRNG(0, step))
        assert set(out) == {"loss", "rec", "perceptual"}
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        d.after_step(step, "student")
    after = d.student.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("decoder.") for k in changed)
    z = d.student.encode(x).latent_dist.mode().double()
    assert d.student.config.shift_factor == pytest.approx(float(z.mean()), abs=1e-6)
    assert d.student.config.scaling_factor == pytest.approx(float(1 / z.std(unbiased=False)), rel=1e-5)


def test_ae_config_has_no_semantic_term():
    """configs/ae_digits.yaml: no semantic decoder, no noise (t = 0), no masking, no "sem" loss."""
    cfg = load_config(ROOT / "configs" / "ae_digits.yaml")
    assert cfg.model.params["sem_dim"] == 0
    d = rt.RecTok(cfg.distiller, tiny(sem_dim=0))
    assert not d.use_sem
    out = d.loss({"x": digits()}, 0, "student", StepRNG(0, 0))
    assert "sem" not in out and float(out["t"]) == 0.0 and float(out["mask_ratio"]) == 0.0
    rec = load_config(ROOT / "configs" / "rectok_digits.yaml")
    assert rec.distiller.semantic["name"] == "digits_ssl" and rec.distiller.noise
    with pytest.raises(ConfigError, match="model.params.sem_dim"):
        rt.RecTok(rec.distiller, tiny(sem_dim=0))


def test_bad_config_values_are_one_line_errors():
    """Each bad value names its key."""
    for kw, key in (({"stage": 3}, "distiller.stage"), ({"mask_max": 1.0}, "distiller.mask_min"),
                    ({"perceptual": "digits"}, "distiller.perceptual"),
                    ({"sem_tokens": "x"}, "distiller.sem_tokens")):
        with pytest.raises(ConfigError, match=key):
            rt.RecTokConfig(**kw).validate()


def _trainer(run_dir: Path, steps: int) -> Trainer:
    """The training loop over the digits at 32×32 (batch 8, checkpoints every 2 steps)."""
    d = make()
    src = build_dataset(DataSpec(name="digits", image_size=32))
    cfg = TrainConfig(steps=steps, batch_size=8, lr=1e-3, ema_decay=0.0, ckpt_every=2, log_every=1,
                      trackers="none", cpu=True)
    return Trainer(d, cfg, run_dir, source=src)


def test_resume_equals_uninterrupted(tmp_path):
    """4 steps straight vs 2 steps, checkpoint, a fresh process-like Trainer resuming to 4: the same
    weights bit for bit (masks, noise and batches are keyed by step)."""
    a = _trainer(tmp_path / "a", 4).fit(progress=open("/dev/null", "w"))
    b = _trainer(tmp_path / "b", 4)
    b.train_step()
    b.train_step()
    b.save()
    c = _trainer(tmp_path / "b", 4)
    assert c.resume() == 2
    c.fit(progress=open("/dev/null", "w"))
    sa, sc = a.distiller.student.state_dict(), c.distiller.student.state_dict()
    assert all(torch.equal(sa[k], sc[k]) for k in sa)


def test_recipe_runs_stage1_then_a_decoder_only_stage2_from_it():
    """configs/recipes/rectok_digits.yaml: stage 2 starts from stage 1's run (init), trains the decoder
    alone (distiller.stage 2) with EMA off (so the latent statistics reach the exported student), and
    a latent-size override reaches both stages."""
    from flowdistill.recipes.spec import load_recipe

    over = [f"stages.{s}.model.params.latent_channels=32" for s in ("stage1", "stage2")]
    r = load_recipe(ROOT / "configs" / "recipes" / "rectok_digits.yaml", over)
    s1, s2 = r.stages
    assert s1.job.distiller.stage == 1 and s2.job.distiller.stage == 2
    assert Path(s2.job.init) == s1.run_dir and s2.job.train.ema_decay == 0.0
    assert s1.job.model.params["latent_channels"] == s2.job.model.params["latent_channels"] == 32


def test_patchgan_term_switches_on_at_gan_start():
    """gan_weight > 0: before gan_start the discriminator group does not update and the student loss has
    no adversarial term; from gan_start on both are finite and the discriminator gets gradients."""
    d = make(gan_weight=0.5, gan_start=1)
    assert [g.name for g in d.optim_groups(1e-3)] == ["student", "disc"]
    x = digits(8)
    assert "gan_g" not in d.loss({"x": x}, 0, "student", StepRNG(0, 0))
    assert not d.loss({"x": x}, 0, "disc", StepRNG(0, 0))["loss"].requires_grad
    out = d.loss({"x": x}, 1, "student", StepRNG(0, 1))
    assert torch.isfinite(out["gan_g"]) and "gan_g" in out
    dl = d.loss({"x": x}, 1, "disc", StepRNG(0, 1))["loss"]
    dl.backward()
    assert torch.isfinite(dl) and all(p.grad is not None for p in d.disc.parameters())
