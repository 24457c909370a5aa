"""Semantic teachers ``F`` for RecTok (arXiv 2512.13421; METHODS.md §6): frozen feature nets whose
patch tokens the tokenizer's semantic decoder learns to match, ``1 − cos(D_sem(z_t), F(x))``.

    teacher = build_semantic_teacher("digits_ssl", tokens=64)            # bundled, for the digits
    teacher = build_semantic_teacher("dinov2", path="/models/dinov2-small", tokens=256)
    feats = teacher(x)     # x [B, C, H, W] in [-1, 1]  ->  [B, tokens, teacher.dim]

Every teacher is frozen and stays in eval mode; ``forward`` runs without gradients. The teacher's
own patch grid is resampled to the tokenizer's ``√tokens × √tokens`` grid by area interpolation
(the mean over the covered patches when shrinking; each patch repeated when growing).

- ``digits_ssl``: :class:`DigitsSSLNet`, a small conv net trained *self-supervised* (SimCLR, Chen et
  al. 2020: NT-Xent between two augmented views; no labels) on the digits train split at 32×32 by
  ``scripts/train_digits_semantic_net.py``; weights ``assets/digits_semantic.safetensors`` (safetensors
  only). It is deliberately not the FID feature net (:mod:`flowdistill.models.digits_classifier`: a
  supervised classifier at 16×16 with max-pooling), so a tokenizer is not rewarded for copying the
  metric's features.
- ``dinov2`` / ``dinov3`` / ``siglip``: a vision transformer saved on disk (``path=``, a directory with
  ``config.json``; nothing is downloaded), loaded through ``transformers`` (an optional extra).
  Images are mapped to [0, 1], gray repeated to RGB, resized (bicubic, antialiased) to the model's
  input size and normalised with the processor's ``image_mean``/``image_std`` (from
  ``preprocessor_config.json`` when present, otherwise the family default); the CLS and register
  tokens are dropped (patch tokens are the last ``(size / patch)²`` of ``last_hidden_state``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from flowdistill.core.registry import Registry
from flowdistill.errors import ConfigError
from flowdistill.resources import assets_dir

SEMANTIC_TEACHERS: Registry = Registry("semantic teacher")
DIGITS_SSL_WEIGHTS = assets_dir() / "digits_semantic.safetensors"
DIGITS_SSL_SIZE = 32


def token_grid(tokens: int) -> int:
    """Side of the square token grid (``tokens`` must be a positive square: the tokenizer's grid)."""
    grid = math.isqrt(tokens) if isinstance(tokens, int) and tokens > 0 else 0
    if grid * grid != tokens or grid == 0:
        raise ConfigError(f"semantic teacher tokens={tokens} must be a positive square number "
                          f"(the tokenizer's token grid)")
    return grid


def resample_tokens(feats: Tensor, tokens: int) -> Tensor:
    """Patch features ``[B, D, h, w]`` → ``[B, tokens, D]`` on a ``√tokens`` grid (area interpolation)."""
    grid = token_grid(tokens)
    if feats.shape[-2:] != (grid, grid):
        feats = F.interpolate(feats, size=(grid, grid), mode="area")
    return feats.flatten(2).transpose(1, 2)


class SemanticTeacher(nn.Module):
    """A frozen feature net: ``forward(x [B, C, H, W] in [-1, 1]) -> [B, tokens, dim]``.

    Subclasses implement :meth:`patch_features` (``[B, dim, h, w]`` on their own grid).
    """

    def __init__(self, dim: int, tokens: int):
        super().__init__()
        token_grid(tokens)
        self.dim, self.tokens = int(dim), int(tokens)

    def freeze(self) -> SemanticTeacher:
        """No parameter takes gradients; eval mode."""
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> SemanticTeacher:  # noqa: ARG002 - always eval
        """A teacher stays in eval mode whatever the training loop asks."""
        return super().train(False)

    def patch_features(self, x: Tensor) -> Tensor:
        """``[B, dim, h, w]`` features of images in [-1, 1]."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """Patch tokens of ``x [B, 1|3, H, W]`` in [-1, 1], resampled to ``[B, tokens, dim]``."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"semantic teacher expects images [B, 1|3, H, W], got {tuple(x.shape)}")
        return resample_tokens(self.patch_features(x).float(), self.tokens)


class DigitsSSLNet(nn.Module):
    """Conv net ``[B, 1, 32, 32] -> [B, dim, 8, 8]`` patch features (stride 4, like a patch-4 tokenizer).

    Five 3×3 convolutions (32, 32, 64, 64, 64 channels; the 1st and 3rd with stride 2), each followed
    by GroupNorm(8) and GELU, then a 1×1 projection to ``dim``. :meth:`embed` is the image embedding
    (the mean over the 64 tokens) that the SimCLR objective is applied to.
    """

    def __init__(self, dim: int = 64):
        super().__init__()
        layers: list[nn.Module] = []
        for cin, cout, stride in ((1, 32, 2), (32, 32, 1), (32, 64, 2), (64, 64, 1), (64, 64, 1)):
            layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.GELU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(64, dim, 1)
        self.dim = dim

    @staticmethod
    def prepare(x: Tensor) -> Tensor:
        """``[B, 1|3, H, W]`` in [-1, 1] → gray ``[B, 1, 32, 32]`` (bilinear, antialiased)."""
        x = x.float()
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        if x.shape[-2:] != (DIGITS_SSL_SIZE, DIGITS_SSL_SIZE):
            x = F.interpolate(x, size=(DIGITS_SSL_SIZE, DIGITS_SSL_SIZE), mode="bilinear",
                              align_corners=False, antialias=True)
        return x

    def forward(self, x: Tensor) -> Tensor:
        """Patch features ``[B, dim, 8, 8]``."""
        return self.head(self.body(self.prepare(x)))

    def embed(self, x: Tensor) -> Tensor:
        """Image embedding ``[B, dim]``: the token mean."""
        return self(x).mean(dim=(2, 3))


class DigitsSSLTeacher(SemanticTeacher):
    """The bundled self-supervised digits net (``digits_ssl``) as a frozen semantic teacher."""

    def __init__(self, net: DigitsSSLNet, tokens: int):
        super().__init__(net.dim, tokens)
        self.net = net
        self.freeze()

    def patch_features(self, x: Tensor) -> Tensor:
        """``[B, dim, 8, 8]``."""
        return self.net(x)


def load_digits_ssl_net(weights: str | Path | None = None) -> DigitsSSLNet:
    """The trained :class:`DigitsSSLNet` from ``weights`` (default: the shipped asset), safetensors only."""
    path = Path(weights) if weights is not None else DIGITS_SSL_WEIGHTS
    if not path.is_file():
        raise ConfigError(f"semantic teacher 'digits_ssl': weights file {path} does not exist "
                          f"(train it with scripts/train_digits_semantic_net.py)")
    state = load_file(str(path))
    net = DigitsSSLNet(dim=int(state["head.weight"].shape[0]))
    net.load_state_dict(state)
    return net.eval()


@SEMANTIC_TEACHERS.register("digits_ssl")
def digits_ssl(tokens: int = 64, weights: str | Path | None = None) -> DigitsSSLTeacher:
    """The bundled self-supervised digits teacher (64-d patch tokens on an 8×8 grid)."""
    token_grid(tokens)
    return DigitsSSLTeacher(load_digits_ssl_net(weights), tokens)


# name -> {transformers model_type: class name}; family defaults for the processor's normalisation
_FAMILIES: dict[str, dict[str, str]] = {
    "dinov2": {"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"},
    "dinov3": {"dinov3_vit": "DINOv3ViTModel"},
    "siglip": {"siglip": "SiglipVisionModel", "siglip_vision_model": "SiglipVisionModel"},
}
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_DEFAULT_NORM = {"dinov2": _IMAGENET, "dinov3": _IMAGENET, "siglip": ((0.5,) * 3, (0.5,) * 3)}


def _processor_settings(path: Path) -> dict[str, Any]:
    """``preprocessor_config.json`` of a saved model (empty when absent)."""
    f = path / "preprocessor_config.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def _processor_size(proc: dict[str, Any]) -> int | None:
    """The square input size a processor produces (crop size, else resize size), if it says."""
    for key in ("crop_size", "size"):
        val = proc.get(key)
        if isinstance(val, int):
            return val
        if isinstance(val, dict):
            for k in ("height", "shortest_edge"):
                if k in val:
                    return int(val[k])
    return None


class TransformersTeacher(SemanticTeacher):
    """A transformers vision backbone (DINOv2 / DINOv3 / SigLIP) as a frozen semantic teacher."""

    def __init__(self, model: nn.Module, tokens: int, image_size: int, patch_size: int,
                 mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__(int(model.config.hidden_size), tokens)
        self.model = model
        self.image_size, self.patch_size = int(image_size), int(patch_size)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.freeze()

    def patch_features(self, x: Tensor) -> Tensor:
        """Patch tokens of the last layer ``[B, hidden, S/p, S/p]`` (CLS and registers dropped)."""
        x = ((x.float() + 1) / 2).clamp(0, 1)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        s = self.image_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        x = (x - self.mean) / self.std
        param = next(self.model.parameters())
        hidden = self.model(pixel_values=x.to(param.dtype)).last_hidden_state
        g = s // self.patch_size
        patches = hidden[:, -g * g:]  # CLS / register tokens come first
        return patches.transpose(1, 2).reshape(x.shape[0], -1, g, g)


def _load_transformers(name: str, path: str | Path | None, tokens: int, image_size: int | None,
                       dtype: torch.dtype | None) -> TransformersTeacher:
    """Load the ``name`` family's backbone from the local directory ``path`` (no network)."""
    token_grid(tokens)
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"semantic teacher {name!r} needs the optional extra transformers "
                          f"(pip install 'flowdistill[pipelines]')") from None
    if path is None:
        raise ConfigError(f"semantic teacher {name!r}: path= (a local directory with a saved model) "
                          f"is required")
    p = Path(path)
    if not (p / "config.json").is_file():
        raise ConfigError(f"semantic teacher {name!r}: path {p} is not a saved transformers model "
                          f"(no config.json)")
    cfg = transformers.AutoConfig.from_pretrained(str(p), local_files_only=True)
    cls_name = _FAMILIES[name].get(cfg.model_type)
    if cls_name is None:
        raise ConfigError(f"semantic teacher {name!r}: path {p} holds a {cfg.model_type!r} model; "
                          f"expected one of {sorted(_FAMILIES[name])}")
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        raise ConfigError(f"semantic teacher {name!r}: transformers {transformers.__version__} has no "
                          f"{cls_name}; upgrade transformers")
    model = cls.from_pretrained(str(p), local_files_only=True)
    if dtype is not None:
        model = model.to(dtype)
    vcfg = model.config
    proc = _processor_settings(p)
    if name == "siglip":  # learnt absolute position embeddings: only the trained size
        size = int(vcfg.image_size)
    else:
        size = int(image_size or _processor_size(proc) or vcfg.image_size)
    if size % int(vcfg.patch_size):
        raise ConfigError(f"semantic teacher {name!r}: image_size {size} is not a multiple of the "
                          f"patch size {vcfg.patch_size}")
    mean = tuple(proc.get("image_mean", _DEFAULT_NORM[name][0]))
    std = tuple(proc.get("image_std", _DEFAULT_NORM[name][1]))
    return TransformersTeacher(model, tokens, size, int(vcfg.patch_size), mean, std)


def _register_transformers(name: str) -> None:
    """Register the loader of one transformers family under ``name``."""

    def build(path: str | Path | None = None, tokens: int = 256, image_size: int | None = None,
              dtype: torch.dtype | None = None) -> TransformersTeacher:
        return _load_transformers(name, path, tokens, image_size, dtype)

    build.__doc__ = (f"A frozen {name} backbone from the local directory ``path`` (patch tokens resampled "
                     f"to ``tokens``; ``image_size`` overrides the processor's input size).")
    SEMANTIC_TEACHERS.register(name)(build)


for _name in _FAMILIES:
    _register_transformers(_name)


def build_semantic_teacher(name: str, /, **kw: Any) -> SemanticTeacher:
    """Build the registered semantic teacher ``name`` (unknown name: ``UnknownNameError`` listing the
    registered ones; a bad keyword: ``ConfigError``)."""
    factory = SEMANTIC_TEACHERS.get(name)
    try:
        return factory(**kw)
    except TypeError as e:
        raise ConfigError(f"semantic teacher {name!r}: {e}") from None


__all__ = ["SEMANTIC_TEACHERS", "DigitsSSLNet", "SemanticTeacher", "TransformersTeacher",
           "build_semantic_teacher", "load_digits_ssl_net", "resample_tokens", "token_grid"]
