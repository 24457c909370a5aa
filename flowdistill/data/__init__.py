"""Data: toy 2-D targets with exact samplers (``toy2d``), digits, image folders, batch sources.

Only the toy targets are re-exported here (they are light); import ``flowdistill.data.digits``,
``flowdistill.data.images`` and ``flowdistill.data.sources`` directly.
"""

from flowdistill.data.toy2d import (
    TOY_DATASETS,
    Checkerboard,
    EightGaussians,
    ToyDataset,
    TwoMoons,
    TwoSpirals,
    get_toy,
    toy_batch,
)

__all__ = [
    "TOY_DATASETS",
    "Checkerboard",
    "EightGaussians",
    "ToyDataset",
    "TwoMoons",
    "TwoSpirals",
    "get_toy",
    "toy_batch",
]
