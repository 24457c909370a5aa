"""A small PatchGAN discriminator (Isola et al. 2017, "pix2pix"), the adversarial term of tokenizers.

    D(x) = conv stack [C → w → 2w → … ] with stride-2 4×4 convolutions, LeakyReLU(0.2), GroupNorm,
           and a final 3×3 conv to one logit per patch: [B, 1, H', W']

Each output logit sees one receptive-field patch of the image; the hinge losses of
:mod:`flowdistill.models.discriminator` (:func:`hinge_d_loss`, :func:`hinge_g_loss`) are applied
to the patch logits averaged per image (RecTok's ``0.5·PatchGAN hinge after half of training``).
"""

from __future__ import annotations

from torch import Tensor, nn


class PatchDiscriminator(nn.Module):
    """PatchGAN: ``x [B, C, H, W] → logits [B]`` (the mean of the per-patch logits)."""

    def __init__(self, in_channels: int = 1, width: int = 32, layers: int = 2):
        """``layers`` stride-2 convs of width ``width·2^i`` on ``in_channels``-channel images."""
        super().__init__()
        if width < 1 or layers < 1:
            raise ValueError(f"PatchDiscriminator needs width >= 1 and layers >= 1, got {width}, {layers}")
        mods: list[nn.Module] = []
        cin = in_channels
        for i in range(layers):
            cout = width * 2**i
            mods += [nn.Conv2d(cin, cout, 4, stride=2, padding=1)]
            if i > 0:
                mods += [nn.GroupNorm(min(8, cout), cout)]
            mods += [nn.LeakyReLU(0.2)]
            cin = cout
        mods += [nn.Conv2d(cin, 1, 3, padding=1)]
        self.net = nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        """Per-image logit: the mean over the patch logits."""
        return self.net(x).flatten(1).mean(dim=1)


__all__ = ["PatchDiscriminator"]
