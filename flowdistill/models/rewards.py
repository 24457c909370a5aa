"""Rewards ``R(x̂0, cond) -> [B]`` (higher is better) for reward terms on generated samples.

Hyper-SD adds human-feedback terms (an aesthetic predictor, ImageReward, instance segmentation) to
its low-step students (METHODS.md §3); here a reward is any frozen module registered in
:data:`REWARDS` by name, so configs name it (``distiller.reward: NAME``, its options in
``distiller.reward_params``) and a ``--plugin`` module can add its own::

    @REWARDS.register("my_reward")
    class MyReward(nn.Module):
        def forward(self, x, cond=None):   # x [B, ...] in data space -> [B]
            ...

Built in:

- ``toy_density`` (2-D toys): a smoothed log-density of the toy problem's known generator;
- ``digits_confidence`` (class-conditional digits): a small reward classifier's log-probability
  of the requested class — a different network from the one FID and KID use.

**Why these are fair.** A reward must not be the evaluation metric itself, or a student could
score well by gaming it. *Toys*: the metric is the sliced W2 distance between a whole set of
samples and fresh target samples (a distribution-level distance that sees how mass is spread).
``toy_density`` is pointwise: it says whether one point lies where the target has mass, and it is
flat (zero margin loss) over the whole support, so it cannot tell a student that puts all its mass
in one square from a perfect one — only the distillation loss can. It is built from its own
reference draws (seed ``seed``, not an evaluation seed), and the distiller that uses it (TSCD)
already trains on batches of the same generator (consistency distillation uses data), so it adds
no information the method did not have; it is the toy analogue of an aesthetic predictor (a
"does this look like the data" score) rather than of the benchmark. *Digits*: FID/KID use the
bundled digits classifier's 64-d penultimate features (:mod:`flowdistill.models.digits_classifier`,
a CNN at 16×16). ``digits_confidence`` uses a separate MLP on 8×8 pixels with its own weights
(``assets/digits_reward_mlp.safetensors``, ``scripts/train_digits_reward_net.py``, trained on the
train split only; FID is measured against the test split) and only its class logits. The two nets
learned from the same images, so a reward-tuned student may still move FID (a sharper, more
prototypical digit); a reward that *shared* the FID features would make any FID gain meaningless,
this one only makes it less independent than a human rating would be.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from flowdistill.core.registry import Registry
from flowdistill.data.toy2d import TOY_DATASETS
from flowdistill.resources import assets_dir

REWARDS: Registry = Registry("reward")

DIGITS_REWARD_WEIGHTS = assets_dir() / "digits_reward_mlp.safetensors"


def build_reward(name: str, **params) -> nn.Module:
    """A frozen reward ``R(x, cond) -> [B]`` by registered name, with its own ``params``."""
    net = REWARDS.build(name, **params)
    return net.eval().requires_grad_(False)


class LazyReward:
    """A frozen reward built on first use and moved to the caller's device.

    Not an ``nn.Module``: held by a distiller it stays out of the module tree (never checkpointed,
    wrapped by the engine or trained)."""

    def __init__(self, name: str, params: dict | None = None):
        self.name, self.params = name, dict(params or {})
        self._net: nn.Module | None = None

    def __call__(self, device) -> nn.Module:
        """The reward on ``device`` (built the first time)."""
        if self._net is None:
            self._net = build_reward(self.name, **self.params)
        self._net = self._net.to(device)
        return self._net


def margin_loss(reward: Tensor, margin: float) -> Tensor:
    """Per-sample hinge ``relu(margin − R)``: zero once the reward clears the margin, else the
    shortfall (its gradient pushes ``R`` up with unit slope)."""
    return F.relu(margin - reward)


@REWARDS.register("toy_density")
class ToyDensityReward(nn.Module):
    """Smoothed log-density of a toy problem's generator, shifted so the data's low quantile is 0:

        R(x) = log p_h(x) − q,   p_h(x) = (1/M)·Σ_j N(x; y_j, h²·I),   y_j ~ target (M = n_ref),

    a Gaussian kernel density of ``M`` exact generator draws (bandwidth ``h``), and ``q`` the
    ``quantile`` of ``log p_h`` over ``M`` further generator draws. So ``R ≥ 0`` for a share
    ``1 − quantile`` of true samples, and ``R`` falls off like ``−dist²/(2h²)`` away from the
    support (a smooth pull toward it). ``cond`` is ignored. Fairness: module docstring.
    """

    def __init__(self, problem: str = "checkerboard", bandwidth: float = 0.1, n_ref: int = 2048,
                 quantile: float = 0.05, seed: int = 777) -> None:
        super().__init__()
        if not bandwidth > 0 or not 0.0 < quantile < 1.0 or int(n_ref) < 2:
            raise ValueError(f"reward 'toy_density' needs bandwidth > 0, quantile in (0, 1) and n_ref >= 2, "
                             f"got bandwidth={bandwidth}, quantile={quantile}, n_ref={n_ref}")
        toy = TOY_DATASETS.build(problem)
        g = torch.Generator().manual_seed(int(seed))
        refs, _ = toy.sample(int(n_ref), generator=g)
        held, _ = toy.sample(int(n_ref), generator=g)
        self.h = float(bandwidth)
        self.register_buffer("refs", refs.to(torch.float32))
        self.register_buffer("offset", torch.zeros((), dtype=torch.float32))
        self.offset = torch.quantile(self.log_density(held), float(quantile))

    def log_density(self, x: Tensor) -> Tensor:
        """``log p_h(x)`` ``[B]`` (float32 inside; the kernel sum by ``logsumexp``)."""
        xd = x.to(torch.float32)
        # ‖x − y‖² = ‖x‖² − 2·x·y + ‖y‖² by one matmul (cdist's backward is far slower on a CPU)
        d2 = (xd.pow(2).sum(1, keepdim=True) - 2 * xd @ self.refs.T + self.refs.pow(2).sum(1)).clamp_min(0)
        dim = self.refs.shape[1]
        norm = math.log(self.refs.shape[0]) + 0.5 * dim * math.log(2 * math.pi * self.h ** 2)
        return torch.logsumexp(-d2 / (2 * self.h ** 2), dim=1) - norm

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """``R(x)`` ``[B]`` in ``x``'s dtype."""
        if x.ndim != 2 or x.shape[1] != self.refs.shape[1]:
            raise ValueError(f"reward 'toy_density' expects points [B, {self.refs.shape[1]}], "
                             f"got {tuple(x.shape)}")
        return (self.log_density(x) - self.offset).to(x.dtype)


