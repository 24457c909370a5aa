"""The dataset registry: a config's ``data.name`` → the batch source a run trains on.

Each dataset registers a factory ``(spec, split) -> source`` under a name; ``spec`` is the run's
:class:`~flowdistill.config.DataSpec` (``name``, ``conditional``, ``image_size``, ``root``) and the
source is an :class:`~flowdistill.data.sources.IndexedSource` (map-style, read lazily where the
data are large) or a :class:`~flowdistill.data.sources.SamplerSource` (an exact sampler). Training
(:func:`build_dataset`), shapes (:func:`sample_shape_of`) and evaluation
(:func:`reference_images`, :func:`dataset_entry`) all go through this one table, so ``eval`` on a
run reads the run's own data spec the way ``train`` did, and a name nobody registered is an
:class:`~flowdistill.core.registry.UnknownNameError` listing what is.

Built in: the toy 2-D targets (every name of :data:`flowdistill.data.toy2d.TOY_DATASETS` when this
module is imported; ``kind="toy"``), ``digits`` (1 797 8×8 images in memory, 10 classes) and
``image_folder`` (``data.root``: files listed at construction, each decoded only when a batch
needs it). A dataset of your own::

    from flowdistill.data.registry import register_dataset

    @register_dataset("my_set", sample_shape=lambda spec: (3, spec.image_size, spec.image_size))
    def my_set(spec, split):
        return MyIndexedSource(spec.root, spec.image_size, split=split)

and ``flowdistill train --plugin my_module data.name=my_set ...`` (the module only has to be
imported before the config is used).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flowdistill.core.registry import Registry, UnknownNameError
from flowdistill.data.sources import IndexedSource, SamplerSource, TensorSource
from flowdistill.errors import ConfigError

#: ``(spec, split) -> source``.
DatasetFactory = Callable[[Any, str], Any]
KINDS = ("toy", "image", "video")  # video: clips [F, C, H, W] (bouncing_digits, video_folder)


@dataclass(frozen=True)
class DatasetEntry:
    """A registered dataset: its factory and what evaluation and model building need to know.

    ``kind`` selects the evaluation: ``"toy"`` (an exact sampler; distances to fresh target
    samples, the factory returns a :class:`SamplerSource`) or ``"image"`` (FID/KID against real
    images with ``feature_extractor``). ``sample_shape(spec)`` gives one sample's shape without
    building the source (``None``: build it and read ``source.sample_shape``). ``reference(spec,
    n)`` gives the eval's real images (``None``: :func:`default_reference`).

    A dataset in a learned latent space (``tokenizer_latents``) sets ``pixel_spec(spec)`` (the data spec of
    the images it encodes: the reference and the feature extractor are that dataset's) and
    ``decoding(spec)`` (what turns samples into those images, :func:`decoding_for`).
    """

    name: str
    factory: DatasetFactory
    kind: str = "image"
    sample_shape: Callable[[Any], tuple[int, ...]] | None = None
    reference: Callable[[Any, int | None], ReferenceImages] | None = None
    feature_extractor: str = "inception"
    pixel_spec: Callable[[Any], Any] | None = None
    decoding: Callable[[Any], Any] | None = None


@dataclass
class ReferenceImages:
    """Real images for an image eval: the ``reference`` set, ``floor`` (as many independent real
    images, for the real-vs-real floor), a cache ``name`` and the ``feature_extractor`` to use."""

    reference: Tensor
    floor: Tensor
    name: str
    feature_extractor: str


DATASETS = Registry("dataset")


def register_dataset(name: str, *, kind: str = "image",
                     sample_shape: Callable[[Any], tuple[int, ...]] | None = None,
                     reference: Callable[[Any, int | None], ReferenceImages] | None = None,
                     feature_extractor: str = "inception", pixel_spec: Callable[[Any], Any] | None = None,
                     decoding: Callable[[Any], Any] | None = None,
                     ) -> Callable[[DatasetFactory], DatasetFactory]:
    """Decorator: register a factory ``(spec, split) -> source`` as dataset ``name``.

    See :class:`DatasetEntry` for the keyword arguments; the factory is returned unchanged.
    """
    if kind not in KINDS:
        raise ValueError(f"dataset kind must be one of {KINDS}, got {kind!r}")

    def deco(factory: DatasetFactory) -> DatasetFactory:
        DATASETS.register(name)(DatasetEntry(name, factory, kind, sample_shape, reference, feature_extractor,
                                             pixel_spec, decoding))
        return factory

    return deco


def dataset_entry(name: str) -> DatasetEntry:
    """The entry registered as ``name``; an UnknownNameError listing the registered names otherwise."""
    try:
        return DATASETS.get(name)
    except UnknownNameError as e:
        raise UnknownNameError(f"{e} (a dataset of your own: register it with "
                               f"flowdistill.data.registry.register_dataset in a module you pass as "
                               f"--plugin MODULE)") from None


def dataset_names() -> list[str]:
    """Sorted names of the registered datasets."""
    return DATASETS.names()


def build_dataset(spec: Any, split: str = "train") -> Any:
    """The source (IndexedSource or SamplerSource) of ``split`` of the dataset ``spec.name`` names."""
    return dataset_entry(spec.name).factory(spec, split)


def sample_shape_of(spec: Any) -> tuple[int, ...]:
    """Shape of one sample of ``spec``'s dataset (built-ins answer without reading any data)."""
    entry = dataset_entry(spec.name)
    if entry.sample_shape is not None:
        return tuple(int(s) for s in entry.sample_shape(spec))
    return tuple(build_dataset(spec, "train").sample_shape)


def _take(source: Any, n: int, seed: int) -> Tensor:
    """The first ``n`` images of an indexed source, or ``n`` seeded draws from a sampler source."""
    if isinstance(source, IndexedSource):
        return source.get_many(torch.arange(n))["x"]
    return source.local_batch(torch.Generator().manual_seed(seed), 0, 1, n)["x"]


def default_reference(entry: DatasetEntry, spec: Any, n: int | None) -> ReferenceImages:
    """The held-out ``"test"`` split as reference and a seeded random subset of ``"train"`` as floor.

    An indexed test split gives its first ``n`` images (all when ``n`` is None); the floor is
    ``train[randperm(len(train), seed 0)[:n]]``. A sampler source draws ``n`` (required) with
    seeds 0 (reference) and 1 (floor).
    """
    test, train = entry.factory(spec, "test"), entry.factory(spec, "train")
    if isinstance(test, IndexedSource):
        n = len(test) if n is None else min(int(n), len(test))
        ref = _take(test, n, 0)
    elif n is None:
        raise ValueError(f"dataset {entry.name!r} is a sampler: reference_images needs n")
    else:
        ref = _take(test, int(n), 0)
    if isinstance(train, IndexedSource):
        if len(train) < n:
            raise ValueError(f"dataset {entry.name!r}: the floor needs {n} train images, has {len(train)}")
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n]
        floor = train.get_many(perm)["x"]
    else:
        floor = _take(train, n, 1)
    return ReferenceImages(ref, floor, f"{entry.name}-test-{spec.image_size}", entry.feature_extractor)


