"""FID, KID and precision/recall of generated images against a reference set, on torch-fidelity.

``compute_fid(samples, reference, ...)`` takes the samples as a sampler callable
``sampler(n, generator) -> [n, C, H, W]`` in [-1, 1], a tensor of images, or a folder of image files,
and the reference as a tensor, a dataset of real images or a folder. It returns
``{"fid", "kid_mean", "kid_std", "precision", "recall", "n", "n_ref"}``.

How the pieces fit:

- Every input becomes uint8 ``[N, 3, H, W]`` images in 0..255 before the feature network, exactly
  once (:mod:`flowdistill.eval.image_io`: float [-1, 1] → ``round((x + 1) · 127.5)``, uint8 as is,
  grayscale replicated; folders read the way torch-fidelity reads them, so a folder of PNGs written
  by ``save_png_folder`` gives the same numbers as the tensor it came from).
- Features come from torch-fidelity's registered extractors: ``"digits"`` is the bundled digits
  classifier (network in ``flowdistill.models.digits_classifier``, registered with torch-fidelity by
  ``flowdistill.eval.digits_features``; 64-d penultimate layer), ``"inception"`` is
  torch-fidelity's ``inception-v3-compat`` (2048-d pool features) with its weights read from a
  local file (``inception_weights``; :mod:`flowdistill.eval.inception`) — nothing is downloaded.
- The metrics are torch-fidelity's own FID / KID / PRC functions applied to those features (the
  same functions ``torch_fidelity.calculate_metrics`` uses; a test checks agreement with it).
  We call them directly, rather than ``calculate_metrics``, so that each input passes through the
  network once and so that the reference cache is a safetensors file: torch-fidelity's own cache
  is unpickled with ``weights_only=False``, which this project never does.
- Feature chunks: the feature network always runs on chunks of ``feature_batch_size`` images
  (default 256), whatever ``batch_size`` the sampler is drawn with. The CPU kernels behind its
  convolutions (oneDNN) and linear layers (MKL sgemm) choose their algorithm and blocking from the
  chunk's shape, so the same image in a chunk of 7 and in a chunk of 200 gets features that differ
  by a few float32 ulps (the same dot products summed in another order). With fixed chunks the
  features, and so every metric, are a function of the images alone (for a given machine and
  thread count): a sampler drawn in batches of 64 and the tensor of the same draws score the same.
- KID: ``kid_subset_size`` defaults to ``min(1000, n, n_ref)``; an explicit value larger than
  either set is a one-line ValueError. When the subset size equals the smaller set, every subset of
  that set is the whole set, so ``kid_std`` mostly reflects the other set (≈ 0 at equal ``n``);
  pass a smaller ``kid_subset_size`` for a spread. Both sets need more than ``prc_neighborhood``
  (default 3) images.
- Reference caching: with ``cache_dir`` set, the reference features are stored in
  ``cache_dir/<key>-<extractor>-<layer>-<weights hash>.safetensors`` and reused. ``<key>`` is
  ``reference_name`` if given (it must then identify the reference data), else a fingerprint of the
  reference (a hash of the uint8 pixels, or of the folder's file names, sizes and mtimes).

Metric protocol (DESIGN §7): FID is biased by set size, so compare at equal ``n`` and report KID
beside it; ``digits_fid_floor`` gives the real-vs-real floor at a given ``n``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import Dataset
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from flowdistill.atomic import atomic_file
from flowdistill.eval import digits_features
from flowdistill.eval.image_io import ImageInput, ImageSource, resolve_input, save_png_folder, to_uint8
from flowdistill.eval.inception import INCEPTION_EXTRACTOR_NAME, inception_weights_path

# --------------------------------------------------------------------------- features and cache


@functools.lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """Short sha256 of a file (memoised on path, size and mtime)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def _digest(path: Path) -> str:
    """Short content hash of a weights file."""
    st = path.stat()
    return _file_digest(str(path.resolve()), st.st_size, st.st_mtime_ns)


