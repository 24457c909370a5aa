"""Digit detector and tracker for bouncing-digit video: positions of the digits in every frame.

All inputs are clips ``[n, F, C, H, W]`` in [-1, 1] (C = 1, or 3 averaged to gray). The motion and
appearance metrics of :mod:`flowdistill.eval.video_metrics` are computed on these tracks
(``docs/video_problem.md`` has the derivations and the measured accuracy).

- **Detector** (:func:`detect_positions`): intensity ``I = (x + 1)/2``, weights ``w = max(I − τ, 0)``
  (``τ = 0.1``). A clip holds 2 digits when at least 2 of its frames have ≥ 2 connected components
  of ``I > 0.3`` with ≥ 4 pixels each or its mean ink mass is that of two digits
  (:func:`count_digits`), else 1. One digit: the ``w``-weighted
  centroid per frame. Two digits: weighted 2-means on pixel coordinates per frame, initialised on
  frame 0 by the farthest-point rule and on every later frame at the constant-velocity prediction
  ``2·c_{f−1} − c_{f−2}`` of each track, so a track keeps its identity (frame-to-frame tracking).
  The centroid of a bilinearly translated sprite moves exactly with it, so on true clips the
  detected track is the true centre plus a constant per-digit offset (the ink's centroid, ≤ 2.2 px)
  plus the error of thresholding, quantisation and overlaps; :func:`detector_error` measures it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_DIGIT_SIZE = 12
#: Measured on 1 000 true clips of 16 frames (tests/test_video_metrics.py checks the bound
#: ``DETECTOR_TRACK_RMS_BOUND``): RMS of the detected track minus the true centre after removing
#: each track's constant ink offset, over frames whose digits are ``≥ d`` px apart.
DETECTOR_TRACK_RMS_BOUND = 0.25


def _gray(frames: Tensor) -> Tensor:
    """``[n, F, C, H, W]`` in [-1, 1] → intensities ``[n, F, H, W]`` in [0, 1]."""
    if frames.dim() != 5 or frames.shape[2] not in (1, 3):
        raise ValueError(f"clips must be [n, F, 1|3, H, W], got shape {tuple(frames.shape)}")
    x = frames.detach().to(torch.float32).cpu()
    x = x.mean(dim=2) if x.shape[2] == 3 else x[:, :, 0]
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def count_digits(
    frames: Tensor,
    max_digits: int = 2,
    *,
    level: float = 0.3,
    min_pixels: int = 4,
    two_frames: int = 2,
    two_mass: float = 62.0,
) -> Tensor:
    """Digits per clip ``[n]`` (0, 1 or 2).

    2 when at least ``two_frames`` frames show ≥ 2 connected components of ``I > level`` with
    ≥ ``min_pixels`` pixels each, or when the mean ink mass ``Σ I`` per frame is ≥ ``two_mass``
    (digits that overlap all along; on 400 true test clips one digit has at most 57.1 and two at
    least 58.1 at the default sizes); 0 when no frame has any ink above ``level``; else 1.
    """
    from scipy import ndimage

    inten = _gray(frames).numpy()
    n, nf = inten.shape[:2]
    comps = np.zeros((n, nf), dtype=np.int64)
    for i in range(n):
        for f in range(nf):
            lab, k = ndimage.label(inten[i, f] > level)
            if k:
                sizes = np.bincount(lab.ravel())[1:]
                comps[i, f] = int((sizes >= min_pixels).sum())
    many = ((comps >= 2).sum(axis=1) >= min(two_frames, nf)) | (
        inten.sum(axis=(2, 3)).mean(axis=1) >= two_mass
    )
    some = (comps >= 1).any(axis=1)
    count = np.where(many & (max_digits >= 2), 2, np.where(some, 1, 0))
    return torch.from_numpy(count)


def _weighted_kmeans2(w: Tensor, coords: Tensor, init: Tensor, iters: int) -> Tensor:
    """Weighted 2-means: ``w [n, P]``, pixel ``coords [P, 2]``, ``init [n, 2, 2]`` → centres ``[n, 2, 2]``.

    Lloyd's iterations: assign each pixel to its nearest centre, move each centre to the
    ``w``-weighted mean of its pixels (a centre with no weight stays where it is).
    """
    c = init.clone()
    for _ in range(iters):
        d2 = ((coords.view(1, -1, 1, 2) - c.view(-1, 1, 2, 2)) ** 2).sum(-1)  # [n, P, 2]
        a = F.one_hot(d2.argmin(-1), 2).to(w.dtype) * w.unsqueeze(-1)  # [n, P, 2]
        mass = a.sum(1)  # [n, 2]
        mean = torch.einsum("npk,pc->nkc", a, coords) / mass.clamp_min(1e-12).unsqueeze(-1)
        c = torch.where(mass.unsqueeze(-1) > 1e-9, mean, c)
    return c


def _farthest_init(w: Tensor, coords: Tensor) -> Tensor:
    """Initial 2 centres ``[n, 2, 2]``: the weighted pixel farthest from the centroid, then the one
    farthest from it."""
    mass = w.sum(1, keepdim=True).clamp_min(1e-12)
    cen = (w @ coords) / mass
    on = w > 0
    d_cen = ((coords.unsqueeze(0) - cen.unsqueeze(1)) ** 2).sum(-1).masked_fill(~on, -1.0)
    a = coords[d_cen.argmax(1)]
    d_a = ((coords.unsqueeze(0) - a.unsqueeze(1)) ** 2).sum(-1).masked_fill(~on, -1.0)
    b = coords[d_a.argmax(1)]
    return torch.stack([a, b], dim=1)


def _track_two(w: Tensor, coords: Tensor, iters: int, size: float, apart: float) -> Tensor:
    """Two tracks ``[n, F, 2, 2]`` from weights ``[n, F, P]``: per-frame 2-means with tracking.

    Each frame's 2-means starts at the tracks' predictions (frame 0: farthest-point init); the two
    centres are then assigned to the predictions by the cheaper of the two pairings. A track's
    velocity is updated only on frames where the centres are ``≥ apart`` px apart on this and the
    previous frame; while the digits overlap each track coasts at its last velocity from its last
    separated position, so identities survive a crossing.
    """
    n, nf = w.shape[:2]
    tracks = []
    last = vel = None
    since = torch.zeros(n, 1, 1)
    prev_apart = torch.zeros(n, dtype=torch.bool)
    for f in range(nf):
        if last is None:
            pred = _farthest_init(w[:, f], coords)
        else:
            pred = (last + vel * since).clamp(0.0, size - 1.0)
        c = _weighted_kmeans2(w[:, f], coords, pred, iters)
        if last is not None:  # keep identities: the pairing closer to the predictions
            swapped = c.flip(1)
            swap = (swapped - pred).norm(dim=-1).sum(-1) < (c - pred).norm(dim=-1).sum(-1)
            c = torch.where(swap.view(n, 1, 1), swapped, c)
        sep_ok = (c[:, 0] - c[:, 1]).norm(dim=-1) >= apart
        if last is None:
            last, vel = c.clone(), torch.zeros_like(c)
            since = torch.ones(n, 1, 1)
        else:
            upd_vel = (sep_ok & prev_apart).view(n, 1, 1)
            vel = torch.where(upd_vel, (c - last) / since, vel)
            last = torch.where(sep_ok.view(n, 1, 1), c, last)
            since = torch.where(sep_ok.view(n, 1, 1), torch.ones_like(since), since + 1.0)
        prev_apart = sep_ok
        tracks.append(c)
    return torch.stack(tracks, dim=1)


def detect_positions(
    frames: Tensor,
    max_digits: int = 2,
    *,
    threshold: float = 0.1,
    iters: int = 8,
    apart: float = 10.0,
    counts: Tensor | None = None,
) -> Tensor:
    """Digit centres ``[n, F, max_digits, 2]`` (px, ``(x, y)``; NaN for absent tracks) of clips.

    See the module docstring for the method (threshold + centroid; 2-means with constant-velocity
    tracking for two digits). ``counts [n]`` overrides the estimated number of digits per clip.
    Accuracy on true clips: :data:`DETECTOR_TRACK_RMS_BOUND` and ``docs/video_problem.md``.
    """
    if max_digits not in (1, 2):
        raise ValueError(f"detect_positions supports max_digits 1 or 2, got {max_digits}")
    inten = _gray(frames)
    n, nf, h, wd = inten.shape
    w = (inten - threshold).clamp_min(0.0).view(n, nf, h * wd)
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(wd, dtype=torch.float32), indexing="ij"
    )
    coords = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1)  # [P, 2] (x, y)
    counts = count_digits(frames, max_digits) if counts is None else counts.to(torch.long).cpu()
    out = torch.full((n, nf, max_digits, 2), float("nan"))
    mass = w.sum(-1)  # [n, F]
    cen = (w @ coords) / mass.clamp_min(1e-12).unsqueeze(-1)  # [n, F, 2]
    cen = torch.where(mass.unsqueeze(-1) > 1e-6, cen, torch.full_like(cen, float("nan")))
    one = counts == 1
    out[one, :, 0] = cen[one]
    two = (counts == 2).nonzero(as_tuple=True)[0]
    if max_digits == 2 and two.numel():
        out[two] = _track_two(w[two], coords, iters, float(min(h, wd)), apart)
    return out


def detector_error(
    detected: Tensor, true_positions: Tensor, present: Tensor, min_separation: float = DEFAULT_DIGIT_SIZE
) -> dict[str, float]:
    """Accuracy of :func:`detect_positions` against the generator's true centres.

    Tracks are matched to true digits per clip (the permutation with the smaller mean error).
    Returns ``raw_rms`` (px, detected − true), ``track_rms`` (px, after removing each track's mean
    offset: the ink centroid is not the box centre, and a constant offset does not affect motion)
    and per clip its median (``clip_track_rms_median``) and the fraction of clips under
    :data:`DETECTOR_TRACK_RMS_BOUND` (``clips_within_bound``), and ``count_acc`` (fraction of clips
    whose number of tracks is right); frames where two true
    digits are closer than ``min_separation`` are left out of the RMS values.
    """
    det, tru = detected.double(), true_positions.double()
    n, nf, d = tru.shape[:3]
    if d == 2 and det.shape[2] == 2:
        swapped = det.flip(2)
        e0 = (det - tru).norm(dim=-1).nan_to_num(1e6).sum((1, 2))  # a missed or extra track costs 1e6
        e1 = (swapped - tru).norm(dim=-1).nan_to_num(1e6).sum((1, 2))
        det = torch.where((e1 < e0).view(n, 1, 1, 1), swapped, det)
    det = det[:, :, :d]
    found = detected[:, 0, :, 0].isfinite().sum(1)
    count_acc = float((found == present.sum(1)).double().mean())
    ok = det.isfinite().all(-1) & tru.isfinite().all(-1)  # [n, F, D]
    if d == 2:
        sep = (tru[:, :, 0] - tru[:, :, 1]).norm(dim=-1)
        apart = ~(sep < min_separation)  # NaN (one digit) counts as apart
        ok &= apart.unsqueeze(-1)
    diff = (det - tru).where(ok.unsqueeze(-1), torch.zeros((), dtype=det.dtype))
    cnt = ok.sum(1, keepdim=True).clamp_min(1).unsqueeze(-1)
    centred = (diff - diff.sum(1, keepdim=True) / cnt).where(
        ok.unsqueeze(-1), torch.zeros((), dtype=det.dtype)
    )
    m = ok.sum().clamp_min(1)
    per_clip = (centred.pow(2).sum(-1).sum((1, 2)) / ok.sum((1, 2)).clamp_min(1)).sqrt()[ok.any(2).any(1)]
    return {
        "raw_rms": float((diff.pow(2).sum(-1).sum() / m).sqrt()),
        "track_rms": float((centred.pow(2).sum(-1).sum() / m).sqrt()),
        "clip_track_rms_median": float(per_clip.median()) if per_clip.numel() else float("nan"),
        "clips_within_bound": float((per_clip < DETECTOR_TRACK_RMS_BOUND).double().mean()),
        "count_acc": count_acc,
    }


__all__ = [
    "DEFAULT_DIGIT_SIZE",
    "DETECTOR_TRACK_RMS_BOUND",
    "count_digits",
    "detect_positions",
    "detector_error",
]