def reference_images(spec: Any, n: int | None = None) -> ReferenceImages:
    """Real images an image eval of ``spec``'s dataset compares with (at most ``n`` per set)."""
    entry = dataset_entry(spec.name)
    if entry.kind != "image":
        raise ConfigError(f"dataset {spec.name!r} is a {entry.kind} dataset: it has no reference images")
    if entry.pixel_spec is not None:  # a latent dataset: the images it encodes
        return reference_images(entry.pixel_spec(spec), n)
    if entry.reference is not None:
        return entry.reference(spec, n)
    return default_reference(entry, spec, n)


def feature_extractor_of(spec: Any) -> str:
    """The feature network an image eval of ``spec``'s dataset uses (a latent dataset: its images')."""
    entry = dataset_entry(spec.name)
    if entry.pixel_spec is not None:
        return feature_extractor_of(entry.pixel_spec(spec))
    return entry.feature_extractor


def decoding_for(spec: Any) -> Any | None:
    """How samples of ``spec``'s dataset become images before an image eval: ``None`` for pixel
    datasets; for a latent dataset its :class:`~flowdistill.data.latent_cache.LatentDecoding` (the
    tokenizer directory and the factors to undo; the eval layer loads and runs the decoder)."""
    entry = dataset_entry(spec.name)
    return entry.decoding(spec) if entry.decoding is not None else None


# -- the lazy image folder -------------------------------------------------------------------------
class ImageFolderSource(IndexedSource):
    """Images under ``root`` (see :mod:`flowdistill.data.images`), decoded only when asked for.

    Construction lists the files (no image is opened); ``__getitem__`` decodes one file, so memory
    holds a batch, never the folder. Items are ``{"x": [channels, size, size] in [-1, 1]}`` plus
    ``"cond"`` (the class-folder index) when ``conditional``, which needs the ``root/<class>/``
    layout.
    """

    def __init__(self, root: str | os.PathLike, size: int, channels: int = 3, conditional: bool = False):
        from flowdistill.data.images import ImageFolderDataset

        self.folder = ImageFolderDataset(root, size, channels)
        self.sample_shape = (channels, size, size)
        self.conditional = bool(conditional)
        if self.conditional and not self.folder.classes:
            raise ConfigError(f"data.conditional=true needs class folders (root/<class>/<image>), but "
                              f"{str(root)!r} holds its images directly")
        self.num_classes = len(self.folder.classes) if self.conditional else 0

    def __len__(self) -> int:
        """Number of image files."""
        return len(self.folder)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        """Decode image ``i``."""
        x, y = self.folder[i]
        return {"x": x, "cond": y} if self.conditional else {"x": x}