class DigitsRewardMLP(nn.Module):
    """The digits reward classifier: images ``[B, 1|3, S, S]`` in [-1, 1] → 10 logits, through an
    8×8 area average (``S`` a multiple of 8), ``Linear(64, 128) → SiLU → Linear(128, 10)``.
    Deliberately not the FID feature CNN (:mod:`flowdistill.models.rewards`, fairness)."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``[B, 10]``."""
        if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[-1] % 8 or x.shape[-2] % 8:
            raise ValueError(f"digits reward expects [B, 1|3, S, S] images with S a multiple of 8, "
                             f"got {tuple(x.shape)}")
        x = x.mean(dim=1, keepdim=True)
        x = F.adaptive_avg_pool2d(x, 8).flatten(1)
        return self.fc2(F.silu(self.fc1(x)))


@REWARDS.register("digits_confidence")
class DigitsConfidenceReward(nn.Module):
    """``R(x, c) = log p(c | x)`` under :class:`DigitsRewardMLP` for the requested class ``c``
    (``≤ 0``; ``log 0.9 ≈ −0.105`` is a natural margin); for a null or missing label (index
    ``≥ 10``) ``R = max_c log p(c | x)``, the confidence that ``x`` is *some* digit. Weights:
    ``weights`` (default ``assets/digits_reward_mlp.safetensors``), loaded with safetensors."""

    def __init__(self, weights: str = "") -> None:
        super().__init__()
        path = weights or DIGITS_REWARD_WEIGHTS
        if not os.path.isfile(path):
            raise ValueError(f"digits reward weights {str(path)!r} not found "
                             f"(run scripts/train_digits_reward_net.py)")
        self.net = DigitsRewardMLP()
        self.net.load_state_dict(load_file(str(path)))

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        """``[B]`` log-probabilities (float32 inside)."""
        logp = F.log_softmax(self.net(x.float()), dim=1)
        best = logp.max(dim=1).values
        if cond is None:
            return best.to(x.dtype)
        c = cond.to(logp.device).long()
        valid = c < logp.shape[1]
        picked = logp.gather(1, c.clamp(max=logp.shape[1] - 1)[:, None]).squeeze(1)
        return torch.where(valid, picked, best).to(x.dtype)


__all__ = [
    "DIGITS_REWARD_WEIGHTS",
    "REWARDS",
    "DigitsConfidenceReward",
    "DigitsRewardMLP",
    "LazyReward",
    "ToyDensityReward",
    "build_reward",
    "margin_loss",
]
