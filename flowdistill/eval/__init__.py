"""Evaluation: toy distances and floors (``toy_metrics``), plots (``plots``), NFE sweeps, FID.

The toy metrics are re-exported here; the plotting functions are re-exported lazily so that
importing ``flowdistill.eval`` does not import matplotlib.
"""

from __future__ import annotations

from typing import Any

from flowdistill.eval.toy_metrics import (
    data_floor,
    energy_distance,
    evaluate_samples,
    markdown_table,
    sliced_wasserstein2,
)

_PLOTS = ("scatter_grid", "metric_vs_nfe", "image_grid")


def __getattr__(name: str) -> Any:
    """Lazy access to the plotting functions of :mod:`flowdistill.eval.plots`."""
    if name in _PLOTS:
        from flowdistill.eval import plots

        return getattr(plots, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "data_floor",
    "energy_distance",
    "evaluate_samples",
    "image_grid",
    "markdown_table",
    "metric_vs_nfe",
    "scatter_grid",
    "sliced_wasserstein2",
]