# -- built-in datasets -----------------------------------------------------------------------------
def _register_toys() -> None:
    """Every toy target registered in ``TOY_DATASETS`` becomes a dataset of kind ``"toy"``."""
    from flowdistill.data.toy2d import TOY_DATASETS, get_toy

    for toy in TOY_DATASETS.names():
        def factory(spec: Any, split: str, _toy: str = toy) -> SamplerSource:
            return SamplerSource(get_toy(_toy), conditional=spec.conditional)

        dim = int(getattr(TOY_DATASETS.get(toy), "dim", 2))
        register_dataset(toy, kind="toy", sample_shape=lambda spec, _d=dim: (_d,))(factory)


_register_toys()


@register_dataset("digits", sample_shape=lambda spec: (1, spec.image_size, spec.image_size),
                  feature_extractor="digits")
def _digits(spec: Any, split: str) -> TensorSource:
    """scikit-learn's digits at ``spec.image_size`` (in memory; 10 classes; splits train/test/all)."""
    from flowdistill.data.digits import NUM_CLASSES, digits_tensors

    x, y = digits_tensors(split, spec.image_size)
    return TensorSource(x, y, conditional=spec.conditional, num_classes=NUM_CLASSES)


def _folder_root(spec: Any) -> Path:
    """``spec.root``; a ConfigError when it is empty (never the current directory by default)."""
    if not str(spec.root or "").strip():
        raise ConfigError("data.name=image_folder needs data.root=DIR (the folder of images)")
    return Path(spec.root)


def _folder_reference(spec: Any, n: int | None) -> ReferenceImages:
    """First half of the folder as reference, second half as floor (at most ``n`` each)."""
    src = ImageFolderSource(_folder_root(spec), spec.image_size)
    half = len(src) // 2
    n = half if n is None else min(int(n), half)
    if n < 1:
        raise ValueError(f"image folder {spec.root!r} needs at least 2 images for a reference and a floor")
    ref = src.get_many(torch.arange(n))["x"]
    floor = src.get_many(torch.arange(half, half + n))["x"]
    return ReferenceImages(ref, floor, f"folder-{Path(spec.root).name}-{spec.image_size}", "inception")


@register_dataset("image_folder", sample_shape=lambda spec: (3, spec.image_size, spec.image_size),
                  reference=_folder_reference)
def _image_folder(spec: Any, split: str) -> ImageFolderSource:
    """RGB images under ``spec.root`` at ``spec.image_size`` (lazy; one folder, so ``split`` is ignored)."""
    return ImageFolderSource(_folder_root(spec), spec.image_size, 3, conditional=spec.conditional)


def _latent_cache(spec: Any) -> Any:
    from flowdistill.data.latent_cache import open_cache

    return open_cache(spec.root)


def _latent_pixel_spec(spec: Any) -> Any:
    """The data spec of the images a latent cache encodes (from its manifest)."""
    return _latent_cache(spec).source_spec


def _latent_decoding(spec: Any) -> Any:
    from flowdistill.data.latent_cache import decoding_of

    return decoding_of(spec)


@register_dataset("tokenizer_latents", sample_shape=lambda spec: _latent_cache(spec).latent_shape,
                  pixel_spec=_latent_pixel_spec, decoding=_latent_decoding)
def _latents(spec: Any, split: str) -> Any:
    """Tokenizer latents cached at ``spec.root`` (:mod:`flowdistill.data.latent_cache`; one cache, so
    ``split`` is ignored; conditional when ``spec.conditional`` and labels are stored)."""
    from flowdistill.data.latent_cache import LatentSource

    return LatentSource(_latent_cache(spec), conditional=spec.conditional)


# the video datasets register themselves (kind="video"; their modules import this one's decorator)
from flowdistill.data import bouncing_digits as _bouncing_digits_module  # noqa: E402,F401
from flowdistill.data import video_folder as _video_folder_module  # noqa: E402,F401

__all__ = ["DATASETS", "DatasetEntry", "ImageFolderSource", "ReferenceImages", "build_dataset",
           "dataset_entry", "dataset_names", "decoding_for", "default_reference", "feature_extractor_of",
           "reference_images", "register_dataset", "sample_shape_of"]