def _extract(
    extractor: torch.nn.Module, inp: ImageInput, layer: str, batch_size: int, cuda: bool, verbose: bool
) -> Tensor:
    """Features ``[N, D]`` of one input through a torch-fidelity extractor."""
    feats = get_featuresdict_from_dataset(inp.dataset, extractor, batch_size, cuda, True, verbose)
    return feats[layer].to(torch.float32)


def _cached_reference_features(path: Path, compute: Callable[[], Tensor], n: int) -> Tensor:
    """Load reference features from a safetensors cache file, or compute and store them atomically."""
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("n") == str(n):
            return load_file(str(path))["features"]
    feats = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        save_file({"features": feats.contiguous()}, str(tmp), metadata={"n": str(n)})
    return feats


# --------------------------------------------------------------------------- public API


def compute_fid(
    samples: ImageSource,
    reference: ImageSource,
    *,
    n: int | None = None,
    n_ref: int | None = None,
    feature_extractor: str = "digits",
    digits_weights: str | os.PathLike | None = None,
    inception_weights: str | os.PathLike | None = None,
    cuda: bool = False,
    batch_size: int = 256,
    feature_batch_size: int = 256,
    seed: int = 0,
    kid_subset_size: int | None = None,
    kid_subsets: int = 100,
    prc_neighborhood: int = 3,
    cache_dir: str | os.PathLike | None = None,
    reference_name: str | None = None,
    verbose: bool = False,
) -> dict[str, float | int]:
    """FID, KID (mean, std) and precision/recall of ``samples`` against ``reference``.

    Args:
        samples: ``sampler(n, generator) -> [n, C, H, W]`` in [-1, 1] (needs ``n``), an image tensor
            (float [-1, 1] or uint8), a Dataset of images / (image, label) pairs, or a folder of images.
        reference: the real images, in any of the non-sampler forms.
        n, n_ref: how many samples to draw (sampler) or use (the first ``n`` of a tensor / folder).
        feature_extractor: ``"digits"`` (bundled digits classifier) or ``"inception"`` (offline).
        digits_weights, inception_weights: weights files; digits defaults to the bundled asset,
            inception to torch hub's cached ``weights-inception-2015-12-05-6726825d.pth``.
        cuda: run the feature network (and sampler generator) on the GPU.
        batch_size: how many images a sampler is asked for per call (it only changes the draws).
        feature_batch_size: images per chunk through the feature network; fixed on purpose, not
            tied to ``batch_size`` (see the module docstring). Lower it only to save memory.
        seed: seeds the sampler's generator and the KID subset draws.
        kid_subset_size: defaults to ``min(1000, n, n_ref)``; larger than either set is an error.
        cache_dir, reference_name: cache the reference features (see the module docstring).

    Returns:
        ``{"fid", "kid_mean", "kid_std", "precision", "recall", "n", "n_ref"}``; precision is the
        fraction of samples inside the reference manifold, recall the converse.
    """
    if feature_extractor == "digits":
        tf_name = digits_features.EXTRACTOR_NAME
        weights = digits_features.resolve_weights_path(digits_weights)
    elif feature_extractor == "inception":
        tf_name = INCEPTION_EXTRACTOR_NAME
        weights = inception_weights_path(inception_weights)
    else:
        raise ValueError(f"feature_extractor must be 'digits' or 'inception', got {feature_extractor!r}")
    if cuda and not torch.cuda.is_available():
        raise ValueError("cuda=True but no CUDA device is available")
    if batch_size < 1 or feature_batch_size < 1:
        raise ValueError(f"batch_size and feature_batch_size must be positive, got {batch_size}, "
                         f"{feature_batch_size}")
    device = "cuda" if cuda else "cpu"

    if not isinstance(reference, (Dataset, str, os.PathLike)) and not torch.is_tensor(reference):
        raise ValueError(
            f"reference must be real images (tensor, Dataset or folder), got {type(reference).__name__}"
        )
    inp = resolve_input(samples, "samples", n, batch_size, seed, device)
    ref = resolve_input(reference, "reference", n_ref, batch_size, seed, device)
    if min(inp.n, ref.n) <= max(1, prc_neighborhood):
        raise ValueError(
            f"need more than max(1, prc_neighborhood={prc_neighborhood}) images per set, "
            f"got n={inp.n}, n_ref={ref.n}"
        )
    if kid_subset_size is None:
        kid_subset_size = min(1000, inp.n, ref.n)
    elif kid_subset_size < 2 or kid_subset_size > min(inp.n, ref.n):
        raise ValueError(
            f"kid_subset_size={kid_subset_size} must be in [2, min(n, n_ref)] = [2, {min(inp.n, ref.n)}]; "
            f"got n={inp.n} samples, n_ref={ref.n} reference images"
        )

    cls = FEATURE_EXTRACTORS_REGISTRY[tf_name]
    layer = cls.get_default_feature_layer_for_metric("fid")
    extractor = create_feature_extractor(
        tf_name,
        [layer],
        cuda=cuda,
        verbose=verbose,
        feature_extractor_weights_path=str(weights),
        feature_extractor_compile=False,
    )
    f1 = _extract(extractor, inp, layer, feature_batch_size, cuda, verbose)

    def ref_features() -> Tensor:
        """Reference features through the same extractor."""
        return _extract(extractor, ref, layer, feature_batch_size, cuda, verbose)

    if cache_dir is not None:
        key = re.sub(r"[^A-Za-z0-9._-]+", "_", reference_name) if reference_name else ref.fingerprint()
        path = Path(cache_dir) / f"{key}-{tf_name}-{layer}-{_digest(weights)}.safetensors"
        f2 = _cached_reference_features(path, ref_features, ref.n)
    else:
        f2 = ref_features()

    kw: dict[str, Any] = dict(verbose=verbose, rng_seed=seed)
    fid = fid_statistics_to_metric(fid_features_to_statistics(f1), fid_features_to_statistics(f2), verbose)
    kid = kid_features_to_metric(f1, f2, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, **kw)
    prc = prc_features_to_metric(f1, f2, prc_neighborhood=prc_neighborhood, save_cpu_ram=True, **kw)
    return {
        "fid": float(fid[KEY_METRIC_FID]),
        "kid_mean": float(kid[KEY_METRIC_KID_MEAN]),
        "kid_std": float(kid[KEY_METRIC_KID_STD]),
        "precision": float(prc[KEY_METRIC_PRECISION]),
        "recall": float(prc[KEY_METRIC_RECALL]),
        "n": int(inp.n),
        "n_ref": int(ref.n),
    }


