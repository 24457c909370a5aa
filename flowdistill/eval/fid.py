"""FID, KID and precision/recall of generated images against a reference set, on torch-fidelity.

``compute_fid(samples, reference, ...)`` takes the samples as a sampler callable
``sampler(n, generator) -> [n, C, H, W]`` in [-1, 1], a tensor of images, or a folder of image files,
and the reference as a tensor, a dataset of real images or a folder. It returns
``{"fid", "kid_mean", "kid_std", "precision", "recall", "n", "n_ref"}``.

How the pieces fit:

- Every input becomes uint8 ``[N, 3, H, W]`` images in 0..255 before the feature network, exactly
  once: float images in [-1, 1] map by ``round((x + 1) · 127.5)`` (values are clamped to [-1, 1]
  first; anything beyond ±2, or non-finite, is rejected as a wrong scale), uint8 tensors are taken
  as 0..255, and grayscale is replicated to 3 channels. Folders are read the way torch-fidelity
  reads them (``png,jpg,jpeg`` files directly in the folder, sorted, converted to RGB), so a folder
  of PNGs written by ``save_png_folder`` gives the same numbers as the tensor it came from.
- Features come from torch-fidelity's registered extractors: ``"digits"`` is the bundled digits
  classifier (``flowdistill.eval.digits_features``, 64-d penultimate layer), ``"inception"`` is
  torch-fidelity's ``inception-v3-compat`` (2048-d pool features) with its weights read from a
  local file (``inception_weights``; safetensors, or a torch file loaded with
  ``weights_only=True``) — nothing is downloaded.
- The metrics are torch-fidelity's own FID / KID / PRC functions applied to those features (the
  same functions ``torch_fidelity.calculate_metrics`` uses; a test checks agreement with it).
  We call them directly, rather than ``calculate_metrics``, so that each input passes through the
  network once and so that the reference cache is a safetensors file: torch-fidelity's own cache
  is unpickled with ``weights_only=False``, which this project never does.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import Dataset
from torch_fidelity import feature_extractor_inceptionv3 as _tf_inception
from torch_fidelity.datasets import ImagesPathDataset
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset, glob_samples_paths

from flowdistill.eval import digits_features

Sampler = Callable[[int, torch.Generator], Tensor]
ImageSource = Sampler | Tensor | Dataset | str | os.PathLike

FOLDER_EXTENSIONS = "png,jpg,jpeg"
RANGE_LIMIT = 2.0  # float images beyond ±RANGE_LIMIT are a wrong scale (e.g. 0..255), not overshoot
INCEPTION_EXTRACTOR_NAME = "flowdistill-inception-v3"
INCEPTION_HUB_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_HUB_FILE


# --------------------------------------------------------------------------- inception, offline


def load_weights_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` (safetensors) or a torch file (``weights_only=True``)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"weights file {str(p)!r} not found")
    if p.suffix == ".safetensors":
        return load_file(str(p), device="cpu")
    state = torch.load(str(p), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"weights file {str(p)!r} does not hold a plain state dict of tensors")
    return state


class SafeInceptionV3(_tf_inception.FeatureExtractorInceptionV3):
    """torch-fidelity's ``inception-v3-compat`` with weights from a local file, never unpickled.

    torch-fidelity itself loads a given weights path with ``torch.load(weights_only=False)`` and
    downloads when none is given; here the state dict is read safely first and handed to it.
    """

    def __init__(
        self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None, **kwargs
    ) -> None:
        """Read the weights safely, then build torch-fidelity's network around them."""
        if feature_extractor_weights_path is None:
            raise ValueError("the inception extractor needs a local weights file (weights path is None)")
        state = load_weights_file(feature_extractor_weights_path)
        with mock.patch.object(_tf_inception, "load_state_dict_from_url", lambda *a, **k: state):
            super().__init__(name, features_list, feature_extractor_weights_path=None, **kwargs)


def _register_inception() -> None:
    """Register the offline inception extractor with torch-fidelity (idempotent)."""
    if INCEPTION_EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(INCEPTION_EXTRACTOR_NAME, SafeInceptionV3)


_register_inception()


