"""NFE sweeps for image runs: FID/KID/precision/recall per NFE against real images, with the floor.

Protocol (DESIGN.md §7): every comparison uses equal-size sets and states ``n``; the floor is the
same metric between ``n`` real training images and the same reference. For digits the reference
is the held-out test split (360 images), so ``n = 360`` and the floor is FID(train subset, test) —
the "train vs test" FID that the digits teacher target is stated against.

Labels (``labels=``): ``None`` samples with the null label, as the unconditional protocol above
(the digits teacher's Heun-64 FID 0.785). ``"balanced"`` is the standard class-conditional
protocol: sample ``i`` gets class ``i mod num_classes`` (so every class appears ``⌊n/C⌋`` or
``⌈n/C⌉`` times), and FID/KID are taken against the same reference — all real images, whatever
their class; an explicit list gives each sample its label. The floor is unchanged (real images
against the reference), so it bounds both protocols.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from flowdistill.eval.sweep import write_table

IMAGE_COLUMNS = ["model", "solver", "nfe", "fid", "fid_floor", "kid_mean", "kid_floor", "precision", "recall",
                 "n"]
#: the label protocols :func:`class_labels` names
LABEL_MODES = ("balanced",)
Labels = str | Sequence[int] | torch.Tensor | None


def class_labels(labels: Labels, n: int, num_classes: int) -> torch.Tensor | None:
    """The ``[n]`` class labels a sweep samples with (module docstring): ``None`` → ``None`` (the
    null label); ``"balanced"`` → ``i mod num_classes``; a list or tensor → those ``n`` labels,
    each in ``[0, num_classes)``. Bad input is a one-line :class:`~flowdistill.errors.ConfigError`."""
    from flowdistill.errors import ConfigError

    if labels is None:
        return None
    if isinstance(labels, str):
        if labels not in LABEL_MODES:
            raise ConfigError(f"labels must be one of {', '.join(LABEL_MODES)}, a list of class ids or "
                              f"none, got {labels!r}")
        if num_classes < 1:
            raise ConfigError("labels='balanced' needs a class-conditional model (num_classes >= 1), got "
                              f"num_classes={num_classes}")
        return torch.arange(n) % num_classes
    out = torch.as_tensor(list(labels) if not isinstance(labels, torch.Tensor) else labels).long().reshape(-1)
    if out.shape[0] != n:
        raise ConfigError(f"labels: {out.shape[0]} labels given for n={n} samples")
    if num_classes < 1 or (out.numel() and not (0 <= int(out.min()) and int(out.max()) < num_classes)):
        raise ConfigError(f"labels must be class ids in [0, num_classes={num_classes}), got "
                          f"{sorted(set(out.tolist()))[:10]}")
    return out


def reference_images(run, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(reference images, real images for the floor, reference name) for a run's dataset.

    Read through the dataset registry from the run's own data spec (the dataset a run trained on
    must be registered, e.g. through ``--plugin``); at most ``n`` images per set.
    """
    from flowdistill.data.registry import reference_images as dataset_reference

    ref = dataset_reference(run.cfg.data, n)
    return ref.reference, ref.floor, ref.name


def image_sweep(samplers: dict[str, Any], nfes: dict[str, list[int]], reference: torch.Tensor,
                floor_real: torch.Tensor, seed: int = 0, feature_extractor: str = "digits",
                cache_dir: Path | None = None, reference_name: str | None = None, solver: str = "",
                labels: Labels = None, num_classes: int = 0, decode: Any = None,
                **fid_kw) -> tuple[list[dict[str, Any]], dict[str, dict[int, torch.Tensor]]]:
    """FID etc. of each ``sampler(n, nfe, seed)`` at each NFE; ``n = len(reference)``.

    ``floor_real`` needs at least ``n`` images (the first ``n`` are used); ``solver`` only labels
    the rows. ``labels`` (:func:`class_labels`, with ``num_classes``): ``None`` calls
    ``sampler(n, nfe, seed)`` (null label); otherwise ``sampler(n, nfe, seed, cond=labels)``, the
    same labels for every sampler and NFE; the reference and the floor are the same either way.
    ``decode`` maps samples to images first (a latent run's tokenizer decoder, :func:`sample_decoder`).
    """
    from flowdistill.eval.fid import compute_fid

    n = reference.shape[0]
    cond = class_labels(labels, n, num_classes)
    if floor_real.shape[0] < n:
        raise ValueError(f"the floor needs {n} real images (the reference size), got {floor_real.shape[0]}")
    kw = {"feature_extractor": feature_extractor, "cache_dir": cache_dir, "reference_name": reference_name,
          "seed": seed, **fid_kw}
    floor = compute_fid(floor_real[:n], reference, **kw)
    rows, samples = [], {}
    for name, sampler in samplers.items():
        samples[name] = {}
        for nfe in nfes[name]:
            x = sampler(n, nfe, seed) if cond is None else sampler(n, nfe, seed, cond=cond)
            x = (decode(x) if decode is not None else x).clamp(-1, 1)
            samples[name][nfe] = x
            m = compute_fid(x, reference, **kw)
            rows.append({"model": name, "solver": solver or "default", "nfe": nfe,
                         "fid": m["fid"], "fid_floor": floor["fid"],
                         "kid_mean": m["kid_mean"], "kid_floor": floor["kid_mean"],
                         "precision": m["precision"], "recall": m["recall"], "n": n})
    return rows, samples


