"""Semantic teachers: the bundled self-supervised digits net, the transformers backbones (tiny random
models saved to tmp_path, never the network), token resampling, and the error messages."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flowdistill.core.registry import UnknownNameError
from flowdistill.data.digits import digits_tensors
from flowdistill.errors import ConfigError
from flowdistill.models.semantic_teachers import (
    DIGITS_SSL_WEIGHTS,
    SEMANTIC_TEACHERS,
    build_semantic_teacher,
    resample_tokens,
)
from tests.helpers import single_thread  # noqa: F401  (autouse: one intra-op thread)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_digits_semantic_net.py"



def _script():
    """The training script as a module (for its augmentations)."""
    spec = importlib.util.spec_from_file_location("train_digits_semantic_net", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bundled_net_loads_frozen_and_gives_tokens():
    assert DIGITS_SSL_WEIGHTS.is_file()
    assert DIGITS_SSL_WEIGHTS.stat().st_size < 2_000_000
    teacher = build_semantic_teacher("digits_ssl", tokens=64)
    x = digits_tensors("test", 32)[0][:8]
    f = teacher(x)
    assert f.shape == (8, 64, teacher.dim) and teacher.dim == 64
    assert not f.requires_grad and torch.isfinite(f).all()
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training  # a teacher stays in eval mode
    # a 4x4 token grid is the exact 2x2 mean of the 8x8 one (area interpolation)
    f16 = build_semantic_teacher("digits_ssl", tokens=16)(x)
    pooled = F.avg_pool2d(f.transpose(1, 2).reshape(8, 64, 8, 8), 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(f16, pooled, atol=1e-5, rtol=1e-5)
    # 3-channel and 8x8 inputs are accepted (gray average; bilinear resize to 32)
    assert teacher(x.expand(-1, 3, -1, -1)).shape == (8, 64, 64)
    torch.testing.assert_close(teacher(x.expand(-1, 3, -1, -1)), f)
    assert teacher(digits_tensors("test", 8)[0][:2]).shape == (2, 64, 64)


def test_bundled_features_are_augmentation_invariant_and_class_aware():
    """On 200 test digits (20 per class, never trained on): an augmented view of a digit (the
    training augmentations) is closer to it than a digit of another class, and same-class pairs
    are closer than different-class pairs, on the token-mean embedding and token by token.
    Measured (cosine): embedding aug 0.987, same 0.568, different 0.197; tokens same 0.591,
    different 0.273. A randomly initialised net of the same architecture fails the 0.2 margins
    (embedding same 0.994 vs different 0.992; tokens 0.810 vs 0.720)."""
    x, y = digits_tensors("test", 32)
    idx = torch.cat([(y == c).nonzero().flatten()[:20] for c in range(10)])
    x, y = x[idx], y[idx]
    net = build_semantic_teacher("digits_ssl", tokens=64)
    aug = _script().augment(x, torch.Generator().manual_seed(0))
    e = F.normalize(net(x).mean(1), dim=1)
    e_aug = F.normalize(net(aug).mean(1), dim=1)
    cos = e @ e.T
    same = (y[:, None] == y[None]) & ~torch.eye(len(y), dtype=torch.bool)
    diff = y[:, None] != y[None]
    aug_cos = (e * e_aug).sum(1).mean()
    assert aug_cos > cos[diff].mean() + 0.2, (aug_cos, cos[diff].mean())
    assert cos[same].mean() > cos[diff].mean() + 0.2, (cos[same].mean(), cos[diff].mean())
    tok = F.normalize(net(x), dim=-1)
    tok_cos = torch.einsum("ind,jnd->ij", tok, tok) / tok.shape[1]  # mean per-token cosine
    assert tok_cos[same].mean() > tok_cos[diff].mean() + 0.2, (tok_cos[same].mean(), tok_cos[diff].mean())


def test_resample_tokens_and_token_count_errors():
    feats = torch.arange(16.0).reshape(1, 1, 4, 4)
    out = resample_tokens(feats, 4)
    assert torch.equal(out.flatten(), torch.tensor([2.5, 4.5, 10.5, 12.5]))  # 2x2 block means
    assert torch.equal(resample_tokens(feats, 16).flatten(), torch.arange(16.0))
    with pytest.raises(ConfigError, match="tokens"):
        resample_tokens(feats, 8)
    with pytest.raises(ConfigError, match="tokens"):
        build_semantic_teacher("digits_ssl", tokens=10)


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(UnknownNameError) as e:
        build_semantic_teacher("dino_v9")
    for name in ("digits_ssl", "dinov2", "dinov3", "siglip"):
        assert name in str(e.value) and name in SEMANTIC_TEACHERS


def test_missing_paths_and_bad_arguments_are_config_errors(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="weights"):
        build_semantic_teacher("digits_ssl", weights=tmp_path / "nope.safetensors")
    with pytest.raises(ConfigError, match="colour"):
        build_semantic_teacher("digits_ssl", colour=3)
    pytest.importorskip("transformers")
    with pytest.raises(ConfigError, match="path"):
        build_semantic_teacher("dinov2")
    with pytest.raises(ConfigError, match="config.json"):
        build_semantic_teacher("dinov2", path=tmp_path / "missing")
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match="transformers"):
        build_semantic_teacher("siglip", path=tmp_path)


def _tiny(cls_name: str, cfg_name: str, tmp_path: Path, **extra):
    """A tiny random transformers vision model saved to ``tmp_path`` (skip if the class is missing)."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, cls_name) or not hasattr(transformers, cfg_name):
        pytest.skip(f"transformers {transformers.__version__} has no {cls_name}")
    cfg = getattr(transformers, cfg_name)(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=64, image_size=32, patch_size=8, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(cfg).eval()
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("name,cls_name,cfg_name,extra,skip", [
    ("dinov2", "Dinov2Model", "Dinov2Config", {}, 1),                                   # CLS
    ("dinov2", "Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", {"num_register_tokens": 2}, 3),
    ("dinov3", "DINOv3ViTModel", "DINOv3ViTConfig", {"num_register_tokens": 2}, 3),    # CLS + 2 registers
    ("siglip", "SiglipVisionModel", "SiglipVisionConfig", {}, 0),                       # no CLS
])
def test_transformers_teacher_gives_patch_tokens(tmp_path, name, cls_name, cfg_name, extra, skip):
    model = _tiny(cls_name, cfg_name, tmp_path, **extra)
    teacher = build_semantic_teacher(name, path=tmp_path, tokens=64)
    assert teacher.dim == 32 and teacher.image_size == 32 and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    f = teacher(x)
    assert f.shape == (2, 64, 32)
    # the same computation by hand: [0,1], RGB, the family's normalisation, drop the first `skip`
    # tokens (CLS / registers), 4x4 patch grid -> 8x8 tokens (each patch repeated 2x2)
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    mean, std = ((0.5,) * 3, (0.5,) * 3) if name == "siglip" else imagenet
    pix = ((x + 1) / 2).expand(-1, 3, -1, -1)
    pix = (pix - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        hidden = model(pixel_values=pix).last_hidden_state
    assert hidden.shape[1] == 16 + skip
    grid = hidden[:, skip:].transpose(1, 2).reshape(2, 32, 4, 4)
    expected = grid.repeat_interleave(2, 2).repeat_interleave(2, 3).flatten(2).transpose(1, 2)
    torch.testing.assert_close(f, expected, atol=1e-5, rtol=1e-4)
    # a model of another family under this name is a clear error
    other = "siglip" if name != "siglip" else "dinov2"
    with pytest.raises(ConfigError, match="expected one of"):
        build_semantic_teacher(other, path=tmp_path)


def test_processor_settings_are_used(tmp_path):
    _tiny("Dinov2Model", "Dinov2Config", tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(
        '{"crop_size": {"height": 16, "width": 16}, "image_mean": [0.1, 0.2, 0.3], "image_std": [1, 1, 1]}')
    teacher = build_semantic_teacher("dinov2", path=tmp_path, tokens=4)
    assert teacher.image_size == 16
    torch.testing.assert_close(teacher.mean.flatten(), torch.tensor([0.1, 0.2, 0.3]))
    assert teacher(torch.zeros(3, 1, 32, 32)).shape == (3, 4, 32)
    assert build_semantic_teacher("dinov2", path=tmp_path, tokens=4, image_size=24).image_size == 24
    with pytest.raises(ConfigError, match="multiple"):
        build_semantic_teacher("dinov2", path=tmp_path, image_size=20)
