"""Report stages: a quality table of earlier stages' runs (and any other run or model directory).

A report stage names its rows::

    - name: report
      kind: report
      runs: {teacher: "${recipe:teacher}", 2-RF: "${stage:2rf}", "student (1-step)": "${stage:instaflow}"}
      nfe: {teacher: [1, 2, 4, 128], 2-RF: [1, 2, 4, 128], "student (1-step)": [1]}
      straightness: {"student (1-step)": 1}      # Euler steps of the measured path (default: max NFE)
      n: 4000                                    # default: the last run's eval.n_samples
      seed: 1234                                 # default: its eval.seed

A budget is an NFE (the run's own sampler) or ``[nfe, solver]``; a label without ``nfe`` uses its
distiller's :attr:`~flowdistill.distillers.base.Distiller.eval_nfe`. Rows are
:func:`flowdistill.eval.straightness.quality_rows` (sliced W2 on toy targets, FID + KID on images,
each with its floor, beside trajectory straightness), written to ``OUT_DIR/NAME.md`` and
``OUT_DIR/NAME.json`` with the recipe's stage wall times appended.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flowdistill.api import load_run
from flowdistill.atomic import atomic_write_text
from flowdistill.errors import ConfigError
from flowdistill.recipes.spec import Stage


def _budget(b: Any) -> int | tuple[int, str]:
    return (int(b[0]), str(b[1])) if isinstance(b, list | tuple) else int(b)


def report_rows(stage: Stage, cache_dir: Path | None = None) -> list[dict[str, Any]]:
    """The quality rows of a report stage (see the module docstring)."""
    from flowdistill.eval.straightness import quality_rows

    spec = stage.report
    loaded = {label: load_run(path) for label, path in spec["runs"].items()}
    nfe_spec = spec.get("nfe") or {}
    unknown = [k for k in list(nfe_spec) + list(spec.get("straightness") or {}) if k not in loaded]
    if unknown:
        raise ConfigError(f"recipe stage '{stage.name}': {unknown[0]!r} is not one of its runs "
                          f"({', '.join(loaded)})")
    nfes = {label: [_budget(b) for b in nfe_spec.get(label) or run.distiller.eval_nfe]
            for label, run in loaded.items()}
    straight = {label: int((spec.get("straightness") or {}).get(label) or
                           max(b if isinstance(b, int) else b[0] for b in nfes[label]))
                for label in loaded}
    last = list(loaded.values())[-1].cfg
    n = int(spec.get("n") or last.eval.n_samples)
    seed = int(spec.get("seed") if spec.get("seed") is not None else last.eval.seed)
    return quality_rows(loaded, nfes, last.data, n=n, seed=seed, straight_nfe=straight, cache_dir=cache_dir)


def write_report(stage: Stage, out_dir: Path, timings: Path | None = None) -> list[dict[str, Any]]:
    """Compute a report stage's rows and write ``OUT_DIR/NAME.md`` / ``.json`` (printed too)."""
    from flowdistill.eval.straightness import columns_for
    from flowdistill.eval.toy_metrics import markdown_table

    rows = report_rows(stage, cache_dir=out_dir / "fid_cache")
    data = load_run(next(iter(stage.report["runs"].values()))).cfg.data
    md = markdown_table(rows, columns_for(data))
    if timings is not None and timings.is_file():
        t = json.loads(timings.read_text())
        md += "\n\n" + markdown_table([{"step": k, "wall_s": v} for k, v in t.items()], ["step", "wall_s"])
    atomic_write_text(out_dir / f"{stage.name}.md", md + "\n")
    atomic_write_text(out_dir / f"{stage.name}.json", json.dumps(rows, indent=2))
    print(md)
    return rows