def _inception_weights_path(path: str | os.PathLike | None) -> Path:
    """The inception weights file: the given path, else torch hub's cached copy; ValueError if none."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"inception weights file {str(p)!r} not found")
        return p
    p = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_HUB_FILE
    if not p.is_file():
        raise ValueError(
            f"feature_extractor='inception' runs offline and needs inception_weights=PATH "
            f"(torch-fidelity's {INCEPTION_HUB_FILE} from {INCEPTION_URL}, or a safetensors copy)"
        )
    return p


# --------------------------------------------------------------------------- image conversion


def to_uint8(images: Tensor, what: str = "images") -> Tensor:
    """Validate ``[N, C, H, W]`` images (C = 1 or 3) and return them as uint8 0..255 on the CPU.

    Float images must be in [-1, 1] (clamped; values beyond ±2 or non-finite raise ValueError);
    uint8 images are returned unchanged.
    """
    if not torch.is_tensor(images):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[0] < 1:
        raise ValueError(f"{what} must have shape [N, 1 or 3, H, W] with N >= 1, got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.detach().cpu()
    if not images.is_floating_point():
        raise ValueError(f"{what} must be float in [-1, 1] or uint8 in 0..255, got dtype {images.dtype}")
    x = images.detach().to("cpu", torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or inf values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -RANGE_LIMIT or hi > RANGE_LIMIT:
        raise ValueError(f"{what} must be in [-1, 1], got values in [{lo:.3g}, {hi:.3g}] (wrong scale?)")
    return ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def save_png_folder(images: Tensor, folder: str | os.PathLike, prefix: str = "") -> list[Path]:
    """Write images (float [-1, 1] or uint8) as ``folder/<prefix>NNNNNN.png``; returns the paths."""
    x = to_uint8(images)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(x):
        arr = img.permute(1, 2, 0).numpy()
        pil = Image.fromarray(arr[:, :, 0]) if arr.shape[2] == 1 else Image.fromarray(arr)
        p = out / f"{prefix}{i:06d}.png"
        pil.save(p)
        paths.append(p)
    return paths


class _UInt8Images(Dataset):
    """uint8 ``[N, C, H, W]`` images served as ``[3, H, W]`` (grayscale replicated)."""

    def __init__(self, images: Tensor):
        self.images = images

    def __len__(self) -> int:
        """Number of images."""
        return self.images.shape[0]

    def __getitem__(self, i: int) -> Tensor:
        """Image ``i`` as uint8 ``[3, H, W]``."""
        x = self.images[i]
        return x.expand(3, -1, -1) if x.shape[0] == 1 else x


# --------------------------------------------------------------------------- inputs


@dataclass
class _Input:
    """A resolved input: a dataset of uint8 ``[3, H, W]`` images and how to fingerprint it."""

    dataset: Dataset
    n: int
    fingerprint: Callable[[], str]


def _tensor_input(x: Tensor) -> _Input:
    """Wrap validated uint8 images."""

    def fp() -> str:
        """Hash of the shape and uint8 pixels."""
        h = hashlib.sha256(str(tuple(x.shape)).encode())
        h.update(x.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    return _Input(_UInt8Images(x), x.shape[0], fp)


def _folder_input(path: str | os.PathLike, what: str, n: int | None) -> _Input:
    """A flat folder of png/jpg images read like torch-fidelity reads it."""
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"{what} folder {str(p)!r} does not exist or is not a directory")
    files = glob_samples_paths(str(p), False, FOLDER_EXTENSIONS, None, verbose=False)
    if not files:
        raise ValueError(f"{what} folder {str(p)!r} contains no {FOLDER_EXTENSIONS} images")
    if n is not None:
        if len(files) < n:
            raise ValueError(f"{what} folder {str(p)!r} has {len(files)} images, fewer than n={n}")
        files = files[:n]

    def fp() -> str:
        """Hash of the file names, sizes and modification times."""
        h = hashlib.sha256()
        for f in files:
            st = os.stat(f)
            h.update(f"{os.path.basename(f)}:{st.st_size}:{st.st_mtime_ns};".encode())
        return h.hexdigest()[:16]

    return _Input(ImagesPathDataset(files), len(files), fp)


def _dataset_images(ds: Dataset, what: str, n: int | None) -> Tensor:
    """Stack the images of a dataset whose items are tensors or ``(tensor, ...)`` tuples."""
    if hasattr(ds, "images") and torch.is_tensor(ds.images):
        x = ds.images
        return x if n is None else x[:n]
    count = len(ds) if n is None else min(n, len(ds))
    items = []
    for i in range(count):
        item = ds[i]
        item = item[0] if isinstance(item, (tuple, list)) else item
        if not torch.is_tensor(item):
            raise ValueError(f"{what} dataset items must be image tensors or (image, label) tuples")
        items.append(item)
    if not items:
        raise ValueError(f"{what} dataset is empty")
    return torch.stack(items)


@torch.no_grad()
def sample_images(
    sampler: Sampler, n: int, batch_size: int = 256, seed: int = 0, device: str = "cpu"
) -> Tensor:
    """Draw ``n`` images from ``sampler(b, generator)`` in batches; uint8 ``[n, C, H, W]`` on the CPU.

    One ``torch.Generator`` on ``device`` seeded with ``seed`` is passed to every call, so the
    result depends only on (sampler, n, batch_size, seed).
    """
    g = torch.Generator(device=device).manual_seed(seed)
    out: list[Tensor] = []
    done = 0
    while done < n:
        b = min(batch_size, n - done)
        x = sampler(b, g)
        if not torch.is_tensor(x) or x.dim() != 4 or x.shape[0] != b:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"sampler(n={b}, generator) must return [n, C, H, W] images, got {shape}")
        xb = to_uint8(x, "sampler outputs")
        if out and xb.shape[1:] != out[0].shape[1:]:
            before, now = tuple(out[0].shape[1:]), tuple(xb.shape[1:])
            raise ValueError(f"sampler changed image shape between calls: {before} vs {now}")
        out.append(xb)
        done += b
    return torch.cat(out)


def _resolve(
    source: ImageSource, what: str, n: int | None, batch_size: int, seed: int, device: str
) -> _Input:
    """Turn a sampler, tensor, dataset or folder into an ``_Input``."""
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(source, (str, os.PathLike)):
        return _folder_input(source, what, n)
    if torch.is_tensor(source):
        x = to_uint8(source, what)
        if n is not None:
            if x.shape[0] < n:
                raise ValueError(f"{what} has {x.shape[0]} images, fewer than n={n}")
            x = x[:n]
        return _tensor_input(x)
    if isinstance(source, Dataset):
        x = _dataset_images(source, what, n)
        if n is not None and x.shape[0] < n:
            raise ValueError(f"{what} has {x.shape[0]} images, fewer than n={n}")
        return _tensor_input(to_uint8(x, what))
    if callable(source):
        if n is None:
            raise ValueError(f"{what}: a sampler needs n, the number of images to draw")
        return _tensor_input(sample_images(source, n, batch_size, seed, device))
    raise ValueError(
        f"{what} must be a sampler callable, an image tensor, a Dataset or a folder path, "
        f"got {type(source).__name__}"
    )


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


def _extract(extractor: torch.nn.Module, inp: _Input, layer: str, batch_size: int, cuda: bool, verbose: bool):
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
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({"features": feats.contiguous()}, str(tmp), metadata={"n": str(n)})
    os.replace(tmp, path)
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
        weights = _inception_weights_path(inception_weights)
    else:
        raise ValueError(f"feature_extractor must be 'digits' or 'inception', got {feature_extractor!r}")
    if cuda and not torch.cuda.is_available():
        raise ValueError("cuda=True but no CUDA device is available")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = "cuda" if cuda else "cpu"

    if not isinstance(reference, (Dataset, str, os.PathLike)) and not torch.is_tensor(reference):
        raise ValueError(
            f"reference must be real images (tensor, Dataset or folder), got {type(reference).__name__}"
        )
    inp = _resolve(samples, "samples", n, batch_size, seed, device)
    ref = _resolve(reference, "reference", n_ref, batch_size, seed, device)
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
    f1 = _extract(extractor, inp, layer, batch_size, cuda, verbose)

    def ref_features() -> Tensor:
        """Reference features through the same extractor."""
        return _extract(extractor, ref, layer, batch_size, cuda, verbose)

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
    "Sampler",
    "SafeInceptionV3",
    "compute_fid",
    "digits_fid_floor",
    "load_weights_file",
    "sample_images",
    "save_png_folder",
    "to_uint8",
]
