"""TSCD's low-step extras (flowdistill/distillers/tscd.py, "Low-step extras"; METHODS.md §3): the
one-step DMD term, the reward hook with its margin loss, PCM's adversarial term; each off by
default and then the old loss bit for bit; checkpointed auxiliaries; one-line config errors; the
reward registry and the MLP's feature hook they stand on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowdistill.api import build_distiller_for, train
from flowdistill.config import load_config, to_yaml
from flowdistill.core.dmd import dm_gradient, renoise
from flowdistill.core.flowmap import flow_map_jump
from flowdistill.core.losses import premetric
from flowdistill.core.rng import StepRNG
from flowdistill.distillers.tscd import TSCD, TSCDConfig
from flowdistill.errors import ConfigError
from flowdistill.models import init_from
from flowdistill.models.mlp import MLPFlowNet
from flowdistill.models.rewards import REWARDS, build_reward, margin_loss
from flowdistill.runs import prepare_run_dir
from flowdistill.training.checkpoint import latest_checkpoint, load_checkpoint
from flowdistill.training.loop import Trainer
from tests.helpers import REPO, main_in_process, student_weights

TEACHER = REPO / "assets" / "checkerboard_teacher"
CONFIG = REPO / "configs" / "lcm_checkerboard.yaml"
SMALL_REWARD = {"problem": "checkerboard", "n_ref": 256}  # fast toy reward for unit tests


def _nets(seed: int = 0, dtype=torch.float64, from_teacher: bool = True):
    """A small one-time MLP teacher and a two-time student (started from it unless told not to)."""
    torch.manual_seed(seed)
    teacher = MLPFlowNet(data_dim=2, hidden=32, depth=2).to(dtype).eval()
    student = MLPFlowNet(data_dim=2, hidden=32, depth=2, two_time=True).to(dtype)
    if from_teacher:
        init_from(student, teacher)
    return teacher, student


def _tscd(student, teacher, **kw) -> TSCD:
    cfg = TSCDConfig(**{"segments": 2, "num_steps": 10, **kw})
    cfg.validate()
    return TSCD(cfg, student, teacher)


def _batch(n: int = 128, dtype=torch.float64) -> dict:
    return {"x": torch.randn(n, 2, generator=torch.Generator().manual_seed(11), dtype=dtype)}


def _grads(loss, params) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, params))


# -- off = the old loss ------------------------------------------------------------------------
def test_extras_off_is_the_old_loss_bit_for_bit():
    """Defaults: the loss is exactly the consistency loss rebuilt from its pieces with the same draws
    (value and gradient bit for bit), with no extra nets, groups or checkpoint keys."""
    teacher, student = _nets()
    d = _tscd(student, teacher)
    assert d.fake is None and d.disc is None and d._reward is None
    assert [g.name for g in d.optim_groups(1e-3)] == ["student"] and list(d.trainable_nets()) == ["student"]
    assert not any(k.startswith(("fake.", "disc.")) for k in d.trainable_state_dict())
    batch = _batch()
    out = d.loss(batch, 0, "student", StepRNG(3, 0))
    # the old loss, written out: ε, n, edge, x_t, teacher step + target, prediction, pseudo-Huber
    rng = StepRNG(3, 0)
    x = batch["x"]
    eps = rng.randn(128, 2).to(x.dtype)
    n = rng.randint(10, 128)
    grid = d.grid_ascending("cpu", x.dtype)
    t, tp = grid[n + 1], grid[n]
    from flowdistill.core.segments import edge_below, segment_edges
    e = edge_below(tp, segment_edges(grid, 2))
    x_t = (1 - t)[:, None] * x + t[:, None] * eps
    _, target = d.consistency_target(x_t, t, tp, e)
    pred = flow_map_jump(student, x_t, t, e)
    old = premetric("pseudo_huber_elementwise")(pred, target, c=0.001).mean()
    assert torch.equal(out["loss"], old)
    params = list(student.parameters())
    new_g, old_g = _grads(out["loss"], params), _grads(old, params)
    assert all(torch.equal(a, b) for a, b in zip(new_g, old_g, strict=True))


def test_each_extra_only_adds_its_own_term():
    """With an extra on, the consistency part (drawn first) is unchanged: the logged mse is equal and
    the loss is the old loss plus the extra's weighted term."""
    teacher, student = _nets()
    batch = _batch()
    base = _tscd(student, teacher).loss(batch, 0, "student", StepRNG(3, 0))
    for kw, key in ((dict(dmd_weight=0.5), "dmd"),
                    (dict(reward="toy_density", reward_params=SMALL_REWARD, reward_weight=2.0,
                          reward_margin=5.0), "reward_loss"),
                    (dict(adv_weight=0.1), "adv_g")):
        d = _tscd(student, teacher, **kw)
        out = d.loss(batch, 0, "student", StepRNG(3, 0))
        assert torch.equal(out["mse"], base["mse"]), kw
        w = next(v for k, v in kw.items() if k.endswith("_weight"))
        torch.testing.assert_close(out["loss"].detach(), base["loss"].detach() + w * out[key],
                                   rtol=0, atol=1e-12)  # float64 sums: exact up to rounding


