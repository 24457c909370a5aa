"""Metrics of generated bouncing-digit video: frame quality, motion, seams at chunk boundaries.

All inputs are clips ``[n, F, C, H, W]`` in [-1, 1] (C = 1, or 3 averaged to gray). Definitions
(``docs/video_problem.md`` has the derivations and the measured floors):

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
- **Valid coordinates**: a detected coordinate is used by the motion metrics only where no bounce
  can have happened and the digits are apart: inside ``[m, S − 1 − m]`` with ``wall_margin``
  ``m = (d − 1)/2 + 2.5 + 2.5`` (sprite half-width + largest ink offset + largest speed: a bounce
  moves the box centre to the wall, so a centroid at least ``m`` from the frame edge at every frame
  of a stencil rules a bounce inside it out), and the two tracks at least ``min_separation = d`` px
  apart (overlapping digits are not separable by a centroid). On the kept coordinates the
  constant-velocity-with-bounces model is plain constant velocity, so:
- **pos_error**: RMS residual of a least-squares line ``p(f) ≈ a + b·f`` fitted per track and
  coordinate on every sliding window of ``window = 5`` frames whose coordinates are all valid (px).
- **Velocity jump** of transition ``f → f+1`` (``f ≥ 1``), per track and coordinate:
  ``J_f = |p_{f+1} − 2 p_f + p_{f−1}| = |v_f − v_{f−1}|`` with ``v_f = p_{f+1} − p_f`` (px/frame²),
  where the three positions are valid. ``vel_jump_boundary`` averages ``J_f`` over transitions that
  cross a chunk boundary (``boundaries[f]``); ``vel_jump_within`` over transitions with neither
  ``boundaries[f]`` nor ``boundaries[f−1]`` (a jump at a seam also changes ``J_{f+1}``, which would
  otherwise pollute the within-chunk mean).
- **Appearance jump** of transition ``f → f+1``, per track: mean absolute difference (in [-1, 1]
  units) of the ``(d + 2)²`` crops centred at the detected positions in frames ``f`` and ``f + 1``
  (bilinear crops, background outside the frame), where both positions are finite and the tracks
  apart; motion is compensated by the crop, so what remains is a change of the digit itself.
  Boundary / within split by ``boundaries[f]``.
- **Frame FID / KID**: features of :class:`~flowdistill.models.frame_features.FrameFeatureNet` on
  uint8-quantised frames (as :mod:`flowdistill.eval.fid` feeds its networks), and torch-fidelity's
  FID and KID functions (the ones :mod:`flowdistill.eval.fid` uses). Per seed: ``n`` generated
  frames and ``n`` reference frames drawn without replacement; the floor is the same metric between
  those reference frames and ``n`` other reference frames (equal sizes, DESIGN's metric protocol);
  mean and standard deviation over the seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from flowdistill.eval.image_io import to_uint8

DEFAULT_DIGIT_SIZE = 12
MAX_SPEED = 2.5
MAX_INK_OFFSET = 2.5
#: Measured on 1 000 true clips of 16 frames (tests/test_video_metrics.py checks the bound
#: ``DETECTOR_TRACK_RMS_BOUND``): RMS of the detected track minus the true centre after removing
#: each track's constant ink offset, over frames whose digits are ``≥ d`` px apart.
DETECTOR_TRACK_RMS_BOUND = 0.25


# --------------------------------------------------------------------------- detector
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


# --------------------------------------------------------------------------- motion metrics
def _valid_coords(pos: Tensor, size: int, wall_margin: float, min_separation: float) -> Tensor:
    """``[n, F, D, 2]`` bool: finite, at least ``wall_margin`` from the frame edge, tracks apart."""
    ok = pos.isfinite() & (pos >= wall_margin) & (pos <= size - 1 - wall_margin)
    if pos.shape[2] == 2:
        sep = (pos[:, :, 0] - pos[:, :, 1]).norm(dim=-1)
        close = sep < min_separation  # NaN → False (a lone digit is never close)
        ok &= ~close.view(*close.shape, 1, 1)
    return ok


def _mean(values: Tensor, mask: Tensor) -> float:
    """Mean of ``values`` where ``mask`` (NaN when empty)."""
    k = int(mask.sum())
    return float(values[mask].double().mean()) if k else float("nan")


def _boundary_masks(boundaries: Tensor | Sequence[bool] | None, nf: int) -> tuple[Tensor, Tensor | None]:
    """``(within [F−1], boundary [F−1] | None)`` transition masks from a ``boundaries [F−1]`` mask."""
    if boundaries is None:
        return torch.ones(nf - 1, dtype=torch.bool), None
    b = torch.as_tensor(boundaries, dtype=torch.bool).cpu()
    if b.shape != (nf - 1,):
        raise ValueError(f"boundaries must be a bool mask of shape [F-1] = [{nf - 1}], got {tuple(b.shape)}")
    return ~b, b


def motion_metrics(
    positions: Tensor,
    *,
    size: int,
    boundaries: Tensor | Sequence[bool] | None = None,
    digit_size: int = DEFAULT_DIGIT_SIZE,
    wall_margin: float | None = None,
    min_separation: float | None = None,
    window: int = 5,
) -> dict[str, float]:
    """``pos_error``, ``vel_jump_within`` and ``vel_jump_boundary`` of tracks ``[n, F, D, 2]``
    (definitions in the module docstring; NaN where no sample qualifies)."""
    pos = positions.double().cpu()
    n, nf = pos.shape[:2]
    m = (digit_size - 1) / 2 + MAX_INK_OFFSET + MAX_SPEED if wall_margin is None else wall_margin
    sep = float(digit_size) if min_separation is None else min_separation
    ok = _valid_coords(pos, size, m, sep)  # [n, F, D, 2]
    out: dict[str, float] = {}
    # sliding-window constant-velocity fit
    if nf >= window:
        win = pos.unfold(1, window, 1)  # [n, W, D, 2, window]
        okw = ok.unfold(1, window, 1).all(-1)
        t = torch.arange(window, dtype=torch.float64)
        tc = t - t.mean()
        slope = ((win - win.mean(-1, keepdim=True)) * tc).sum(-1, keepdim=True) / tc.pow(2).sum()
        resid = win - win.mean(-1, keepdim=True) - slope * tc
        r2 = resid.pow(2).mean(-1)
        out["pos_error"] = float(r2[okw].mean().sqrt()) if okw.any() else float("nan")
    else:
        out["pos_error"] = float("nan")
    # velocity jumps J_f, f = 1..F-2, attached to transition f
    within, bound = _boundary_masks(boundaries, nf)
    if nf >= 3:
        jump = (pos[:, 2:] - 2 * pos[:, 1:-1] + pos[:, :-2]).abs()  # [n, F-2, D, 2] for f = 1..F-2
        okj = ok[:, 2:] & ok[:, 1:-1] & ok[:, :-2]
        tw = within[1:] & within[:-1]  # neither transition f nor f-1 crosses a boundary
        out["vel_jump_within"] = _mean(jump, okj & tw.view(1, -1, 1, 1))
        out["vel_jump_boundary"] = (
            _mean(jump, okj & bound[1:].view(1, -1, 1, 1)) if bound is not None else float("nan")
        )
    else:
        out["vel_jump_within"] = out["vel_jump_boundary"] = float("nan")
    out["n_vel_samples"] = float(okj.sum()) if nf >= 3 else 0.0
    return out


def _crops(inten: Tensor, pos: Tensor, crop: int) -> Tensor:
    """Bilinear crops ``[M, crop, crop]`` of images ``[M, H, W]`` centred at ``pos [M, 2]``."""
    m, h, w = inten.shape
    off = torch.arange(crop, dtype=torch.float32) - (crop - 1) / 2.0
    px = pos[:, 0].float().view(m, 1, 1) + off.view(1, 1, crop)
    py = pos[:, 1].float().view(m, 1, 1) + off.view(1, crop, 1)
    grid = torch.stack(
        [(2 * px / (w - 1) - 1).expand(m, crop, crop), (2 * py / (h - 1) - 1).expand(m, crop, crop)], -1
    )
    return F.grid_sample(inten.unsqueeze(1), grid, mode="bilinear", padding_mode="zeros", align_corners=True)[
        :, 0
    ]


def appearance_jumps(
    frames: Tensor,
    positions: Tensor,
    *,
    boundaries: Tensor | Sequence[bool] | None = None,
    digit_size: int = DEFAULT_DIGIT_SIZE,
    min_separation: float | None = None,
) -> dict[str, float]:
    """``app_jump_within`` / ``app_jump_boundary``: motion-compensated crop differences (module docstring)."""
    inten = _gray(frames)
    n, nf, h, w = inten.shape
    pos = positions.cpu()
    dmax = pos.shape[2]
    sep = float(digit_size) if min_separation is None else min_separation
    ok = pos.isfinite().all(-1)  # [n, F, D]
    if dmax == 2:
        ok &= ~((pos[:, :, 0] - pos[:, :, 1]).norm(dim=-1) < sep).unsqueeze(-1)
    okt = ok[:, 1:] & ok[:, :-1]  # [n, F-1, D]
    crop = digit_size + 2
    vals = torch.zeros(n, nf - 1, dmax)
    for k in range(dmax):
        sel = okt[:, :, k]
        if not sel.any():
            continue
        ii, ff = sel.nonzero(as_tuple=True)
        a = _crops(inten[ii, ff], pos[ii, ff, k], crop)
        b = _crops(inten[ii, ff + 1], pos[ii, ff + 1, k], crop)
        vals[ii, ff, k] = 2.0 * (a - b).abs().mean((1, 2))  # ×2: intensity → [-1, 1] units
    within, bound = _boundary_masks(boundaries, nf)
    return {
        "app_jump_within": _mean(vals, okt & within.view(1, -1, 1)),
        "app_jump_boundary": _mean(vals, okt & bound.view(1, -1, 1)) if bound is not None else float("nan"),
    }


# --------------------------------------------------------------------------- frame FID / KID
@torch.no_grad()
def frame_features(frames: Tensor, weights: str | None = None, chunk: int = 256) -> Tensor:
    """Frame-net features ``[N, 64]`` of frames ``[N, C, H, W]`` (or clips, flattened) in [-1, 1],
    quantised to uint8 first; fixed chunks of ``chunk`` frames (see :mod:`flowdistill.eval.fid`)."""
    from flowdistill.models.frame_features import load_frame_features

    x = frames.detach().cpu()
    if x.dim() == 5:
        x = x.flatten(0, 1)
    net = _frame_net(weights, load_frame_features)
    out = []
    for i in range(0, x.shape[0], chunk):
        q = to_uint8(x[i : i + chunk]).to(torch.float32) / 127.5 - 1.0
        out.append(net.features(q)[0])
    return torch.cat(out) if out else torch.zeros(0, 64)


_NETS: dict[str | None, Any] = {}


def _frame_net(weights: str | None, loader: Any) -> Any:
    """The frame feature net for ``weights`` (loaded once per process)."""
    if weights not in _NETS:
        _NETS[weights] = loader(weights)
    return _NETS[weights]


def fid_kid(f1: Tensor, f2: Tensor, seed: int = 0, kid_subsets: int = 100) -> tuple[float, float]:
    """``(FID, KID)`` between two feature sets with torch-fidelity's functions (KID subset = min n)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric

    fid = fid_statistics_to_metric(
        fid_features_to_statistics(f1.double()), fid_features_to_statistics(f2.double()), False
    )[KEY_METRIC_FID]
    kid = kid_features_to_metric(
        f1,
        f2,
        kid_subsets=kid_subsets,
        kid_subset_size=min(1000, f1.shape[0], f2.shape[0]),
        verbose=False,
        rng_seed=seed,
    )[KEY_METRIC_KID_MEAN]
    return float(fid), float(kid)


