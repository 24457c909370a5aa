"""Where ``scripts/bench_quality.py``'s runs come from, their schedules, and their training.

A method's run on a problem comes from ``--config``, else its row's declared ``source`` (a job
config or a recipe stage), else the checkerboard config with ``data.name`` set (the order is in
``bench_quality``'s docstring); ``--steps-scale`` shrinks every schedule; a finished run with the
same config is reused. Imported by ``bench_quality.py`` from this folder.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TOY_PROBLEMS = ("checkerboard", "8gaussians", "spirals")


def log(msg: str) -> None:
    """A progress line on stderr (the table goes to stdout)."""
    print(f"[bench_quality] {msg}", file=sys.stderr, flush=True)


# -- where runs come from -----------------------------------------------------------------------
@dataclass
class Source:
    """A method's run on a problem: a job config (``stage`` empty) or a stage of a recipe."""

    path: Path
    overrides: list[str]
    stage: str = ""


def _is_recipe(path: Path) -> bool:
    from flowdistill.config import read_yaml_file

    return "stages" in read_yaml_file(path)


def _recipe_stage(path: Path, method: str) -> str:
    """The first stage of the recipe at ``path`` whose distiller is ``method`` ('' if none)."""
    from flowdistill.recipes import load_recipe

    for s in load_recipe(path).stages:
        if s.job is not None and s.job.distiller.name == method:
            return s.name
    return ""


def find_source(method: str, source: str, problem: str, explicit: dict[str, Path]) -> Source | None:
    """Where ``method``'s run on ``problem`` comes from (module docstring), or ``None``.

    ``source`` is the row's declared :attr:`~flowdistill.distillers.base.BenchRow.source`: ``""``
    for ``configs/<method>_<problem>.yaml``, ``"recipes/NAME"`` for ``configs/recipes/NAME_<problem>.yaml``.
    """
    if method in explicit:
        p = explicit[method]
        if _is_recipe(p):
            stage = _recipe_stage(p, method)
            return Source(p, [f"common.data.name={problem}"], stage) if stage else None
        return Source(p, [f"data.name={problem}"])
    fallback = [("checkerboard", [problem])] if problem in TOY_PROBLEMS else []  # images need their own
    for name, extra in ((problem, []), *fallback):
        if source.startswith("recipes/"):
            stem, _, named = source.split("/", 1)[1].partition(":")
            recipe = CONFIGS / "recipes" / f"{stem}_{name}.yaml"
            stage = (named or _recipe_stage(recipe, method)) if recipe.is_file() else ""
            if stage:
                return Source(recipe, [f"common.data.name={p}" for p in extra], stage)
        else:
            job = CONFIGS / f"{method}_{name}.yaml"
            if job.is_file():
                return Source(job, [f"data.name={p}" for p in extra])
    return None


def teacher_for(problem: str, runs_dir: Path, scale: float) -> Path:
    """The problem's teacher: the shipped asset, else a run trained from its teacher config."""
    asset = REPO / "assets" / f"{problem}_teacher"
    if (asset / "config.json").is_file() or (asset / "student" / "config.json").is_file():
        return asset
    cfg = CONFIGS / f"teacher_{problem}.yaml"
    over = [f"out_dir={runs_dir / problem / 'teacher'}"]
    if not cfg.is_file():
        cfg, over = CONFIGS / "teacher_checkerboard.yaml", [*over, f"data.name={problem}"]
    over = scale_job(cfg, over, scale, "flow_matching")
    return train_or_reuse(cfg, over, "flow_matching", f"{problem} teacher")


# -- schedules ----------------------------------------------------------------------------------
def _scaled(train: Any, scale: float, prefix: str) -> list[str]:
    steps = max(2, round(train.steps * scale))
    ck = max(1, round(train.ckpt_every * scale)) if train.ckpt_every > 0 else 0
    return [f"{prefix}train.steps={steps}",
            f"{prefix}train.warmup_steps={round(train.warmup_steps * scale)}",
            f"{prefix}train.log_every={max(1, round(train.log_every * scale))}",
            f"{prefix}train.ckpt_every={ck}"]


def _scaled_distiller(dist: Any, steps: int, scale: float, prefix: str) -> list[str]:
    out = []
    if getattr(dist, "correction_warmup", None) is not None:
        out.append(f"{prefix}distiller.correction_warmup={round(dist.correction_warmup * scale)}")
    if getattr(dist, "couple", None) is not None:
        out.append(f"{prefix}distiller.couple.n_pairs={max(256, round(dist.couple.n_pairs * scale))}")
    if getattr(dist, "finetune_after", 0) > 0:
        ft = min(steps - 1, max(1, round(dist.finetune_after * scale)))
        out.append(f"{prefix}distiller.finetune_after={ft}")
    return out