def _check_budgets(solver: str | None, nfes: list[int]) -> None:
    """Fail before any sampling if an explicit fixed-step ``solver`` cannot spend an NFE exactly."""
    from flowdistill.core.solvers import steps_for_nfe
    from flowdistill.errors import ConfigError

    if not solver or solver == "dopri5":
        return
    for nfe in nfes:
        try:
            steps_for_nfe(solver, nfe)
        except ValueError as e:
            raise ConfigError(f"--nfe {nfe} with solver {solver!r}: {e}") from None


def evaluate_image_run(run, nfes: list[int], n: int, out_dir: Path, seed: int = 1234,
                       solver: str | None = None, cache_dir: Path | None = None, labels: Labels = None,
                       **fid_kw: Any) -> str:
    """Sweep a :class:`~flowdistill.api.LoadedRun` on images; writes tables, a plot and grids.

    ``n = min(n, len(reference))`` samples are compared with the first ``n`` reference images, and
    the floor uses ``n`` real training images (for digits the full protocol is n = 360). Files are
    ``sweep[_SOLVER].md/json``, ``fid_vs_nfe[_SOLVER].png`` and ``grid[_SOLVER]_nfeK.png``, so
    sweeps with different ``solver`` values can share ``out_dir``. Reference features are cached in
    ``cache_dir`` (default ``RUN_DIR/fid_cache``); ``fid_kw`` go to :func:`~flowdistill.eval.fid.compute_fid`
    (e.g. ``inception_weights``). ``labels``: ``None`` (null label), ``"balanced"`` or a list of
    ``n`` class ids (:func:`class_labels`, with the run's ``num_classes``).
    """
    from flowdistill.eval.plots import image_grid, metric_vs_nfe

    _check_budgets(solver, nfes)
    from flowdistill.data.registry import reference_images as dataset_reference

    real = dataset_reference(run.cfg.data, int(n))
    reference, floor_real, ref_name, extractor = real.reference, real.floor, real.name, real.feature_extractor
    n = reference.shape[0]
    label = run.cfg.distiller.name
    tag = f"_{solver}" if solver else ""
    rows, samples = image_sweep({label: lambda k, nfe, s, cond=None: run.sample(k, nfe, seed=s, solver=solver,
                                                                                cond=cond)},
                                {label: nfes}, reference, floor_real, seed=seed,
                                feature_extractor=extractor,
                                cache_dir=cache_dir if cache_dir is not None else run.run_dir / "fid_cache",
                                reference_name=f"{ref_name}-n{n}",
                                solver=solver or getattr(run.cfg.distiller, "sample_solver", ""),
                                labels=labels, num_classes=run.num_classes,
                                decode=sample_decoder(run.cfg.data), **fid_kw)
    md = write_table(rows, IMAGE_COLUMNS, out_dir, stem=f"sweep{tag}")
    for nfe, x in samples[label].items():
        image_grid(x[:64], out_dir / f"grid{tag}_nfe{nfe}.png")
    metric_vs_nfe({label: {r["nfe"]: r["fid"] for r in rows}}, out_dir / f"fid_vs_nfe{tag}.png",
                  ylabel=f"FID ({extractor} features, n={rows[0]['n']})", floor=rows[0]["fid_floor"])
    return md


def sample_decoder(data: Any):
    """``latents -> images`` for a run on ``data`` whose samples are not images (``data.name:
    tokenizer_latents``: the tokenizer's decoder, :mod:`flowdistill.models.latent_codec`); ``None``
    otherwise."""
    from flowdistill.data.registry import decoding_for
    from flowdistill.models.latent_codec import decoder_for

    return decoder_for(decoding_for(data))
