"""Running a recipe stage by stage, resumably.

Each stage runs in ``OUT_DIR/NAME`` and its resolved job config is written beside it
(``OUT_DIR/NAME.yaml``: the same file ``flowdistill distill`` / ``couple`` take, so any stage can be
rerun by hand). Rerunning a recipe resumes it: a finished stage is skipped (its exported student
has the stage's step count and its saved config equals the stage's), an interrupted one continues
from its newest checkpoint, a coupling store is re-verified and kept, finished or not. A stage
whose config changed after it ran is a one-line error naming the key (remove its directory to
redo it). ``OUT_DIR/timings.json`` keeps the wall seconds of every coupling and training step that
did work (``NAME/couple``, ``NAME/train``, ``NAME/encode``); ``OUT_DIR/recipe.yaml`` the recipe as run
(with overrides). An encode stage writes (or resumes, or re-verifies) its latent cache; every
process encodes its own shards (rank ``r`` of ``w``: shards ``r, r + w, …``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from accelerate import PartialState
from omegaconf import OmegaConf

from flowdistill.api import train
from flowdistill.atomic import atomic_write_text
from flowdistill.config import JobConfig, to_yaml
from flowdistill.data.couplings import MANIFEST, read_manifest
from flowdistill.recipes.spec import Recipe, Stage, load_recipe
from flowdistill.runs import check_output_dir, check_run_dir, holds_run, read_meta


def record_time(timings: Path, key: str, seconds: float) -> None:
    """Add ``key: seconds`` to the JSON file ``timings``."""
    d = json.loads(timings.read_text()) if timings.is_file() else {}
    d[key] = round(seconds, 1)
    atomic_write_text(timings, json.dumps(d, indent=2) + "\n")


def is_finished(cfg: JobConfig) -> bool:
    """Whether the run of ``cfg`` is done: its student was exported after ``train.steps`` steps of
    the same distiller, and its saved config equals ``cfg`` (else a ConfigError names the key)."""
    run_dir = Path(cfg.out_dir)
    if not holds_run(run_dir):
        return False
    check_run_dir(run_dir, to_yaml(cfg), resume=True, overwrite=False)  # a changed config: one line
    meta = read_meta(run_dir / "student") if (run_dir / "student").is_dir() else {}
    return meta.get("steps") == cfg.train.steps and meta.get("distiller") == cfg.distiller.name


def _couplings_complete(cfg: JobConfig) -> bool:
    store = Path(cfg.distiller.couplings)
    if not (store / MANIFEST).is_file():
        return False
    man = read_manifest(store)
    return bool(man.get("complete")) and man.get("n_pairs") == cfg.distiller.couple.n_pairs


def _couple(cfg: JobConfig, stage: Stage, timings: Path, progress: bool) -> None:
    """Generate (or resume, or re-verify) the coupling store of ``cfg``."""
    from flowdistill.api import couple

    done = _couplings_complete(cfg)
    exists = (Path(cfg.distiller.couplings) / MANIFEST).is_file()
    t0 = time.perf_counter()
    couple(cfg, resume=exists, progress=progress)
    if not done and PartialState().is_main_process:
        record_time(timings, f"{stage.name}/couple", time.perf_counter() - t0)


def run_stage(stage: Stage, timings: Path, progress: bool = True) -> Path:
    """Run one train/distill/couple stage (skipping or resuming what is done); its run directory."""
    cfg = stage.job
    assert cfg is not None
    if stage.kind == "couple" or getattr(cfg.distiller, "couple", None) is not None:
        _couple(cfg, stage, timings, progress)
    if stage.kind == "couple" or is_finished(cfg):
        return stage.run_dir
    t0 = time.perf_counter()
    train(cfg, resume=holds_run(stage.run_dir))
    if PartialState().is_main_process:
        record_time(timings, f"{stage.name}/train", time.perf_counter() - t0)
    return stage.run_dir


def run_encode(stage: Stage, timings: Path, progress: bool = True) -> Path:
    """Run an encode stage: load its tokenizer (a one-line ConfigError when the path holds none),
    then write, resume or re-verify the latent cache of its dataset; returns the cache directory."""
    from flowdistill.data.couplings import MANIFEST as CACHE_MANIFEST
    from flowdistill.data.latent_cache import LatentCache, encode_dataset
    from flowdistill.data.registry import build_dataset
    from flowdistill.data.tensor_cache import TensorCacheError
    from flowdistill.errors import ConfigError
    from flowdistill.models.latent_codec import load_tokenizer

    opts = stage.encode
    tok = load_tokenizer(opts["tokenizer"], f"recipe stage '{stage.name}': tokenizer")
    source = build_dataset(opts["data"], opts["split"])
    root = stage.run_dir
    exists = (root / CACHE_MANIFEST).is_file()
    done = exists and _complete(root)
    state = PartialState()
    t0 = time.perf_counter()
    try:
        encode_dataset(tok, source, root, data=opts["data"], tokenizer_path=str(opts["tokenizer"]),
                       mode=opts["mode"], seed=int(opts["seed"]), batch_size=int(opts["batch_size"]),
                       shard_size=int(opts["shard_size"]), rank=state.process_index,
                       world=state.num_processes, resume=exists, progress=progress)
    except TensorCacheError as e:
        raise ConfigError(f"recipe stage '{stage.name}': {e} (remove {root} to redo it)") from None
    if not done and state.is_main_process:
        record_time(timings, f"{stage.name}/encode", time.perf_counter() - t0)
    LatentCache(root)  # complete and readable
    return root


def _complete(root: Path) -> bool:
    """Whether the cache at ``root`` is marked complete."""
    from flowdistill.data.couplings import MANIFEST as CACHE_MANIFEST

    return bool(json.loads((root / CACHE_MANIFEST).read_text()).get("complete"))


def run_recipe(path: str | Path, overrides: list[str] | None = None, report: bool = True,
               progress: bool = True, only: list[str] | None = None) -> dict[str, Path]:
    """Run the recipe at ``path`` (with ``key=value`` overrides); returns ``{stage: run directory}``.

    Every stage is checked before the first one runs. ``report=False`` skips report stages;
    ``only`` runs the named stages alone (their inputs must exist).
    """
    recipe = load_recipe(path, overrides)
    check_output_dir(recipe.out_dir, "recipe out_dir")
    main = PartialState().is_main_process
    if main:
        recipe.out_dir.mkdir(parents=True, exist_ok=True)
        raw = OmegaConf.to_container(OmegaConf.create(_as_record(recipe)))
        atomic_write_text(recipe.out_dir / "recipe.yaml", OmegaConf.to_yaml(raw))
    timings = recipe.out_dir / "timings.json"
    out: dict[str, Path] = {}
    for stage in recipe.stages:
        if only and stage.name not in only:
            continue
        if stage.kind == "report":
            if report and main:
                from flowdistill.recipes.report import write_report

                write_report(stage, recipe.out_dir, timings)
            continue
        if stage.kind == "encode":
            out[stage.name] = run_encode(stage, timings, progress)
            continue
        if main:
            atomic_write_text(recipe.out_dir / f"{stage.name}.yaml", to_yaml(stage.job))
        out[stage.name] = run_stage(stage, timings, progress)
    return out


def _as_record(recipe: Recipe) -> dict[str, Any]:
    """The recipe as run: every stage's kind and resolved job (or report spec)."""
    stages = []
    for s in recipe.stages:
        entry: dict[str, Any] = {"name": s.name, "kind": s.kind}
        if s.job is not None:
            entry["job"] = OmegaConf.to_container(OmegaConf.create(to_yaml(s.job)))
        elif s.kind == "encode":
            entry.update({k: v for k, v in s.encode.items() if k != "data"}, out=str(s.run_dir),
                         data=OmegaConf.to_container(OmegaConf.structured(s.encode["data"])))
        else:
            entry.update(s.report)
        stages.append(entry)
    return {"out_dir": str(recipe.out_dir), "stages": stages}
