"""Metrics of generated bouncing-digit video: frame quality, motion, seams at chunk boundaries.

All inputs are clips ``[n, F, C, H, W]`` in [-1, 1] (C = 1, or 3 averaged to gray). Definitions
(``docs/video_problem.md`` has the derivations and the measured floors):

- **Tracks**: digit positions ``[n, F, D, 2]`` from
  :func:`~flowdistill.eval.video_tracking.detect_positions` (the detector and tracker and their
  accuracy live in :mod:`flowdistill.eval.video_tracking`; its public names are re-exported here).
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
- **Velocity deviation** of transition ``f → f+1``, per track and coordinate:
  ``|v_f − b_f|`` (px/frame), with ``b_f`` the least-squares slope of the positions on the 6 frames
  ``f − 2 … f + 3`` (three transitions on each side of the transition's midpoint, symmetric around
  it), where all 6 positions are valid. ``vel_dev_boundary`` averages it over transitions with
  ``boundaries[f]``, ``vel_dev_within`` over the others (``n_vel_dev_samples`` counts both). It
  exists because with chunks of 2 frames every transition touches a seam, so ``vel_jump_within``
  has no sample (NaN); no neighbour is excluded here: the window is symmetric, so both kinds see the
  same mix of transitions in their windows. 0 on exact constant velocity. A position offset ``δ``
  of one chunk against its neighbours changes ``v_f`` by ``±δ`` at its two seams, while on a
  transition inside a chunk ``v_f`` is unchanged and only ``b_f`` moves, by at most ``4|δ|/17.5``
  (``Σ t² = 17.5`` for ``t = −2.5 … 2.5``), so seams raise ``vel_dev_boundary`` above
  ``vel_dev_within``; noise i.i.d. per frame raises both alike (ratio ≈ 1).
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

import torch
import torch.nn.functional as F
from torch import Tensor

from flowdistill.eval.image_io import to_uint8
from flowdistill.eval.video_tracking import (
    DEFAULT_DIGIT_SIZE,
    DETECTOR_TRACK_RMS_BOUND,
    _gray,
    count_digits,
    detect_positions,
    detector_error,
)

MAX_SPEED = 2.5
MAX_INK_OFFSET = 2.5


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
    """``pos_error``, ``vel_jump_within`` / ``vel_jump_boundary`` (+ ``n_vel_samples``) and
    ``vel_dev_within`` / ``vel_dev_boundary`` (+ ``n_vel_dev_samples``) of tracks ``[n, F, D, 2]``
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
    # velocity deviation |v_f - b_f|, b_f = LS slope on frames f-2..f+3, f = 2..F-4
    span = 6
    if nf >= span:
        win = pos.unfold(1, span, 1)  # [n, F-5, D, 2, 6]; window w holds frames w..w+5, transition w+2
        okw = ok.unfold(1, span, 1).all(-1)
        tc = torch.arange(span, dtype=torch.float64) - (span - 1) / 2.0
        slope = ((win - win.mean(-1, keepdim=True)) * tc).sum(-1) / tc.pow(2).sum()
        dev = (win[..., 3] - win[..., 2] - slope).abs()
        tw = within[2 : nf - 3].view(1, -1, 1, 1)
        out["vel_dev_within"] = _mean(dev, okw & tw)
        out["vel_dev_boundary"] = (
            _mean(dev, okw & bound[2 : nf - 3].view(1, -1, 1, 1)) if bound is not None else float("nan")
        )
        out["n_vel_dev_samples"] = float(okw.sum())
    else:
        out["vel_dev_within"] = out["vel_dev_boundary"] = float("nan")
        out["n_vel_dev_samples"] = 0.0
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
    ``vel_dev_within``, ``vel_dev_boundary``, ``app_jump_within``, ``app_jump_boundary``; with
    ``motion_floor`` and clip-shaped ``reference_frames`` of the same length also the same motion
    metrics of the real clips (suffix ``_real``, same ``boundaries``), the floor the generated
    values compare with.
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
    "DEFAULT_DIGIT_SIZE",
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