# -- DMD ---------------------------------------------------------------------------------------
def test_dmd_term_gradient_is_the_helpers_g():
    """The DMD term's gradient into the student is exactly the pull-back of ``w·g/(B·D)`` at the
    one-step sample ``x̂ = X(ε, 1, 0)``, with ``g`` from :func:`core.dmd.dm_gradient` on the teacher
    and ψ evaluated directly at the same ``(r, n)``."""
    teacher, student = _nets()
    w = 0.7
    d = _tscd(student, teacher, dmd_weight=w)
    assert d.fake is not None and [g.name for g in d.optim_groups(1e-3)] == ["fake", "student"]
    with torch.no_grad():  # make ψ differ from the teacher, as after training
        for p in d.fake.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = _batch()
    params = list(student.parameters())
    on = _grads(d.loss(batch, 0, "student", StepRNG(5, 0))["loss"], params)
    off = _grads(_tscd(student, teacher).loss(batch, 0, "student", StepRNG(5, 0))["loss"], params)
    # the term's own draws come after the consistency loss's: replay them
    rng = StepRNG(5, 0)
    d._draw(batch, rng)
    eps = rng.randn(128, 2).to(torch.float64)
    r = rng.times(d.dmd_r_sampler, 128).to(torch.float64)
    nz = rng.randn(128, 2).to(torch.float64)
    ones = torch.ones(128, dtype=torch.float64)
    x_hat = flow_map_jump(student, eps, ones, 0 * ones)
    with torch.no_grad():
        x_r = renoise(x_hat, r, nz)
        g = dm_gradient(x_hat, x_r, r, teacher(x_r, r), d.fake(x_r, r), normalize=True)
    assert float(g.abs().max()) > 1e-3  # a real gradient, not a trivially zero one
    want = torch.autograd.grad(x_hat, params, grad_outputs=w * g / g.numel())
    for a, b, c in zip(on, off, want, strict=True):
        torch.testing.assert_close(a - b, c, rtol=1e-9, atol=1e-12)  # float64: rounding only


def test_fake_group_trains_psi_on_the_one_step_samples():
    """``"fake"``'s loss is ψ's flow matching on sg(x̂): gradient into ψ only, and it goes down."""
    teacher, student = _nets()
    d = _tscd(student, teacher, dmd_weight=1.0, fake_repeats=2)
    g = {x.name: x for x in d.optim_groups(1e-3)}
    assert g["fake"].repeats == 2
    batch = _batch(128)
    opt = torch.optim.Adam(d.fake.parameters(), lr=3e-3)
    first = None
    for i in range(40):
        loss = d.loss(batch, 0, "fake", StepRNG(1, 0))["loss"]
        if i == 0:
            first = float(loss.detach())
            assert all(p.grad is None for p in student.parameters())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is None for p in student.parameters())
    assert float(d.loss(batch, 0, "fake", StepRNG(1, 0))["loss"].detach()) < 0.8 * first


# -- reward ------------------------------------------------------------------------------------
def test_margin_loss_is_zero_above_the_margin():
    r = torch.tensor([-2.0, 0.0, 0.5, 3.0], requires_grad=True)
    loss = margin_loss(r, 0.5)
    assert loss.tolist() == [2.5, 0.5, 0.0, 0.0]
    loss.sum().backward()
    assert r.grad.tolist() == [-1.0, -1.0, 0.0, 0.0]  # unit push up below the margin, none above


