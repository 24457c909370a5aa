"""NFE sweeps: evaluate a sampler at several step counts; tables (markdown + JSON) and plots."""

from __future__ import annotations

import json
import math
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


def by_nfe_table(rows: list[dict[str, Any]]) -> str:
    """Benchmark rows (``problem``, ``model``, ``nfe``, ``metric``, ``value``, optional ``ratio``)
    pivoted to one markdown line per (problem, model) and one column per NFE, each cell
    ``value (ratio×)``; ``straightness`` rows are left out."""
    quality = [r for r in rows if r["metric"] != "straightness"]
    nfes = sorted({int(r["nfe"]) for r in quality})
    cells: dict[tuple[str, str], dict[int, str]] = {}
    for r in quality:
        ratio = r.get("ratio", float("nan"))
        txt = f"{r['value']:.4g}" + (f" ({ratio:.2f}×)" if math.isfinite(ratio) else "")
        cells.setdefault((r["problem"], r["model"]), {})[int(r["nfe"])] = txt
    lines = ["| problem | model | " + " | ".join(f"NFE {k}" for k in nfes) + " |",
             "|---|---|" + "---:|" * len(nfes)]
    for (problem, model), got in cells.items():
        lines.append(f"| {problem} | {model} | " + " | ".join(got.get(k, "") for k in nfes) + " |")
    return "\n".join(lines)


def plot_by_problem(rows: list[dict[str, Any]], out_dir: Path, prefix: str) -> list[Path]:
    """``OUT_DIR/<prefix>_<problem>.png``: the metric against NFE, one line per model, data floor
    dashed (the same row format as :func:`by_nfe_table`)."""
    from flowdistill.eval.plots import metric_vs_nfe

    out = []
    for problem in dict.fromkeys(r["problem"] for r in rows):
        mine = [r for r in rows if r["problem"] == problem and r["metric"] != "straightness"]
        if not mine:
            continue
        curves: dict[str, dict[int, float]] = {}
        for r in mine:
            curves.setdefault(r["model"], {})[int(r["nfe"])] = r["value"]
        floor = next((r["floor"] for r in mine if r.get("floor") is not None), None)
        out.append(metric_vs_nfe(curves, Path(out_dir) / f"{prefix}_{problem}.png", ylabel=mine[0]["metric"],
                                 floor=floor, logy=True, title=problem))
    return out