def scale_job(path: Path, overrides: list[str], scale: float, distiller: str) -> list[str]:
    """``overrides`` plus the job's schedule shrunk by ``scale`` (1: unchanged)."""
    from flowdistill.config import load_config

    if scale == 1.0:
        return list(overrides)
    cfg = load_config(path, overrides, default_distiller=distiller)
    return [*overrides, *_scaled(cfg.train, scale, ""),
            *_scaled_distiller(cfg.distiller, max(2, round(cfg.train.steps * scale)), scale, "")]


def scale_recipe(path: Path, overrides: list[str], scale: float) -> list[str]:
    """``overrides`` plus every stage's schedule and coupling count shrunk by ``scale``."""
    from flowdistill.recipes import load_recipe

    if scale == 1.0:
        return list(overrides)
    out = list(overrides)
    for s in load_recipe(path, overrides).stages:
        if s.job is not None:
            pre = f"stages.{s.name}."
            out += [*_scaled(s.job.train, scale, pre),
                    *_scaled_distiller(s.job.distiller, max(2, round(s.job.train.steps * scale)), scale, pre)]
    return out


# -- training -----------------------------------------------------------------------------------
def train_or_reuse(path: Path, overrides: list[str], distiller: str, label: str) -> Path:
    """Train the job ``path`` + ``overrides`` unless its run dir holds the same finished run."""
    from flowdistill.api import train
    from flowdistill.config import load_config
    from flowdistill.errors import ConfigError
    from flowdistill.recipes.runner import is_finished

    cfg = load_config(path, overrides, default_distiller=distiller)
    try:
        if is_finished(cfg):
            log(f"{label}: reusing {cfg.out_dir}")
            return Path(cfg.out_dir)
    except ConfigError:
        log(f"{label}: {cfg.out_dir} holds a run with another config; training it again")
    t0 = time.perf_counter()
    log(f"{label}: training {cfg.train.steps} steps in {cfg.out_dir}")
    train(cfg, overwrite=True)
    log(f"{label}: done in {time.perf_counter() - t0:.0f} s")
    return Path(cfg.out_dir)


def slug(text: str) -> str:
    """A directory-safe name for a row label."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "row"


def run_row(method: str, overrides: tuple[str, ...], src: Source, problem: str, teacher: Path,
            runs_dir: Path, scale: float) -> Path:
    """Train (or reuse) ``method``'s run for one row (its ``overrides`` on top of the source)."""
    from flowdistill.recipes import load_recipe, run_recipe

    name = method if not overrides else f"{method}-{slug('-'.join(overrides))}"
    if not src.stage:
        over = [*src.overrides, f"out_dir={runs_dir / problem / name}", f"teacher={teacher}",
                f"distiller.name={method}", *overrides]
        return train_or_reuse(src.path, scale_job(src.path, over, scale, method), method, f"{problem} {name}")
    base = runs_dir / problem / src.path.stem
    over = [*src.overrides, f"out_dir={base if not overrides else runs_dir / problem / name}"]
    if "teacher" in _recipe_vars(src.path):
        over.append(f"vars.teacher={teacher}")
    over += [f"stages.{src.stage}.{o}" for o in overrides]
    if overrides:  # an ablation shares the base run's coupling store (same generation settings)
        stage = load_recipe(src.path, over).stage(src.stage)
        if getattr(stage.job.distiller, "couplings", None):
            over.append(f"stages.{src.stage}.distiller.couplings={base / src.stage / 'couplings'}")
    over = scale_recipe(src.path, over, scale)
    names = [s.name for s in load_recipe(src.path, over).stages]
    t0 = time.perf_counter()
    log(f"{problem} {name}: recipe {src.path.name} up to stage {src.stage} (finished stages are skipped)")
    runs = run_recipe(src.path, over, report=False, only=names[: names.index(src.stage) + 1])
    log(f"{problem} {name}: done in {time.perf_counter() - t0:.0f} s")
    return runs[src.stage]


def _recipe_vars(path: Path) -> dict[str, Any]:
    from flowdistill.config import read_yaml_file

    return dict(read_yaml_file(path).get("vars") or {})
