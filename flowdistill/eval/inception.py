"""The offline Inception-v3 feature extractor for FID, registered with torch-fidelity.

``"inception"`` features are torch-fidelity's ``inception-v3-compat`` (2048-d pool features) with
its weights read from a local file (safetensors, or a torch file loaded with ``weights_only=True``)
— nothing is downloaded and nothing is unpickled. Importing this module registers the extractor
with torch-fidelity as :data:`INCEPTION_EXTRACTOR_NAME`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from safetensors.torch import load_file
from torch import Tensor
from torch_fidelity import feature_extractor_inceptionv3 as _tf_inception
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

INCEPTION_EXTRACTOR_NAME = "flowdistill-inception-v3"
INCEPTION_HUB_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_HUB_FILE


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
        self,
        name: str,
        features_list: list[str],
        feature_extractor_weights_path: str | None = None,
        **kwargs: Any,
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


def inception_weights_path(path: str | os.PathLike | None) -> Path:
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


__all__ = [
    "INCEPTION_EXTRACTOR_NAME",
    "INCEPTION_HUB_FILE",
    "INCEPTION_URL",
    "SafeInceptionV3",
    "inception_weights_path",
    "load_weights_file",
]
