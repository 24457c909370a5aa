"""Perceptual networks: frozen distances ``net(a, b) -> [B]`` for the perceptual premetrics.

:data:`PERCEPTUAL_NETS` (pluggable) holds ``lpips`` (the ``lpips`` package with user-supplied
weights), ``digits`` (the bundled digits classifier's features,
:mod:`flowdistill.models.digits_classifier`) and ``random_conv`` (fixed random features; offline,
no weights, any shape). Build one with :func:`build_perceptual` and pass it as ``net=`` to the
``perceptual`` / ``lpips_huber`` premetrics of :mod:`flowdistill.core.losses`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowdistill.core.registry import Registry
from flowdistill.models.digits_classifier import load_digits_classifier

PERCEPTUAL_NETS: Registry = Registry("perceptual net")


def build_perceptual(name: str, weights: str = "") -> nn.Module:
    """A frozen perceptual distance ``net(a, b) -> [B]`` by registered name."""
    net = PERCEPTUAL_NETS.build(name, weights=weights)
    return net.eval().requires_grad_(False)


class LazyPerceptual:
    """A frozen perceptual net built on first use and moved to the caller's device.

    Not an ``nn.Module``: held as a distiller attribute it stays out of the module tree, so it is
    never checkpointed, wrapped by the engine or counted as trainable."""

    def __init__(self, name: str, weights: str = ""):
        self.name, self.weights = name, weights
        self._net: nn.Module | None = None

    def __call__(self, device) -> nn.Module:
        """The net on ``device`` (built the first time)."""
        if self._net is None:
            self._net = build_perceptual(self.name, self.weights)
        self._net = self._net.to(device)
        return self._net


@PERCEPTUAL_NETS.register("random_conv")
class RandomFeatureDistance(nn.Module):
    """Fixed random-feature distance: needs no weights, runs offline, accepts any shape.

    Images ``[B, C, H, W]``: three random 3×3 conv layers (32, 64, 64 channels, ReLU, 2× average
    pooling between), seeded by ``seed``; as in LPIPS, each layer's features are unit-normalised
    over channels and the squared difference is averaged over positions and summed over layers.
    Random deep features already behave like a (weak) perceptual metric. Flat ``[B, D]`` data:
    random Fourier features ``φ(x) = √(2/m)·cos(W x + b)``, ``W ~ N(0, 1/ℓ²)`` (``m = 256``,
    ``ℓ = 0.5``), distance ``‖φ(a) − φ(b)‖²`` (≈ ``‖a − b‖²/ℓ²`` for close points, bounded for far).
    """

    def __init__(self, weights: str = "", seed: int = 0, channels: tuple[int, ...] = (32, 64, 64),
                 rff_features: int = 256, lengthscale: float = 0.5) -> None:
        super().__init__()
        if weights:
            raise ValueError("perceptual net 'random_conv' takes no weights")
        self.seed, self.channels, self.m, self.ell = seed, channels, rff_features, lengthscale
        self._built: dict[tuple, list[Tensor]] = {}

    def _params(self, shape: tuple[int, ...], device, dtype) -> list[Tensor]:
        key = (shape, str(device), dtype)
        if key not in self._built:
            g = torch.Generator().manual_seed(self.seed)
            if len(shape) == 1:
                W = torch.randn(shape[0], self.m, generator=g) / self.ell
                b = 2 * math.pi * torch.rand(self.m, generator=g)
                ps = [W, b]
            else:
                ps, cin = [], shape[0]
                for cout in self.channels:
                    ps.append(torch.randn(cout, cin, 3, 3, generator=g) * math.sqrt(2.0 / (9 * cin)))
                    cin = cout
            self._built[key] = [p.to(device=device, dtype=dtype) for p in ps]
        return self._built[key]

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """Per-sample distance ``[B]``."""
        ps = self._params(tuple(a.shape[1:]), a.device, a.dtype)
        if a.ndim == 2:
            W, bias = ps
            fa = torch.cos(a @ W + bias) * math.sqrt(2.0 / self.m)
            fb = torch.cos(b @ W + bias) * math.sqrt(2.0 / self.m)
            return (fa - fb).pow(2).sum(dim=1)
        if a.ndim != 4:
            raise ValueError(f"random_conv expects [B, D] or [B, C, H, W], got {tuple(a.shape)}")
        h = torch.cat([a, b])
        total = torch.zeros(a.shape[0], device=a.device, dtype=a.dtype)
        for i, w in enumerate(ps):
            if i > 0 and min(h.shape[-2:]) >= 2:
                h = F.avg_pool2d(h, 2)
            h = F.relu(F.conv2d(h, w, padding=1))
            n = h / (h.pow(2).sum(dim=1, keepdim=True) + 1e-10).sqrt()
            na, nb = n.chunk(2)
            total = total + (na - nb).pow(2).sum(dim=1).mean(dim=(1, 2))
        return total


@PERCEPTUAL_NETS.register("lpips")
class LPIPSDistance(nn.Module):
    """LPIPS (Zhang et al. 2018) through the ``lpips`` package, with weights the user supplies.

    ``weights``: a ``.safetensors`` (or ``.pt``, loaded with ``weights_only=True``) file holding the
    full ``lpips.LPIPS`` state dict (backbone + linear heads) — nothing is downloaded. Inputs in
    ``[-1, 1]``; 1-channel images are repeated to 3 channels.
    """

    def __init__(self, weights: str = "", backbone: str = "vgg") -> None:
        super().__init__()
        if not weights:
            raise ValueError("perceptual net 'lpips' needs perceptual_weights=PATH (LPIPS weights are not "
                             "bundled; use 'random_conv' or 'digits' offline)")
        try:
            import lpips
        except ImportError:
            raise ImportError("perceptual net 'lpips' needs the lpips package (pip install lpips)") from None
        self.net = lpips.LPIPS(net=backbone, pretrained=False, pnet_rand=True, verbose=False)
        if str(weights).endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(str(weights))
        else:
            sd = torch.load(str(weights), map_location="cpu", weights_only=True)
        self.net.load_state_dict(sd)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """Per-sample LPIPS ``[B]``."""
        if a.shape[1] == 1:
            a, b = a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1)
        return self.net(a, b).reshape(a.shape[0])


@PERCEPTUAL_NETS.register("digits")
class DigitsFeatureDistance(nn.Module):
    """Mean squared difference of the bundled digits classifier's 64-d penultimate features.

    The classifier is :class:`~flowdistill.models.digits_classifier.DigitsClassifier` (weights in
    ``assets/``); ``weights`` overrides the bundled file.
    """

    def __init__(self, weights: str = "") -> None:
        super().__init__()
        self.net = load_digits_classifier(weights or None)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """Per-sample feature distance ``[B]`` (images in ``[-1, 1]``)."""
        fa, _ = self.net.features(a)
        fb, _ = self.net.features(b)
        return (fa - fb).pow(2).mean(dim=1)


__all__ = [
    "PERCEPTUAL_NETS",
    "DigitsFeatureDistance",
    "LPIPSDistance",
    "RandomFeatureDistance",
    "build_perceptual",
]