def _flat(x: Tensor) -> Tensor:
    """Clips ``[n, F, C, H, W]`` → frames ``[n·F, C, H, W]`` (frames pass through)."""
    return x.flatten(0, 1) if x.dim() == 5 else x


def frame_fid(
    frames: Tensor,
    reference_frames: Tensor,
    *,
    n: int = 1000,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    weights: str | None = None,
) -> dict[str, float]:
    """Frame FID/KID of ``frames`` against ``reference_frames`` and the real-vs-real floor at ``n``.

    Per seed: ``n`` generated frames, ``n`` reference frames ``A`` and ``n`` other reference frames
    ``B`` (all without replacement); metric = (gen, A), floor = (B, A). When the reference is clips
    ``[m, F, C, H, W]``, ``A`` and ``B`` come from two disjoint random halves of the clips: frames of
    one clip are correlated, and a floor between frames of the same clips would be too low. ``n`` is
    lowered to what both sets allow (``min(n, generated frames, frames per reference half)``; the
    result's ``n_frames`` says which). Means and standard deviations over the seeds.
    """
    gen = _flat(frames)
    clips = reference_frames if reference_frames.dim() == 5 else reference_frames.unsqueeze(1)
    m, per = clips.shape[0], clips.shape[1]
    n = min(int(n), gen.shape[0], (m // 2) * per)  # all three sets keep one size (reported as n_frames)
    if n < 10:
        raise ValueError(
            f"frame_fid needs >= 10 generated frames and >= 10 reference frames in each half of the "
            f"reference clips, got {gen.shape[0]} and {(m // 2) * per}"
        )
    fg = frame_features(gen, weights)
    fr = frame_features(_flat(clips), weights).view(m, per, -1)
    rows = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        ig = torch.randperm(fg.shape[0], generator=g)[:n]
        pc = torch.randperm(m, generator=g)
        pool_a, pool_b = fr[pc[: m // 2]].flatten(0, 1), fr[pc[m // 2 :]].flatten(0, 1)
        a = pool_a[torch.randperm(pool_a.shape[0], generator=g)[:n]]
        b = pool_b[torch.randperm(pool_b.shape[0], generator=g)[:n]]
        rows.append(fid_kid(fg[ig], a, int(s)) + fid_kid(b, a, int(s)))
    t = torch.tensor(rows, dtype=torch.float64)
    mean, std = t.mean(0), (t.std(0) if t.shape[0] > 1 else torch.zeros(4, dtype=torch.float64))
    return {
        "frame_fid": float(mean[0]),
        "frame_fid_std": float(std[0]),
        "frame_kid": float(mean[1]),
        "frame_kid_std": float(std[1]),
        "frame_fid_floor": float(mean[2]),
        "frame_fid_floor_std": float(std[2]),
        "frame_kid_floor": float(mean[3]),
        "frame_kid_floor_std": float(std[3]),
        "n_frames": n,
        "seeds": len(seeds),
    }


def temporal_quality_split(
    frames: Tensor,
    ranges: Sequence[tuple[int, int]],
    *,
    reference_frames: Tensor,
    n: int | None = None,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    weights: str | None = None,
) -> dict[str, dict[str, float]]:
    """Frame FID of each frame range ``[a, b)`` of clips ``[n, F, ...]`` (e.g. ``[(0, 112), (400, 512)]``).

    Every range is scored against the same reference at the same ``n`` (default: the smallest
    range's frame count, capped by half the reference), so the rows compare; keys ``"a-b"``. For
    long streams give reference clips as long as one range (e.g. 112 frames), so the floor has the
    correlation of the generated frames (see :func:`frame_fid`).
    """
    if frames.dim() != 5:
        raise ValueError(f"temporal_quality_split needs clips [n, F, C, H, W], got {tuple(frames.shape)}")
    ref = _flat(reference_frames)
    for a, b in ranges:
        if not 0 <= a < b <= frames.shape[1]:
            raise ValueError(f"frame range ({a}, {b}) is outside the clips' {frames.shape[1]} frames")
    if n is None:
        n = min(min((b - a) * frames.shape[0] for a, b in ranges), ref.shape[0] // 2)
    return {f"{a}-{b}": frame_fid(frames[:, a:b], ref, n=n, seeds=seeds, weights=weights) for a, b in ranges}


# --------------------------------------------------------------------------- the report
def video_report(
    frames: Tensor,
    *,
    reference_frames: Tensor,
    boundaries: Tensor | Sequence[bool] | None = None,
    n_feat: int = 1000,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    max_digits: int = 2,
    digit_size: int = DEFAULT_DIGIT_SIZE,
    motion_floor: bool = True,
    weights: str | None = None,
) -> dict[str, float]:
    """Every video metric of generated clips ``[n, F, C, H, W]`` (module docstring for definitions).

    Keys: ``frame_fid`` (+ ``_std``), ``frame_fid_floor`` (+ ``_std``), ``frame_kid``,
    ``frame_kid_floor``, ``pos_error``, ``vel_jump_within``, ``vel_jump_boundary``,
    ``app_jump_within``, ``app_jump_boundary``; with ``motion_floor`` and clip-shaped
    ``reference_frames`` of the same length also the same motion metrics of the real clips
    (suffix ``_real``, same ``boundaries``), the floor the generated values compare with.
    ``n_feat`` frames per set for FID/KID. Give the reference as clips shaped like the generated
    ones and twice as many (e.g. :func:`~flowdistill.data.bouncing_digits.reference_clips`): the
    floor compares two halves of its clips, and frames of one clip are correlated, so the floor is
    only comparable when both sets have the same clip structure.
    """
    if frames.dim() != 5:
        raise ValueError(f"video_report needs clips [n, F, C, H, W], got {tuple(frames.shape)}")
    size = int(frames.shape[-1])
    out: dict[str, float] = dict(frame_fid(frames, reference_frames, n=n_feat, seeds=seeds, weights=weights))

    def motion(clips: Tensor) -> dict[str, float]:
        """Motion and appearance metrics of one set of clips."""
        pos = detect_positions(clips, max_digits)
        res = motion_metrics(pos, size=size, boundaries=boundaries, digit_size=digit_size)
        res.update(appearance_jumps(clips, pos, boundaries=boundaries, digit_size=digit_size))
        return res

    out.update(motion(frames))
    if motion_floor and reference_frames.dim() == 5 and reference_frames.shape[1] == frames.shape[1]:
        out.update({f"{k}_real": v for k, v in motion(reference_frames[: frames.shape[0]]).items()})
    return out


__all__ = [
    "DETECTOR_TRACK_RMS_BOUND",
    "appearance_jumps",
    "count_digits",
    "detect_positions",
    "detector_error",
    "fid_kid",
    "frame_features",
    "frame_fid",
    "motion_metrics",
    "temporal_quality_split",
    "video_report",
]
