"""NFE sweeps: evaluate a sampler at several step counts; tables (markdown + JSON) and plots."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

Sampler = Callable[[int, int, int], torch.Tensor]  # (n, nfe, seed) -> samples


def toy_sweep(samplers: dict[str, Sampler], nfes: dict[str, list[int]], dataset, n: int, seed: int,
              n_projections: int = 512) -> tuple[list[dict[str, Any]], dict[str, dict[int, torch.Tensor]]]:
    """Sliced W2 and energy distance of each sampler at each NFE against fresh target samples.

    Every row also carries the data-vs-data floor at the same ``n``. Returns the rows and the
    samples (for plots).
    """
    from flowdistill.eval.toy_metrics import evaluate_samples

    rows, samples = [], {}
    for name, sampler in samplers.items():
        samples[name] = {}
        for nfe in nfes[name]:
            x = sampler(n, nfe, seed)
            samples[name][nfe] = x
            m = evaluate_samples(x, dataset, seed=seed + 1, n_projections=n_projections)
            rows.append({"model": name, "nfe": nfe, **m})
    return rows, samples


def write_table(rows: list[dict[str, Any]], columns: list[str], out_dir: Path, stem: str = "sweep") -> str:
    """Write ``stem.md`` and ``stem.json`` under ``out_dir``; returns the markdown."""
    from flowdistill.eval.toy_metrics import markdown_table

    out_dir.mkdir(parents=True, exist_ok=True)
    md = markdown_table(rows, columns)
    (out_dir / f"{stem}.md").write_text(md + "\n")
    (out_dir / f"{stem}.json").write_text(json.dumps(rows, indent=2))
    return md
