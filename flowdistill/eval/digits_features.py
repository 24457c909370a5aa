"""torch-fidelity feature extractor ``"digits-classifier"`` over the bundled digits classifier.

The network itself (:class:`~flowdistill.models.digits_classifier.DigitsClassifier`, its weights
asset and loader) lives in :mod:`flowdistill.models.digits_classifier`; its names are re-exported
here so existing imports keep working. The extractor's ``"penultimate"`` feature (64-d, scaled to
unit mean square on the train split) serves FID / KID / precision-recall, its ``"logits"`` (10-d)
the Inception Score.

Importing this module registers the torch-fidelity feature extractor ``"digits-classifier"``; it
receives uint8 ``[N, 3, H, W]`` images in 0..255, as every torch-fidelity extractor does.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from flowdistill.models.digits_classifier import (
    DEFAULT_WEIGHTS,
    FEATURE_DIM,
    INTERNAL_SIZE,
    NUM_CLASSES,
    DigitsClassifier,
    classifier_accuracy,
    load_digits_classifier,
    resolve_weights_path,
)

EXTRACTOR_NAME = "digits-classifier"

__all__ = [
    "DEFAULT_WEIGHTS",
    "EXTRACTOR_NAME",
    "FEATURE_DIM",
    "INTERNAL_SIZE",
    "NUM_CLASSES",
    "DigitsClassifier",
    "DigitsFeatureExtractor",
    "classifier_accuracy",
    "load_digits_classifier",
    "register",
    "resolve_weights_path",
]


class DigitsFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor over ``DigitsClassifier``: uint8 ``[N, 3, H, W]`` → features.

    Provided features: ``"penultimate"`` (64-d, the default for FID, KID and PRC) and ``"logits"``
    (10-d, the default for ISC). ``feature_extractor_weights_path`` overrides the bundled asset.
    """

    def __init__(
        self,
        name: str,
        features_list: list[str],
        feature_extractor_weights_path: str | None = None,
        **kwargs,
    ) -> None:
        """Load the classifier (bundled asset unless a weights path is given); other kwargs are ignored."""
        super().__init__(name, features_list)
        self.model = load_digits_classifier(feature_extractor_weights_path)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """Features for uint8 images in 0..255, in the order of the requested ``features_list``."""
        if not (torch.is_tensor(x) and x.dtype == torch.uint8):
            raise ValueError("digits feature extractor expects a torch.uint8 tensor of images in 0..255")
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"digits feature extractor expects [N, 3, H, W] images, got {tuple(x.shape)}")
        feat, logits = self.model.features(x.to(torch.float32) / 127.5 - 1.0)
        out = {"penultimate": feat, "logits": logits}
        return tuple(out[a].to(torch.float32) for a in self.features_list)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        """Names of the features this extractor can return."""
        return ("penultimate", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        """Default feature per metric: logits for ISC, the 64-d penultimate layer otherwise."""
        return {"isc": "logits", "fid": "penultimate", "kid": "penultimate", "prc": "penultimate"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        """The extractor is a plain CNN and may be wrapped with torch.compile."""
        return True

    @staticmethod
    def get_dummy_input_for_compile() -> Tensor:
        """A tiny uint8 batch for compilation."""
        return (torch.rand([1, 3, 8, 8]) * 255).to(torch.uint8)


def register() -> None:
    """Register ``"digits-classifier"`` with torch-fidelity (idempotent)."""
    if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EXTRACTOR_NAME, DigitsFeatureExtractor)


register()