def test_reward_term_is_zero_above_the_margin_and_training_raises_the_reward():
    teacher, student = _nets()
    batch = _batch(256)
    base = _tscd(student, teacher).loss(batch, 0, "student", StepRNG(2, 0))
    low = _tscd(student, teacher, reward="toy_density", reward_params=SMALL_REWARD, reward_weight=1.0,
                reward_margin=-1e9).loss(batch, 0, "student", StepRNG(2, 0))
    assert float(low["reward_loss"]) == 0.0 and torch.equal(low["loss"], base["loss"])  # everyone clears it
    reward = build_reward("toy_density", **SMALL_REWARD)
    probe = torch.randn(512, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    ones = torch.ones(512, dtype=torch.float64)

    def mean_reward(net) -> float:
        with torch.no_grad():
            return float(reward(flow_map_jump(net, probe, ones, 0 * ones)).mean())

    def trained(**kw) -> float:
        _, s = _nets()
        d = _tscd(s, teacher, **kw)
        opt = torch.optim.Adam(s.parameters(), lr=3e-3)
        for i in range(25):
            opt.zero_grad()
            d.loss(batch, i, "student", StepRNG(2, i))["loss"].backward()
            opt.step()
        return mean_reward(s)

    before = mean_reward(student)
    with_reward = trained(reward="toy_density", reward_params=SMALL_REWARD, reward_weight=1.0,
                          reward_margin=5.0)
    without = trained()
    # the untrained teacher's one-step samples are far off the board (mean R ≪ 0); 25 steps of the
    # reward term move them up by several nats, the consistency loss alone does not
    assert with_reward > before + 3.0 and with_reward > without + 3.0, (before, with_reward, without)


def test_reward_registry_builtins_and_plugins():
    toy = build_reward("toy_density", problem="checkerboard")
    from flowdistill.data.toy2d import get_toy

    data, _ = get_toy("checkerboard").sample(4000, torch.Generator().manual_seed(123))
    share = float((toy(data) >= 0).float().mean())
    # R ≥ 0 on a share 1 − quantile (0.95) of true samples; ±0.02 covers the binomial spread of
    # 4000 draws (±0.0035) and the quantile's own estimate from 2048 held-out draws (±0.005)
    assert abs(share - 0.95) < 0.02, share
    far = toy(torch.tensor([[3.0, 3.0], [0.4, -0.4]]))  # off the board; a white square (raw (0.46, -0.46))
    assert float(far.max()) < -5.0
    digits = build_reward("digits_confidence")
    from flowdistill.data.digits import digits_tensors
    from flowdistill.models.digits_classifier import DigitsClassifier

    assert not any(isinstance(m, DigitsClassifier) for m in digits.modules())  # not the FID net
    x, y = digits_tensors("test", 8)
    r_true = digits(x, y)
    assert float(r_true.exp().mean()) > 0.9  # confident on held-out real digits of the asked class
    wrong = digits(x, (y + 1) % 10)
    assert float(wrong.mean()) < float(r_true.mean()) - 3.0
    null = torch.full_like(y, 10)
    torch.testing.assert_close(digits(x, null), torch.maximum(r_true, digits(x, null)))  # max over classes
    x16, _ = digits_tensors("test", 16)
    assert digits(x16[:4], y[:4]).shape == (4,)

    @REWARDS.register("_test_norm_reward")
    class NormReward(torch.nn.Module):
        def forward(self, x, cond=None):
            return -x.pow(2).sum(1)

    try:
        teacher, student = _nets()
        d = _tscd(student, teacher, reward="_test_norm_reward", reward_weight=1.0, reward_margin=0.0)
        out = d.loss(_batch(), 0, "student", StepRNG(0, 0))
        assert float(out["reward"]) < 0 and float(out["reward_loss"]) == pytest.approx(-float(out["reward"]))
    finally:
        REWARDS._items.pop("_test_norm_reward")


# -- adversarial -------------------------------------------------------------------------------
def test_mlp_feature_hook_is_the_forward_trunk():
    net = MLPFlowNet(data_dim=2, hidden=16, depth=3, num_classes=4, two_time=True)
    x, t, s, c = torch.randn(8, 2), torch.rand(8), torch.rand(8) * 0.5, torch.randint(0, 5, (8,))
    hs = net.features(x, t, s, cond=c)
    assert [h.shape for h in hs] == [(8, 16)] * 3 and net.feature_channels == [16, 16, 16]
    assert torch.equal(net.out(hs[-1]), net(x, t, s, cond=c))


def test_discriminator_hinge_loss_goes_down_on_a_fixed_batch():
    """The heads learn to tell re-noised targets from re-noised predictions of a student that is not
    (yet) consistent; the student's adversarial term reaches the student and not the heads' group."""
    teacher, student = _nets()
    with torch.no_grad():  # a student that overshoots every jump: pred − target ≈ (t − t')·4 per axis
        student.out.bias.add_(4.0)
    d = _tscd(student, teacher, adv_weight=0.1, adv_lr=1e-2, segments=1, num_steps=4)
    assert [g.name for g in d.optim_groups(1e-3)] == ["disc", "student"]
    groups = {g.name: g for g in d.optim_groups(1e-3)}
    assert groups["disc"].lr == 1e-2
    assert {id(p) for p in groups["disc"].params} == {id(p) for p in d.disc.parameters()}
    assert not {id(p) for p in groups["student"].params} & {id(p) for p in d.disc.parameters()}
    batch = _batch(256)
    opt = torch.optim.Adam(groups["disc"].params, lr=1e-2)

    def d_loss() -> torch.Tensor:
        return d.loss(batch, 0, "disc", StepRNG(4, 0))["loss"]

    first = float(d_loss().detach())
    assert first == pytest.approx(2.0, abs=0.1)  # an untrained head: D ≈ 0 on both
    for _ in range(80):
        opt.zero_grad()
        loss = d_loss()
        loss.backward()
        opt.step()
    assert all(p.grad is None for p in student.parameters())  # the D step never touches the student
    last = d.loss(batch, 0, "disc", StepRNG(4, 0))
    # 80 steps at lr 1e-2 on frozen random features: measured 2.00 → 1.61 (D(real) 0.27, D(fake) −0.26)
    assert float(last["loss"]) < 0.9 * first, (first, last)
    assert float(last["d_real"]) - float(last["d_fake"]) > 0.2
    out = d.loss(batch, 0, "student", StepRNG(4, 0))
    assert float(out["adv_g"]) > 0  # the trained D scores the student's predictions as fake
    grads = torch.autograd.grad(out["loss"], list(student.parameters()))
    base = _tscd(student, teacher, segments=1, num_steps=4).loss(batch, 0, "student", StepRNG(4, 0))["loss"]
    base_g = torch.autograd.grad(base, list(student.parameters()))
    assert max(float((a - b).abs().max()) for a, b in zip(grads, base_g, strict=True)) > 1e-8


def test_phases_hold_t_prime_between_consecutive_edges():
    """The adversarial re-noising time lives in the sample's phase ``[e, e⁺]``: ``e ≤ t' < e⁺`` with
    ``e⁺`` the next edge of the same segmentation (1 above the top edge), also for a unified student."""
    from flowdistill.core.segments import segment_edges

    teacher, student = _nets()
    for kw in (dict(segments=4, num_steps=20), dict(segments=1, num_steps=20),
               dict(segments=4, num_steps=20, segment_choices=[1, 2, 4], grid="shifted")):
        d = _tscd(student, teacher, **kw)
        grid = d.grid_ascending("cpu", torch.float64)
        tp = grid[torch.arange(20)]
        lo, hi = d.sample_phases(tp, grid, StepRNG(0, 0))
        assert bool((lo <= tp).all() and (tp < hi).all())
        consecutive = set()  # (e_j, e_{j+1}) of every trained segmentation, 1 above its top edge
        for k in d.cfg.trained_segments:
            e = segment_edges(grid, k).tolist() + [1.0]
            consecutive |= set(zip(e[:-1], e[1:], strict=True))
        assert set(zip(lo.tolist(), hi.tolist(), strict=True)) <= consecutive
        torch.testing.assert_close(lo, d.sample_edges(tp, grid, StepRNG(0, 0)), rtol=0, atol=0)


@pytest.mark.skipif(not TEACHER.is_dir(), reason="checkerboard teacher asset not shipped")
def test_training_loop_alternates_d_and_g_steps(tmp_path, monkeypatch):
    cfg = load_config(CONFIG, [f"out_dir={tmp_path / 'r'}", f"teacher={TEACHER}", "train.steps=3",
                               "train.batch_size=32", "train.ckpt_every=0", "distiller.num_steps=8",
                               "distiller.adv_weight=0.1", "distiller.dmd_weight=0.5"])
    d = build_distiller_for(cfg)
    calls: list[tuple[int, str]] = []
    loss = d.loss

    def spy(batch, step, group, rng):
        calls.append((step, group))
        return loss(batch, step, group, rng)

    monkeypatch.setattr(d, "loss", spy)
    from flowdistill.api import build_source

    tr = Trainer(d, cfg.train, cfg.out_dir, source=build_source(cfg.data))
    heads0 = [p.detach().clone() for p in d.disc.parameters()]
    tr.train_step()
    assert calls == [(0, "fake"), (0, "disc"), (0, "student")]
    assert any(not torch.equal(a, b) for a, b in zip(heads0, d.disc.parameters(), strict=True))
    tr.train_step()
    assert calls[3:] == [(1, "fake"), (1, "disc"), (1, "student")]


# -- checkpoints -------------------------------------------------------------------------------
@pytest.mark.skipif(not TEACHER.is_dir(), reason="checkerboard teacher asset not shipped")
def test_resume_with_every_extra_equals_uninterrupted(tmp_path):
    """ψ, the discriminator heads, their optimisers and the EMA target all travel with the
    checkpoint: a run stopped at step 3 and resumed ends bit-close to an uninterrupted 6-step run."""
    over = [f"teacher={TEACHER}", "train.steps=6", "train.ckpt_every=3", "train.batch_size=32",
            "train.warmup_steps=0", "train.log_every=1", "distiller.num_steps=8", "distiller.dmd_weight=0.5",
            "distiller.fake_repeats=2", "distiller.adv_weight=0.1", "distiller.adv_lr=1e-3",
            "distiller.reward=toy_density", "distiller.reward_weight=0.1",
            "distiller.reward_params={problem: checkerboard, n_ref: 256}"]
    full = train(load_config(CONFIG, [f"out_dir={tmp_path / 'full'}", *over]))
    cfg = load_config(CONFIG, [f"out_dir={tmp_path / 'part'}", *over])
    prepare_run_dir(Path(cfg.out_dir), to_yaml(cfg), resume=False, overwrite=False)
    from flowdistill.api import build_source

    tr = Trainer(build_distiller_for(cfg), cfg.train, cfg.out_dir, source=build_source(cfg.data))
    while tr.step < 3:
        tr.train_step()
    tr.save()
    ck = load_checkpoint(latest_checkpoint(Path(cfg.out_dir) / "checkpoints"))
    assert set(ck["optim"]) == {"fake", "disc", "student"}
    assert any(k.startswith("fake.") for k in ck["model"]) and any(k.startswith("disc.") for k in ck["model"])
    assert any(k.startswith("target.ema.") for k in ck["model"])
    assert not any(k.startswith("teacher.") for k in ck["model"])
    del tr
    train(cfg, resume=True)
    a, b = student_weights(full), student_weights(tmp_path / "part")
    assert a.keys() == b.keys() and not any(k.startswith(("fake", "disc")) for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    fa = load_checkpoint(latest_checkpoint(full / "checkpoints"))["model"]
    fb = load_checkpoint(latest_checkpoint(tmp_path / "part" / "checkpoints"))["model"]
    assert fa.keys() == fb.keys()
    for k in fa:
        torch.testing.assert_close(fa[k], fb[k], rtol=0, atol=1e-6)


# -- config errors -----------------------------------------------------------------------------
def test_config_errors_name_their_key():
    for bad, key in ((dict(dmd_weight=-1.0), "dmd_weight"), (dict(reward_weight=-0.5, reward="toy_density"),
                                                              "reward_weight"),
                     (dict(adv_weight=-0.1), "adv_weight"), (dict(fake_repeats=0), "fake_repeats"),
                     (dict(fake_lr_scale=0.0), "fake_lr_scale"), (dict(adv_lr=0.0), "adv_lr"),
                     (dict(adv_hidden=0), "adv_hidden"), (dict(reward_weight=1.0), "distiller.reward "),
                     (dict(reward="nope", reward_weight=1.0), "distiller.reward: unknown reward 'nope'"),
                     (dict(reward="toy_density"), "reward_weight=0")):
        with pytest.raises(ConfigError, match=key):
            TSCDConfig(**bad).validate()
    from flowdistill.core.timesteps import TimeSamplerConfig

    with pytest.raises(ConfigError, match="dmd_r_sampler"):
        TSCDConfig(dmd_r_sampler=TimeSamplerConfig(name="nope")).validate()

    class Field(torch.nn.Module):  # a teacher without a feature hook
        def forward(self, x, t, cond=None):
            return x

    _, student = _nets()
    with pytest.raises(ConfigError, match="adv_weight > 0 needs a teacher net with a feature hook"):
        _tscd(student, Field(), adv_weight=0.1)
    _tscd(student, Field(), dmd_weight=1.0)  # DMD needs no hook: ψ is a copy of any teacher


@pytest.mark.skipif(not TEACHER.is_dir(), reason="checkerboard teacher asset not shipped")
def test_cli_errors_are_one_line(tmp_path, capsys):
    for over, needle in (("distiller.reward=nope", "unknown reward 'nope'"),
                         ("distiller.adv_weight=-1", "distiller.adv_weight must be >= 0")):
        code, _, err = main_in_process(capsys, "distill", str(CONFIG), f"teacher={TEACHER}",
                                       f"out_dir={tmp_path / 'x'}", "distiller.reward_weight=1", over)
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and needle in lines[0], err
