"""Export a trained run as a :class:`FlowDistillPipeline` directory (``flowdistill export``).

The pipeline samples as the run's own sampler does: a two-time (flow-map) student jumps edge to
edge on the run's ``sample_grid``; a one-time (velocity) student takes Euler steps on it. Grids map
to the scheduler's time shift: ``uniform`` → ``shift = 1``; ``shifted`` → the shift of
:func:`flowdistill.core.timesteps.shifted_grid`. A method whose sampler uses other times says so
through :meth:`~flowdistill.distillers.base.Distiller.scheduler_config`, whose keys become the
scheduler's config (TSCD / PCM / LCM: ``segment_steps`` — the segment edges of the teacher grid —
its ``shift`` and the sampler's default TCD ``gamma``; see
:mod:`flowdistill.integrations.diffusers.scheduler`). A velocity run sampled with another solver than
Euler exports with a warning (the pipeline is Euler). Every export checks itself: it samples 8
seeded points at NFE 1 and 2 with the pipeline and with the run's sampler, warns if they differ by
more than 1e-4, and records the difference in ``flowdistill.json``.

The export directory also holds a model card ``README.md`` (method, teacher with the sha256 of its
weights, dataset, training steps, the NFEs to sample at, a usage snippet) and ``pipeline.py``, a
two-line module that re-exports :class:`FlowDistillPipeline`. Loading (flowdistill installed):

- ``FlowDistillPipeline.from_pretrained(DIR)``;
- ``DiffusionPipeline.from_pretrained(DIR)`` once ``flowdistill.integrations.diffusers`` is imported
  (it registers ``FlowDistillPipeline`` in the ``diffusers`` namespace, where diffusers looks up
  ``model_index.json``'s ``_class_name``);
- ``DiffusionPipeline.from_pretrained(DIR, custom_pipeline="pipeline", trust_remote_code=True)``
  without importing flowdistill first (diffusers runs the directory's ``pipeline.py``, and diffusers
  ≥ 0.35 loads local pipeline code only with ``trust_remote_code=True``). Works offline.
"""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path

from flowdistill.atomic import atomic_dir
from flowdistill.errors import ConfigError, FlowDistillError, RunDirError

GRIDS = ("uniform", "shifted")

#: ``pipeline.py`` written into every export: diffusers' ``custom_pipeline`` loader imports it.
PIPELINE_SHIM = '''"""FlowDistillPipeline for ``DiffusionPipeline.from_pretrained(DIR,
custom_pipeline="pipeline", trust_remote_code=True)``: the class lives in the installed flowdistill
package (pip install flowdistill)."""

from flowdistill.integrations.diffusers.pipeline import FlowDistillPipeline

__all__ = ["FlowDistillPipeline"]
'''


def _grid_shift(distiller_cfg) -> float:
    from flowdistill.core.timesteps import shifted_grid

    grid = getattr(distiller_cfg, "sample_grid", "uniform")
    if grid == "uniform":
        return 1.0
    if grid == "shifted":  # the distillers' samplers build the grid with shifted_grid's own shift
        return float(inspect.signature(shifted_grid).parameters["shift"].default)
    raise ConfigError(f"cannot export sample_grid {grid!r} to FlowDistillScheduler; supported grids: "
                      f"{', '.join(GRIDS)}")


def scheduler_kwargs(run) -> dict:
    """The ``FlowDistillScheduler`` config of a run: the distiller's
    :meth:`~flowdistill.distillers.base.Distiller.scheduler_config`, else ``shift`` from its
    ``sample_grid``."""
    own = run.distiller.scheduler_config()
    return dict(own) if own is not None else {"shift": _grid_shift(run.cfg.distiller)}


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
    scheduler = FlowDistillScheduler(**scheduler_kwargs(run))
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
    meta = {"run_dir": str(Path(run_dir).resolve()), "distiller": run.cfg.distiller.name,
            "sample_grid": getattr(run.cfg.distiller, "sample_grid", "uniform"),
            "two_time": bool(run.student.config.get("two_time", False)),
            "scheduler": scheduler_kwargs(run),
            "max_abs_diff_vs_run_sampler": diff,
            "load": "from flowdistill.integrations.diffusers import FlowDistillPipeline; "
                    "FlowDistillPipeline.from_pretrained(DIR)"}
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / "flowdistill.json").write_text(json.dumps(meta, indent=2))
        (tmp / "pipeline.py").write_text(PIPELINE_SHIM)
        (tmp / "README.md").write_text(model_card(run, out.name, diff))
    return out


