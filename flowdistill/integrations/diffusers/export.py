"""Export a trained run as a :class:`FlowDistillPipeline` directory (``flowdistill export``).

The pipeline samples as the run's own sampler does: a two-time (flow-map) student jumps edge to
edge on the run's ``sample_grid``; a one-time (velocity) student takes Euler steps on it. Grids map
to the scheduler's time shift: ``uniform`` → ``shift = 1``; ``shifted`` → the shift of
:func:`flowdistill.core.timesteps.shifted_grid`. A velocity run sampled with another solver than
Euler exports with a warning (the pipeline is Euler). Every export checks itself: it samples 8
seeded points at NFE 1 and 2 with the pipeline and with the run's sampler, warns if they differ by
more than 1e-4, and records the difference in ``flowdistill.json``.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import warnings
from pathlib import Path

from flowdistill.errors import ConfigError, FlowDistillError, RunDirError

GRIDS = ("uniform", "shifted")


def _grid_shift(distiller_cfg) -> float:
    from flowdistill.core.timesteps import shifted_grid

    grid = getattr(distiller_cfg, "sample_grid", "uniform")
    if grid == "uniform":
        return 1.0
    if grid == "shifted":  # the distillers' samplers build the grid with shifted_grid's own shift
        return float(inspect.signature(shifted_grid).parameters["shift"].default)
    raise ConfigError(f"cannot export sample_grid {grid!r} to FlowDistillScheduler; supported grids: "
                      f"{', '.join(GRIDS)}")


def build_pipeline(run):
    """A :class:`FlowDistillPipeline` for a :class:`~flowdistill.api.LoadedRun`."""
    from flowdistill.integrations.diffusers.pipeline import FlowDistillPipeline
    from flowdistill.integrations.diffusers.scheduler import FlowDistillScheduler

    dcfg = run.cfg.distiller
    two_time = bool(run.student.config.get("two_time", False))
    solver = getattr(dcfg, "sample_solver", "euler")
    if not two_time and solver != "euler":
        warnings.warn(f"run {run.run_dir} samples with solver {solver!r}; the exported pipeline takes Euler "
                      f"steps (FlowDistillScheduler)", stacklevel=2)
    scheduler = FlowDistillScheduler(shift=_grid_shift(dcfg))
    return FlowDistillPipeline(student=run.student, scheduler=scheduler)


def verify_pipeline(run, pipe, nfes: tuple[int, ...] = (1, 2), n: int = 8, seed: int = 0) -> float | None:
    """Max |pipeline − run sampler| over ``nfes`` on ``n`` seeded samples (None if the run's sampler
    cannot run at those NFE, e.g. a two-evaluation solver at NFE 1)."""
    import torch

    pipe.set_progress_bar_config(disable=True)
    worst = 0.0
    for nfe in nfes:
        try:
            ref = run.sample(n, nfe, seed=seed)
        except (ValueError, FlowDistillError):
            return None
        g = torch.Generator().manual_seed(seed)
        got = pipe(batch_size=n, num_inference_steps=nfe, generator=g).images
        worst = max(worst, (got.float().cpu() - ref.float().cpu()).abs().max().item())
    return worst


def export_run(run_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write ``run_dir``'s student as a diffusers pipeline directory ``out_dir`` (atomically).

    ``out_dir`` must not exist (or be empty) unless ``overwrite``. Returns ``out_dir``.
    """
    from flowdistill.api import load_run

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RunDirError(f"{out} is not empty; pass --overwrite to replace it")
    run = load_run(run_dir)
    pipe = build_pipeline(run)
    diff = verify_pipeline(run, pipe)
    if diff is None or diff > 1e-4:
        shown = "unknown" if diff is None else f"{diff:.3g}"
        warnings.warn(f"the exported pipeline does not reproduce the run's own sampler (max difference "
                      f"{shown} at NFE 1, 2): distiller {run.cfg.distiller.name!r} samples differently "
                      f"from flow-map/Euler steps", stacklevel=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    meta = {"run_dir": str(Path(run_dir).resolve()), "distiller": run.cfg.distiller.name,
            "sample_grid": getattr(run.cfg.distiller, "sample_grid", "uniform"),
            "two_time": bool(run.student.config.get("two_time", False)),
            "max_abs_diff_vs_run_sampler": diff,
            "load": "from flowdistill.integrations.diffusers import FlowDistillPipeline; "
                    "FlowDistillPipeline.from_pretrained(DIR)"}
    (tmp / "flowdistill.json").write_text(json.dumps(meta, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
