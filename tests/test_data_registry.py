"""The dataset registry (flowdistill.data.registry): built-ins, a user's dataset registered from a
module, clear errors for unknown names, a lazy image folder, and loader batches that depend on
their key only (0 vs 2 workers, 1 vs 2 processes)."""

from __future__ import annotations

import importlib
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from flowdistill import api
from flowdistill.config import load_config
from flowdistill.core.registry import UnknownNameError
from flowdistill.data.loader import BatchKey, batch_for, make_loader
from flowdistill.data.registry import (
    ImageFolderSource,
    build_dataset,
    dataset_entry,
    dataset_names,
    reference_images,
    sample_shape_of,
)
from flowdistill.data.sources import SamplerSource, TensorSource
from flowdistill.data.toy2d import TOY_DATASETS
from flowdistill.errors import ConfigError


def spec(**kw) -> SimpleNamespace:
    """A data spec with the DataSpec defaults."""
    base = {"name": "checkerboard", "conditional": False, "image_size": 16, "root": ""}
    return SimpleNamespace(**{**base, **kw})


@pytest.fixture
def folder(tmp_path):
    """24 random 12x10 RGB PNGs in two class folders (``a``: 14, ``b``: 10)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for cls, count in (("a", 14), ("b", 10)):
        (root / cls).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i:02d}.png")
    return root


def test_builtins_are_registered_with_their_shapes():
    names = dataset_names()
    assert set(TOY_DATASETS.names()) | {"digits", "image_folder"} <= set(names)
    for toy in TOY_DATASETS.names():
        src = build_dataset(spec(name=toy, conditional=True))
        assert isinstance(src, SamplerSource) and dataset_entry(toy).kind == "toy"
        assert sample_shape_of(spec(name=toy)) == src.sample_shape == (2,)
        assert src.num_classes == TOY_DATASETS.get(toy).num_classes
    digits = build_dataset(spec(name="digits", image_size=8, conditional=True))
    assert isinstance(digits, TensorSource) and len(digits) == 1437 and digits.num_classes == 10
    assert len(build_dataset(spec(name="digits", image_size=8), "test")) == 360
    item = digits.get_many(torch.tensor([5, 6]))
    assert item["x"].shape == (2, 1, 8, 8) and item["cond"].dtype == torch.long
    assert dataset_entry("digits").feature_extractor == "digits"


def test_sample_shape_reads_no_data(monkeypatch, tmp_path):
    """Built-in shapes come from the spec: no digits are loaded, no folder is listed."""
    import flowdistill.data.digits as digits

    monkeypatch.setattr(digits, "digits_tensors", lambda *a, **k: pytest.fail("digits were loaded"))
    assert sample_shape_of(spec(name="digits", image_size=16)) == (1, 16, 16)
    nowhere = spec(name="image_folder", image_size=32, root=str(tmp_path / "nowhere"))
    assert sample_shape_of(nowhere) == (3, 32, 32)
    assert api.sample_shape_of(spec(name="digits", image_size=8)) == (1, 8, 8)


PLUGIN = '''
import torch
from flowdistill.data.registry import register_dataset
from flowdistill.data.sources import TensorSource


@register_dataset("user_ramps", sample_shape=lambda spec: (1, spec.image_size, spec.image_size))
def user_ramps(spec, split):
    """Constant images of value k/10 - 1 (label k); train 20 of them, test 10."""
    n = 20 if split == "train" else 10
    y = torch.arange(n) % 7
    x = (y.float() / 10 - 1).view(n, 1, 1, 1).expand(n, 1, spec.image_size, spec.image_size).clone()
    if split == "test":
        x = x + 0.5
    return TensorSource(x, y, conditional=spec.conditional, num_classes=7)
'''


def test_user_dataset_registered_from_a_module(tmp_path, monkeypatch):
    """What --plugin MODULE does: import a module; its dataset then builds from a config by name."""
    (tmp_path / "my_flowdistill_data.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "user_ramps" not in dataset_names()
    importlib.import_module("my_flowdistill_data")
    try:
        cfg = load_config(None, [f"out_dir={tmp_path / 'run'}", "data.name=user_ramps", "data.image_size=4",
                                 "data.conditional=true"])
        src = api.build_source(cfg.data)
        assert len(src) == 20 and src.num_classes == 7 and src.conditional
        assert api.sample_shape_of(cfg.data) == (1, 4, 4)
        b = batch_for(src, seed=3, step=2, local_batch=6)
        assert b["x"].shape == (6, 1, 4, 4)
        assert torch.equal(b["x"][:, 0, 0, 0], b["cond"].float() / 10 - 1)  # items stay paired
        # eval's reference images come from its own test split, the floor from train
        ref = reference_images(cfg.data, n=8)
        assert ref.reference.shape == ref.floor.shape == (8, 1, 4, 4)
        assert (ref.reference >= -0.5).all() and (ref.floor <= -0.39).all()
        assert ref.name == "user_ramps-test-4" and ref.feature_extractor == "inception"
        with pytest.raises(ValueError, match="already registered"):
            importlib.reload(sys.modules["my_flowdistill_data"])
    finally:
        from flowdistill.data.registry import DATASETS

        DATASETS._items.pop("user_ramps", None)  # leave the global registry as we found it
        sys.modules.pop("my_flowdistill_data", None)


def test_unknown_dataset_is_one_clear_error_everywhere(tmp_path, monkeypatch):
    bad = spec(name="no_such_set")
    for call in (lambda: build_dataset(bad), lambda: sample_shape_of(bad), lambda: reference_images(bad),
                 lambda: api.build_source(bad)):
        with pytest.raises(UnknownNameError) as e:
            call()
        msg = str(e.value)
        assert "unknown dataset 'no_such_set'" in msg and "digits, image_folder" in msg
        assert "checkerboard" in msg and "--plugin" in msg
    # eval of a run on a dataset it does not know fails before sampling, from its own data spec
    from flowdistill.eval.run_eval import evaluate_run

    run = SimpleNamespace(cfg=SimpleNamespace(data=bad, distiller=SimpleNamespace(name="x")),
                          sample=lambda *a, **k: pytest.fail("sampled"))
    with pytest.raises(UnknownNameError, match="no_such_set"):
        evaluate_run(run, [1], 10, tmp_path / "eval")


def test_image_folder_never_falls_back_to_the_current_directory(tmp_path, monkeypatch, folder):
    monkeypatch.chdir(folder / "a")  # a directory full of images
    for call in (lambda: build_dataset(spec(name="image_folder")),
                 lambda: reference_images(spec(name="image_folder"))):
        with pytest.raises(ConfigError, match="needs data.root=DIR"):
            call()
    from flowdistill.eval.image_eval import reference_images as eval_reference

    run = SimpleNamespace(cfg=SimpleNamespace(data=spec(name="image_folder")))
    with pytest.raises(ConfigError, match="needs data.root"):
        eval_reference(run)


def test_image_folder_is_lazy(folder, monkeypatch):
    """Construction opens no image; a batch opens only its files; a file deleted after construction
    fails only the batch that needs it."""
    import flowdistill.data.images as images

    opened = []
    real_open = images.Image.open

    def counting_open(path, *a, **k):
        opened.append(str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(images.Image, "open", counting_open)
    src = build_dataset(spec(name="image_folder", root=str(folder), image_size=8, conditional=True))
    assert isinstance(src, ImageFolderSource) and len(src) == 24 and src.num_classes == 2
    assert opened == []
    b = src.get_many(torch.tensor([0, 20, 3]))
    assert len(opened) == 3 and b["x"].shape == (3, 3, 8, 8) and b["cond"].tolist() == [0, 1, 0]
    assert b["x"].min() >= -1 and b["x"].max() <= 1
    files = src.folder.files
    files[7].unlink()
    assert src.get_many(torch.tensor([6, 8]))["x"].shape == (2, 3, 8, 8)
    with pytest.raises(FileNotFoundError):
        src.get_many(torch.tensor([6, 7]))
    # a plain folder cannot be conditional (every label would be 0)
    with pytest.raises(ConfigError, match="needs class folders"):
        ImageFolderSource(folder / "b", 8, conditional=True)


def test_loader_with_two_workers_gives_the_same_batches(folder):
    src = build_dataset(spec(name="image_folder", root=str(folder), image_size=8, conditional=True))
    keys = [BatchKey(step, tag, 0, 1, 5) for step in range(6) for tag in (0, 1)]
    serial = list(make_loader(src, keys, seed=11, num_workers=0))
    parallel = list(make_loader(src, keys, seed=11, num_workers=2))
    assert len(serial) == len(parallel) == len(keys)
    for a, b in zip(serial, parallel, strict=True):
        assert a.keys() == b.keys() == {"x", "cond"}
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["cond"], b["cond"])
    assert not torch.equal(serial[0]["x"], serial[1]["x"])  # different keys, different batches
    # and each batch is exactly the one batch_for gives for its key
    assert torch.equal(parallel[7]["x"], batch_for(src, 11, keys[7].step, keys[7].tag, local_batch=5)["x"])


def test_two_process_slices_concatenate_to_the_one_process_batch(folder):
    sources = {
        "image_folder": build_dataset(spec(name="image_folder", root=str(folder), image_size=8,
                                           conditional=True)),
        "digits": build_dataset(spec(name="digits", image_size=8, conditional=True)),
        "checkerboard": build_dataset(spec(name="checkerboard", conditional=True)),
    }
    for name, src in sources.items():
        one = batch_for(src, seed=5, step=9, tag=2, rank=0, world=1, local_batch=8)
        two = [batch_for(src, seed=5, step=9, tag=2, rank=r, world=2, local_batch=4) for r in range(2)]
        for k in ("x", "cond"):
            assert torch.equal(one[k], torch.cat([t[k] for t in two])), (name, k)
        assert not torch.equal(two[0]["x"], two[1]["x"]), name


def test_reference_images_digits_and_folder(folder):
    from flowdistill.data.digits import digits_tensors

    full = reference_images(spec(name="digits", image_size=8))
    test, _ = digits_tensors("test", 8)
    train, _ = digits_tensors("train", 8)
    assert torch.equal(full.reference, test) and full.floor.shape == test.shape
    assert full.name == "digits-test-8" and full.feature_extractor == "digits"
    # the floor is distinct train images (no test image, no repeats)
    flat_train = {tuple(r.tolist()) for r in train.flatten(1)}
    assert all(tuple(r.tolist()) in flat_train for r in full.floor.flatten(1))
    assert torch.unique(full.floor.flatten(1), dim=0).shape[0] > 300  # 8x8 digits repeat rarely
    small = reference_images(spec(name="digits", image_size=8), n=50)
    assert torch.equal(small.reference, full.reference[:50]) and torch.equal(small.floor, full.floor[:50])
    # an image folder: first half reference, second half floor, decoded lazily
    ref = reference_images(spec(name="image_folder", root=str(folder), image_size=8), n=5)
    src = ImageFolderSource(folder, 8)
    assert torch.equal(ref.reference, src.get_many(torch.arange(5))["x"])
    assert torch.equal(ref.floor, src.get_many(torch.arange(12, 17))["x"])
    assert ref.name == "folder-imgs-8" and ref.feature_extractor == "inception"
    with pytest.raises(ConfigError, match="toy dataset"):
        reference_images(spec(name="moons"))


def test_every_built_in_dataset_registers_under_its_own_name():
    """The tokenizer-latent cache and the diffusers pipeline caches register side by side (both once
    claimed ``latents``; importing the pipeline job then failed)."""
    import flowdistill.integrations.diffusers.pipeline_data  # noqa: F401  (registers prompts, latents)
    from flowdistill.data.registry import dataset_names

    names = set(dataset_names())
    assert {"tokenizer_latents", "latents", "prompts", "bouncing_digits", "video_folder", "digits"} <= names