def _teacher_info(teacher: str, run_dir: Path) -> tuple[str, str | None]:
    """The teacher as the run's config names it (resolved against the run's parent when relative and
    not found from here) and the sha256 of its weights file, when it can still be read."""
    from flowdistill.data.couplings import file_sha256

    if not teacher:
        return "", None
    path = Path(teacher)
    candidates = [path] if path.is_absolute() else [path, run_dir.parent / path]
    for cand in candidates:
        for d in (cand / "student", cand):
            weights = d / "diffusion_pytorch_model.safetensors"
            if weights.is_file():
                return str(d.resolve()), file_sha256(weights)
    return teacher, None


def recommended_nfe(run) -> tuple[tuple[int, ...], int]:
    """The NFEs the run's method is evaluated at (``Distiller.eval_nfe``) and the one to sample with:
    the fewest for a distilled student, the most for a teacher trained without one."""
    from flowdistill.distillers import DISTILLERS

    cls = DISTILLERS.get(run.cfg.distiller.name)
    nfes = tuple(int(n) for n in cls.eval_nfe)
    return nfes, (min(nfes) if cls.needs_teacher else max(nfes))


def model_card(run, name: str, diff: float | None = None) -> str:
    """The export's ``README.md``: what was distilled, from which teacher, on what data, for how
    many steps, at which NFE it samples, and how to load it."""
    from flowdistill.runs import read_meta

    cfg = run.cfg
    meta = read_meta(Path(run.run_dir) / "student")
    steps = meta.get("steps", cfg.train.steps)
    nfes, rec = recommended_nfe(run)
    teacher, sha = _teacher_info(cfg.teacher, Path(run.run_dir))
    two_time = bool(run.student.config.get("two_time", False))
    kind = ("a two-time flow map u(x, t, s) (jumps)" if two_time
            else "a one-time velocity field v(x, t) (Euler steps)")
    if teacher:
        found = f" (weights sha256 `{sha}`)" if sha else " (weights not found at export)"
        teacher_line = f"`{teacher}`{found}"
    else:
        teacher_line = "none (trained from data)"
    cond = int(run.student.config.get("num_classes", 0) or 0)
    labels = ", class_labels=[3] * 16" if cond else ""
    call = (f"pipe(batch_size=16, num_inference_steps={rec}, "
            f"generator=torch.Generator().manual_seed(0){labels})")
    data = f"`{cfg.data.name}`" + (f" (class-conditional, {cond} classes)" if cond else "")
    train = f"{steps} (batch {cfg.train.batch_size}, lr {cfg.train.lr:g}, EMA {cfg.train.ema_decay:g})"
    sampling = (f"NFE {', '.join(map(str, nfes))} (the method's evaluation budgets); "
                f"recommended `num_inference_steps={rec}`")
    sched = scheduler_kwargs(run)
    if sched.get("segment_steps"):
        grid = (f"segment edges of the teacher's {sched['segment_steps']}-step grid (scheduler "
                f"`segment_steps={sched['segment_steps']}`, shift {sched.get('shift', 1.0):g}, "
                f"TCD gamma {sched.get('gamma', 0.0):g})")
    else:
        grid = (f"`{getattr(cfg.distiller, 'sample_grid', 'uniform')}` "
                f"(scheduler shift {sched.get('shift', 1.0):g})")
    check = "not checked" if diff is None else f"max abs diff to the run's sampler {diff:.3g} (NFE 1, 2)"
    return f"""---
library_name: diffusers
tags: [flowdistill, flow-matching, distillation, {cfg.distiller.name}]
---

# {name}

The `{type(run.student).__name__}` net of a flowdistill run, exported (`flowdistill export`) as a
diffusers `FlowDistillPipeline`; the network is {kind}.

| | |
|---|---|
| method (distiller) | `{cfg.distiller.name}` |
| teacher | {teacher_line} |
| dataset | {data} |
| training steps | {train} |
| sampling | {sampling} |
| time grid | {grid} |
| run | `{Path(run.run_dir).resolve()}` |
| export self-check | {check} |

Time is the noise level (t = 1 noise, t = 0 data); each step maps x_t to x_s with
x_s = x_t + (s − t)·u. The scheduler config and the student's `config.json` hold the rest.

## Usage

Needs `pip install flowdistill` (the student and pipeline classes live there); works offline.

```python
import torch
import flowdistill.integrations.diffusers  # registers FlowDistillPipeline with diffusers
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{name}")
x = {call}.images
```

Without importing flowdistill first: `DiffusionPipeline.from_pretrained("{name}",
custom_pipeline="pipeline", trust_remote_code=True)` (runs this directory's `pipeline.py`, which
imports the class from flowdistill). `flowdistill.integrations.diffusers.FlowDistillPipeline
.from_pretrained("{name}")` works as well.
"""


# -------------------------------------------------------------------------- diffusers pipeline runs