def digits_fid_floor(n: int | None = None, size: int = 8, *, seed: int = 0, **kwargs: Any) -> dict[str, Any]:
    """The real-vs-real floor of the digits metrics at ``n`` images per set (DESIGN §7).

    ``"train_half"``: two disjoint random ``n``-subsets of the train split.
    ``"train_vs_test"``: an ``n``-subset of train against an ``n``-subset of test.
    ``n`` defaults to (and may not exceed) ``min(len(test), len(train) // 2)`` = 360.
    Extra keyword arguments go to ``compute_fid`` (its feature extractor defaults to ``"digits"``).
    """
    from flowdistill.data.digits import digits_tensors

    xtr, _ = digits_tensors("train", size)
    xte, _ = digits_tensors("test", size)
    n_max = min(xte.shape[0], xtr.shape[0] // 2)
    n = n_max if n is None else n
    if not isinstance(n, int) or not 2 <= n <= n_max:
        raise ValueError(f"digits floor n must be an int in [2, {n_max}], got {n!r}")
    g = torch.Generator().manual_seed(seed)
    ptr = torch.randperm(xtr.shape[0], generator=g)
    pte = torch.randperm(xte.shape[0], generator=g)
    a, b, t = xtr[ptr[:n]], xtr[ptr[n : 2 * n]], xte[pte[:n]]
    return {
        "n": n,
        "size": size,
        "train_half": compute_fid(a, b, seed=seed, **kwargs),
        "train_vs_test": compute_fid(a, t, seed=seed, **kwargs),
    }


__all__ = [
    "compute_fid",
    "digits_fid_floor",
    "save_png_folder",
    "to_uint8",
]
