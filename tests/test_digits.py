"""Digits dataset, image-folder dataset and the digits feature classifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from flowdistill.data.digits import DigitsDataset, digits_tensors, upscale_digits
from flowdistill.data.images import ImageFolderDataset, image_folder_tensors
from flowdistill.eval.digits_features import EXTRACTOR_NAME
from flowdistill.models.digits_classifier import (
    DEFAULT_WEIGHTS,
    FEATURE_DIM,
    classifier_accuracy,
    load_digits_classifier,
)


@pytest.mark.parametrize("size", [8, 16, 32])
def test_digits_shapes_range_and_split(size):
    """Each split has the documented size, shape, dtype and [-1, 1] range."""
    xtr, ytr = digits_tensors("train", size)
    xte, yte = digits_tensors("test", size)
    assert xtr.shape == (1437, 1, size, size) and xte.shape == (360, 1, size, size)
    assert xtr.dtype == torch.float32 and ytr.dtype == torch.long
    for x in (xtr, xte):
        assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert set(ytr.tolist()) == set(range(10)) == set(yte.tolist())


def test_digits_split_is_fixed_disjoint_and_stratified():
    """Train and test partition the 1 797 images, keep class proportions and never change."""
    xall, yall = digits_tensors("all", 8)
    xtr, ytr = digits_tensors("train", 8)
    xte, yte = digits_tensors("test", 8)
    assert xall.shape[0] == 1797 == xtr.shape[0] + xte.shape[0]
    rows = {tuple(r) for r in xall.flatten(1).tolist()}
    assert {tuple(r) for r in xtr.flatten(1).tolist()} | {tuple(r) for r in xte.flatten(1).tolist()} == rows
    frac = torch.bincount(yte, minlength=10).float() / torch.bincount(yall, minlength=10).float()
    assert torch.all((frac - 0.2).abs() < 0.02)
    x2, y2 = digits_tensors("test", 8)
    assert torch.equal(x2, xte) and torch.equal(y2, yte)
    x2[0] = 5.0  # callers get copies
    assert float(digits_tensors("test", 8)[0].max()) == 1.0


def test_digits_upscaling_modes_and_dataset():
    """Nearest upscaling copies pixels; bilinear stays in range; the Dataset serves (x, y) pairs."""
    x8, _ = digits_tensors("train", 8)
    near = digits_tensors("train", 16, mode="nearest")[0]
    assert torch.equal(near[..., ::2, ::2], x8) and torch.equal(near[..., 1::2, 1::2], x8)
    assert torch.equal(upscale_digits(x8, 16), digits_tensors("train", 16)[0])
    ds = DigitsDataset("test", 32)
    x, y = ds[3]
    assert len(ds) == 360 and x.shape == (1, 32, 32) and y.dtype == torch.long
    for bad in [dict(split="val"), dict(size=12), dict(mode="bicubic")]:
        with pytest.raises(ValueError):
            DigitsDataset(**bad)


def _write(path, arr):
    """Save a uint8 array as an image file, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_image_folder_plain_and_class_layouts(tmp_path):
    """A plain folder gets label 0; an ImageFolder layout gets sorted class indices; crop is centered."""
    rng = np.random.default_rng(0)
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, 10:30] = 255  # the central 20 columns are white; a centre crop keeps only them
    _write(tmp_path / "plain" / "a.png", wide)
    _write(tmp_path / "plain" / "b.jpg", rng.integers(0, 255, (30, 30, 3), dtype=np.uint8))
    ds = ImageFolderDataset(tmp_path / "plain", size=10)
    x, y = ds[0]
    assert len(ds) == 2 and x.shape == (3, 10, 10) and int(y) == 0
    assert float(x[:, :, 1:-1].min()) > 0.95 and float(x.min()) > 0.5  # white: the dark sides are cropped
    assert x.min() >= -1 and x.max() <= 1

    for cls, n in [("zebra", 2), ("ant", 3)]:
        for i in range(n):
            _write(tmp_path / "cls" / cls / f"{i}.png", rng.integers(0, 255, (12, 12), dtype=np.uint8))
    xs, ys = image_folder_tensors(tmp_path / "cls", size=8, channels=1)
    assert xs.shape == (5, 1, 8, 8) and ys.tolist() == [0, 0, 0, 1, 1]
    assert ImageFolderDataset(tmp_path / "cls", 8).classes == ["ant", "zebra"]


def test_image_folder_errors(tmp_path):
    """Missing and empty folders give one-line ValueErrors."""
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope", 8)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="contains no images"):
        ImageFolderDataset(tmp_path / "empty", 8)


def test_classifier_asset_small_and_accurate():
    """The bundled classifier is < 1 MB and scores >= 95 % on the held-out test split at every size."""
    assert DEFAULT_WEIGHTS.is_file() and DEFAULT_WEIGHTS.stat().st_size < 1_000_000
    model = load_digits_classifier()
    for size in (8, 16, 32):
        x, y = digits_tensors("test", size)
        assert classifier_accuracy(model, x, y) >= 0.95
    x, y = digits_tensors("test", 16)
    assert classifier_accuracy(model, x.expand(-1, 3, -1, -1), y) >= 0.95  # RGB input is averaged


def test_feature_extractor_registered_and_uint8_interface(tmp_path):
    """torch-fidelity builds the extractor by name; it maps uint8 images to 64-d features and logits."""
    import torch_fidelity.registry as reg
    from torch_fidelity.utils import create_feature_extractor

    assert EXTRACTOR_NAME in reg.FEATURE_EXTRACTORS_REGISTRY
    fe = create_feature_extractor(EXTRACTOR_NAME, ["logits", "penultimate"], cuda=False, verbose=False)
    x, y = digits_tensors("test", 8)
    u8 = ((x[:50] + 1) * 127.5).round().to(torch.uint8).expand(-1, 3, -1, -1)
    logits, feat = fe(u8)
    assert feat.shape == (50, FEATURE_DIM) and logits.shape == (50, 10)
    assert (logits.argmax(1) == y[:50]).float().mean() > 0.9
    with pytest.raises(ValueError, match="uint8"):
        fe(x[:2].expand(-1, 3, -1, -1))
    with pytest.raises(ValueError, match="not found"):
        load_digits_classifier(tmp_path / "missing.safetensors")