def _cache_condition(cfg, k: int):
    """``k`` prompts' embeddings from the run's prompt (or latent) cache ``data.root``, or ``None`` when
    the cache is not readable here (the export's self-check is then skipped)."""
    import torch

    try:
        from flowdistill.integrations.diffusers.prompt_cache import LatentStore, PromptEmbeddingStore

        store = (LatentStore if cfg.data.name == "latents" else PromptEmbeddingStore)(str(cfg.data.root))
        idx = torch.arange(min(k, len(store)))
        got = store.get_many(idx)
        return {key: got[key] for key in ("prompt_embeds", "pooled_prompt_embeds") if key in got}
    except (OSError, ValueError, KeyError, ImportError, FlowDistillError):
        return None


def verify_pipeline_run(run_dir: str | Path, student_dir: str | Path, nfes: tuple[int, ...] = (1, 2),
                        k: int = 2, seed: int = 0) -> tuple[float, float, str] | None:
    """``(max |pipeline − run sampler|, max |latent|, dtype)`` over ``nfes`` for ``k`` cached prompts:
    the original pipeline class with ``student_dir`` applied (:func:`~.render.load_student_pipeline`)
    against ``load_run(run_dir).sample`` on the same noise and embeddings, in the run's dtype.
    ``None`` when the run's prompt cache cannot be read here."""
    from flowdistill.api import load_run
    from flowdistill.integrations.diffusers import render

    run = load_run(run_dir)
    cond = _cache_condition(run.cfg, k)
    if cond is None:
        return None
    n = next(iter(cond.values())).shape[0]
    sdir = Path(student_dir)
    pipe = render.load_student_pipeline(render.read_student_meta(sdir)["pipeline"], sdir,
                                        dtype=next(run.student.parameters()).dtype)
    guidance = render.run_guidance(pipe, sdir)
    worst, scale = 0.0, 0.0
    for nfe in nfes:
        want = run.sample(n, nfe, seed=seed, cond=cond)
        noise = render.draw_noise(tuple(want.shape[1:]), n, seed)  # = load_run's own seeded draw
        out = render.generate(pipe, nfe, noise, embeds=cond, guidance=guidance)
        worst = max(worst, (out.float() - want.float()).abs().max().item())
        scale = max(scale, want.float().abs().max().item())
    return worst, scale, str(render.denoiser(pipe).dtype).removeprefix("torch.")


#: relative tolerance of the export's self-check: float32 agrees to round-off; 16-bit weights and
#: states (the pipeline keeps its latents in the weights' dtype between steps) to their precision
CHECK_TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2, "float16": 5e-3}


