"""CLIP score of generated images against their prompts, with a CLIP model from a local directory.

    CLIPScore(I, c) = 100 · max(cos(E_I(I), E_T(c)), 0)

(Hessel et al., "CLIPScore: A Reference-free Evaluation Metric for Image Captioning", EMNLP 2021,
with the ×100 scale of torchmetrics' ``CLIPScore`` instead of the paper's ``w = 2.5``), averaged over
the image–prompt pairs. ``E_I`` / ``E_T`` are the projected image and text embeddings of a
``transformers`` ``CLIPModel``; images go through the directory's own ``CLIPProcessor`` (resize,
centre crop, normalisation). The model is read with ``local_files_only=True``: nothing is downloaded.

Needs ``transformers`` (``pip install 'flowdistill[pipelines]'`` or ``pip install transformers``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowdistill.errors import ConfigError
from flowdistill.eval.image_io import to_uint8


def require_transformers() -> None:
    """ConfigError naming the extra when ``transformers`` is missing."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ConfigError("--clip-model needs transformers: pip install 'flowdistill[pipelines]' "
                          "(or pip install transformers)") from None


def load_clip(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """``(CLIPModel, CLIPProcessor)`` from a local directory (``save_pretrained`` layout)."""
    require_transformers()
    from transformers import CLIPModel, CLIPProcessor

    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"--clip-model {p}: not a directory (a transformers CLIPModel saved with "
                          f"save_pretrained, with its processor)")
    try:
        model = CLIPModel.from_pretrained(str(p), local_files_only=True).eval().to(device)
        processor = CLIPProcessor.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--clip-model {p}: cannot load a CLIPModel and CLIPProcessor: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return model, processor


def _as_uint8_hwc(images: Tensor | Sequence[Any]) -> list[np.ndarray]:
    """Images ``[N, C, H, W]`` in [-1, 1] (or a list of PIL images) as uint8 HWC RGB arrays."""
    if torch.is_tensor(images):
        x = to_uint8(images.detach().float().clamp(-1, 1))
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return [a for a in x.permute(0, 2, 3, 1).numpy()]
    return [np.asarray(im.convert("RGB")) for im in images]


@torch.no_grad()
def clip_score(images: Tensor | Sequence[Any], prompts: Sequence[str], model: Any, processor: Any,
               batch_size: int = 32) -> dict[str, float | int]:
    """Mean and standard deviation of ``100·max(cos(E_I, E_T), 0)`` over image ``i`` with prompt ``i``.

    ``images``: ``[N, C, H, W]`` in [-1, 1] or N PIL images; ``prompts``: N strings (truncated to the
    model's text length). Returns ``{"clip_score", "clip_score_std", "n"}``.
    """
    arrays = _as_uint8_hwc(images)
    if len(arrays) != len(prompts) or not arrays:
        raise ValueError(f"clip_score needs one prompt per image, got {len(arrays)} images and "
                         f"{len(prompts)} prompts")
    dev = next(model.parameters()).device
    scores = []
    for lo in range(0, len(arrays), batch_size):
        batch = processor(text=list(prompts[lo:lo + batch_size]), images=arrays[lo:lo + batch_size],
                          return_tensors="pt", padding=True, truncation=True)
        batch = {k: v.to(dev) for k, v in batch.items()}
        img = model.get_image_features(pixel_values=batch["pixel_values"])
        txt = model.get_text_features(input_ids=batch["input_ids"],
                                      attention_mask=batch.get("attention_mask"))
        img = getattr(img, "pooler_output", img)  # transformers versions differ in what they return
        txt = getattr(txt, "pooler_output", txt)
        cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
        scores.append(100.0 * cos.clamp_min(0))
    s = torch.cat(scores)
    return {"clip_score": float(s.mean()), "clip_score_std": float(s.std()) if s.numel() > 1 else 0.0,
            "n": int(s.numel())}


__all__ = ["clip_score", "load_clip", "require_transformers"]