def export_pipeline_run(run_dir: str | Path, out_dir: str | Path, overwrite: bool = False,
                        check: bool = True) -> Path:
    """Export a diffusers pipeline run (``teacher: {diffusers: ...}``) for the original pipeline class.

    ``out_dir`` gets the LoRA weights ``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights(
    out_dir)``; a full student: its ``transformer/`` or ``unet/``), ``scheduler_config.json`` (the
    ``FlowDistillScheduler`` — for a DDPM-UNet pipeline the ``FlowDistillVPScheduler`` — to swap in),
    a two-time student's ``second_time.safetensors``, ``flowdistill.json`` and a model card
    ``README.md`` that says how to swap it all in. With ``check`` the export samples the run's first
    two cached prompts at NFE 1 and 2 through the pipeline and through the run's own sampler, records
    the difference and warns above :data:`CHECK_TOLERANCE` (relative to the latents' scale, by dtype).
    """
    import shutil

    from flowdistill.integrations.diffusers import render

    src = render.student_dir_of(run_dir)
    if src is None:
        raise RunDirError(f"{run_dir} is not a diffusers pipeline run (no student/flowdistill.json)")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RunDirError(f"{out} is not empty; pass --overwrite to replace it")
    meta = render.read_student_meta(src)
    if not Path(str(meta.get("pipeline", ""))).is_dir():
        raise RunDirError(f"the teacher pipeline {meta.get('pipeline')} of {run_dir} is not a directory here")
    from diffusers import DiffusionPipeline

    base = DiffusionPipeline.load_config(str(meta["pipeline"]), local_files_only=True)
    pipe_cls = str(base.get("_class_name", meta.get("pipeline_class", "")))
    kind = render.PIPELINE_KINDS.get(pipe_cls)
    if kind is None:
        raise ConfigError(f"pipeline class {pipe_cls} of {meta['pipeline']}: export supports "
                          f"{', '.join(sorted(render.PIPELINE_KINDS))}")
    pipe = render.load_student_pipeline(meta["pipeline"], src)
    guidance = render.run_guidance(pipe, src)
    checked = verify_pipeline_run(run_dir, src) if check else None
    diff = None if checked is None else checked[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        for f in sorted(src.iterdir()):
            if f.name in ("flowdistill.json", "scheduler_config.json", "README.md"):
                continue
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        pipe.scheduler.save_config(str(tmp))
        info = {**meta, "pipeline": str(Path(meta["pipeline"]).resolve()), "pipeline_class": pipe_cls,
                "scheduler_class": type(pipe.scheduler).__name__,
                "pipeline_kwargs": guidance, "image_size": list(render.run_image_size(pipe, src)),
                "run_dir": str(Path(run_dir).resolve()),
                "max_abs_diff_vs_run_sampler": diff,
                "latent_scale": None if checked is None else checked[1]}
        (tmp / "flowdistill.json").write_text(json.dumps(info, indent=2))
        (tmp / "README.md").write_text(pipeline_model_card(info, out.name, diff))
    if check and diff is None:
        warnings.warn(f"export of {run_dir}: the run's prompt cache is not readable here, so the pipeline "
                      f"was not checked against the run's sampler", stacklevel=2)
    elif checked is not None and diff > CHECK_TOLERANCE.get(checked[2], 1e-5) * max(1.0, checked[1]):
        warnings.warn(f"the exported student in {pipe_cls} differs from the run's own sampler by {diff:.3g} "
                      f"(latents up to {checked[1]:.3g}, {checked[2]}; NFE 1, 2)", stacklevel=2)
    return out


def pipeline_model_card(info: dict, name: str, diff: float | None) -> str:
    """The model card of a pipeline-run export: what was distilled and the exact swap-in code."""
    sched_cls = info.get("scheduler_class", "FlowDistillScheduler")
    sched_mod = "vp_scheduler" if sched_cls == "FlowDistillVPScheduler" else "scheduler"
    two_time = bool(info.get("two_time"))
    lora = info.get("student", "diffusers_lora") == "diffusers_lora"
    call = dict(info.get("pipeline_kwargs") or {})
    if info.get("image_size"):  # the size the student was distilled at
        call["height"], call["width"] = (int(v) for v in info["image_size"])
    kw = ", ".join(f"{k}={v!r}" for k, v in call.items())
    sub = info.get("subfolder", "transformer")
    load = (f'pipe.load_lora_weights("{name}")' if lora else
            f'pipe.register_modules({sub}=type(pipe.{sub}).from_pretrained("{name}/{sub}"))')
    extra = ""
    if two_time:
        extra = (f'\nload_second_time(pipe.{sub}, "{name}")  '
                 f"# the student's second time embedding\nfollow_scheduler_time(pipe)  "
                 f"# each step tells the denoiser its target time s\n")
    imports = f"from flowdistill.integrations.diffusers.{sched_mod} import {sched_cls}\n"
    if two_time:
        imports += ("from flowdistill.integrations.diffusers.render import follow_scheduler_time\n"
                    "from flowdistill.integrations.diffusers.two_time import load_second_time\n")
    check = ("not checked" if diff is None
             else f"max abs diff of the latents to the run's sampler {diff:.3g} (NFE 1, 2)")
    steps = (info.get("scheduler") or {})
    return f"""---
library_name: diffusers
tags: [flowdistill, distillation, lora, {info.get('distiller', '')}]
---

# {name}

A few-step student of `{info.get('pipeline')}` (`{info.get('pipeline_class')}`), distilled by flowdistill
(`{info.get('distiller')}`, {info.get('steps', '?')} training steps, student `{info.get('student')}`,
{'two-time flow map u(x, t, s)' if two_time else 'one-time velocity'}). Sample it with the original
pipeline class, its LoRA weights and the `{sched_cls}` swapped in (config: `{steps}`).

| | |
|---|---|
| teacher pipeline | `{info.get('pipeline')}` |
| method | `{info.get('distiller')}` |
| scheduler | `{sched_cls}` (`scheduler_config.json`) |
| pipeline arguments | `{kw or 'none'}` |
| export self-check | {check} |

## Usage

```python
import torch
from diffusers import {info.get('pipeline_class')}
{imports}
pipe = {info.get('pipeline_class')}.from_pretrained("{info.get('pipeline')}")
{load}
pipe.scheduler = {sched_cls}.from_pretrained("{name}")
{extra}image = pipe("a photo of a cat", num_inference_steps=4{', ' + kw if kw else ''}).images[0]
```

Each step maps the latent at noise level t to s with x_s = x_t + (s − t)·u (time = noise level,
t = 1 noise, t = 0 data); no classifier-free guidance at sampling (it is distilled into the
student). Or from the command line: `flowdistill sample {name} --prompt "a photo of a cat" --nfe 1,2,4
--out samples/`.
"""
