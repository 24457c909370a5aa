"""``flowdistill`` command line: thin over :mod:`flowdistill.api`.

Every user error (a config file that is missing, binary or not YAML, an unknown key or name, a
teacher of another architecture, an output directory that is a file, lies under one or cannot be
written, a missing or corrupt checkpoint, an existing run, a diverged loss, a value a solver cannot
take, a ``--plugin`` that fails to import) prints one line ``error: ...`` and exits with status 2;
nothing that existed before is changed. ``FLOWDISTILL_TRACEBACK=1`` re-raises a ``ValueError`` or
``OSError`` with its traceback.

Flags may stand anywhere among the ``key=value`` overrides (``distill CFG a=1 --resume b=2``).
``--plugin MODULE`` (every sub-command, repeatable; :mod:`flowdistill.plugins`) imports a module
by name or a ``.py`` file by path before the config is read, so the datasets, models and
distillers it registers can be named in the config; configs themselves never import anything.

``config show CONFIG [key=value ...]`` prints the config a job would run (every default filled
in). ``sample`` and ``eval`` take a run directory or a saved model directory (``load_run``);
``eval`` settings not given as flags come from the run's ``eval:`` section, and an NFE the solver
cannot spend exactly is skipped with a note. ``--class N`` / ``--labels A,B`` condition a
class-conditional run. ``--help`` of every command shows each option's default.

The handlers of diffusers pipeline runs (their ``sample`` / ``eval`` / ``export``, and ``embed``)
live in :mod:`flowdistill.cli_pipeline`; the parser (``build_parser``, ``parse_args``) lives in
:mod:`flowdistill.cli_parser`; this module is the built-in commands and ``main``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from flowdistill.cli_parser import DESCRIPTION, build_parser, package_version, parse_args
from flowdistill.cli_pipeline import (
    cmd_embed,
    cmd_eval_pipeline,
    cmd_export_pipeline,
    cmd_sample_pipeline,
    pipeline_student,
)
from flowdistill.cli_stream import cmd_stream
from flowdistill.core.registry import UnknownNameError
from flowdistill.errors import FlowDistillError
from flowdistill.plugins import load_plugins

__all__ = ["DESCRIPTION", "build_parser", "main", "package_version", "parse_args"]


def _is_main_process() -> bool:
    """True in the main process of a multi-process launch (and in a single process)."""
    from accelerate import PartialState

    return bool(PartialState().is_main_process)


def _cmd_train(args: argparse.Namespace, default_distiller: str) -> None:
    from flowdistill.api import train
    from flowdistill.config import load_config

    if args.config is not None and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides, args.config = [args.config, *args.overrides], None
    cfg = load_config(args.config, args.overrides, default_distiller=default_distiller)
    if default_distiller == "flow_matching" and cfg.distiller.name != "flow_matching":
        raise FlowDistillError("train-teacher trains flow_matching; use `flowdistill distill` for "
                               f"distiller {cfg.distiller.name!r}")
    run_dir = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if _is_main_process():  # one line per launch, not one per process
        print(f"run written to {run_dir}")


def _cmd_couple(args: argparse.Namespace) -> None:
    from flowdistill.api import couple
    from flowdistill.config import load_config

    if args.config is not None and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides, args.config = [args.config, *args.overrides], None
    cfg = load_config(args.config, args.overrides, default_distiller="reflow")
    if getattr(cfg.distiller, "couplings", None):
        from flowdistill.runs import check_output_dir

        check_output_dir(cfg.distiller.couplings, "distiller.couplings")
    root = couple(cfg, resume=args.resume, overwrite=args.overwrite)
    if _is_main_process():
        print(f"couplings written to {root}")


#: Placeholder for a missing ``out_dir`` while ``config show`` resolves a config.
_UNSET_OUT_DIR = "__flowdistill_unset_out_dir__"


def _cmd_config_show(args: argparse.Namespace) -> None:
    """Print the resolved config (file + overrides + every default) as YAML."""
    from flowdistill.config import load_config, read_yaml_file, to_yaml

    if args.config is not None and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides, args.config = [args.config, *args.overrides], None
    raw = read_yaml_file(args.config) if args.config is not None else {}
    has_out = any(o.split("=", 1)[0].strip() == "out_dir" for o in args.overrides) or \
        (hasattr(raw, "get") and raw.get("out_dir", None) not in (None, "???"))
    extra = [] if has_out else [f"out_dir={_UNSET_OUT_DIR}"]  # shown as ??? (required to train)
    cfg = load_config(args.config, [*extra, *args.overrides], default_distiller="flow_matching")
    text = to_yaml(cfg)
    if not has_out:
        text = text.replace(f"out_dir: {_UNSET_OUT_DIR}", "out_dir: ???  # required: out_dir=DIR")
    print(text, end="" if text.endswith("\n") else "\n")


def _save_image(x, path: Path) -> None:
    """One image ``[C, H, W]`` in [-1, 1] (C = 1 or 3) as a PNG at its own resolution."""
    import numpy as np
    import torch
    from PIL import Image

    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    arr = arr.permute(1, 2, 0).numpy()
    Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else np.ascontiguousarray(arr)).save(path)


def _grid(x, path: Path) -> None:
    """All of ``x`` ``[N, C, H, W]`` tiled into one PNG (pixels enlarged up to 4x, the grid kept
    near 2048 px wide)."""
    import math

    from flowdistill.eval.plots import image_grid

    ncol = max(1, math.ceil(math.sqrt(x.shape[0])))
    scale = max(1, min(4, 2048 // (ncol * (x.shape[-1] + 1))))
    image_grid(x, path, nrow=ncol, scale=scale)


def _cmd_sample(args: argparse.Namespace) -> None:
    """Sample a run (or a saved model directory) and write the samples (see ``sample --help``)."""
    import re

    student_dir = pipeline_student(args.run_dir)
    if student_dir is not None:
        return cmd_sample_pipeline(args, student_dir)
    if args.prompt or args.prompts:
        raise FlowDistillError("--prompt / --prompts are for diffusers pipeline runs "
                               "(teacher: {diffusers: ...})")
    if args.nfe is not None and len(args.nfe) > 1:
        given = ",".join(map(str, args.nfe))
        raise FlowDistillError(f"--nfe takes one value for a built-in run, got {given} "
                               f"(`flowdistill eval` sweeps several)")
    args.nfe = args.nfe[0] if args.nfe else 1
    args.out = args.out or "samples.png"

    from flowdistill.api import load_run
    from flowdistill.data.registry import sample_shape_of
    from flowdistill.eval.plots import scatter_grid
    from flowdistill.eval.run_eval import class_labels_for
    from flowdistill.runs import check_output_dir

    out = Path(args.out)
    to_dir = out.suffix == "" or (out.is_dir() and out.suffix not in (".png", ".safetensors"))
    if not to_dir and out.suffix not in (".png", ".safetensors"):
        raise FlowDistillError(f"--out must end in .png or .safetensors, or be a directory (no suffix), "
                               f"got {out.name}")
    if to_dir:
        check_output_dir(out, "--out")
    else:
        if out.is_dir():
            raise FlowDistillError(f"--out {out} is a directory; give a file name ending in {out.suffix}")
        check_output_dir(out.parent, "--out directory")
    run = load_run(args.run_dir)
    shape = tuple(sample_shape_of(run.cfg.data))
    image = len(shape) == 3
    if image and (to_dir or out.suffix == ".png") and shape[0] not in (1, 3):
        raise FlowDistillError(f"samples of shape {list(shape)} ({shape[0]} channels) cannot be written as "
                               f"PNG images; use --out FILE.safetensors")
    n = args.n if args.n is not None else (64 if image else 2000)
    cond = class_labels_for(run, args.labels, n)
    x = run.sample(n, args.nfe, seed=args.seed, cond=cond, solver=args.solver)
    title = f"NFE {args.nfe}" + (f", class {args.labels[0]}" if args.labels and len(args.labels) == 1 else "")
    if to_dir:
        out.mkdir(parents=True, exist_ok=True)
        if image:
            for old in out.iterdir():  # an earlier, larger --n must not leave extra samples behind
                if re.fullmatch(r"sample_\d+\.png", old.name) and old.is_file():
                    old.unlink()
            width = max(5, len(str(n - 1)))
            for i in range(n):
                _save_image(x[i], out / f"sample_{i:0{width}d}.png")
            _grid(x, out / "grid.png")
            written = f"{out} ({n} PNGs sample_*.png and grid.png)"
        else:
            from safetensors.torch import save_file

            save_file({"samples": x.contiguous()}, str(out / "samples.safetensors"))
            scatter_grid({title: x}, out / "scatter.png")
            written = f"{out} (samples.safetensors and scatter.png)"
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".png":
            if image:
                _grid(x, out)
            else:
                scatter_grid({title: x}, out)
        else:
            from safetensors.torch import save_file

            save_file({"samples": x.contiguous()}, str(out))
        written = str(out)
    print(f"{x.shape[0]} samples at NFE {args.nfe} written to {written}")


def _cmd_eval(args: argparse.Namespace) -> None:
    """NFE sweep of a run (or a saved model directory); settings default to its ``eval:`` section."""
    from flowdistill.api import load_run
    from flowdistill.eval.run_eval import evaluate_run
    from flowdistill.runs import check_output_dir

    student_dir = pipeline_student(args.run_dir)
    if student_dir is not None:
        return cmd_eval_pipeline(args, student_dir)
    for flag, value in (("--reference", args.reference), ("--clip-model", args.clip_model),
                        ("--prompts", args.prompts)):
        if value is not None:
            raise FlowDistillError(f"{flag} is for diffusers pipeline runs; a built-in run is scored against "
                                   f"its own dataset")
    run = load_run(args.run_dir)
    if args.labels == "balanced":  # i mod C: flowdistill.eval.image_eval.class_labels' "balanced"
        if run.num_classes <= 0:
            raise FlowDistillError(f"--labels balanced needs a class-conditional run; {args.run_dir} has "
                                   f"num_classes=0")
        args.labels = list(range(run.num_classes))
    if args.out:
        out = Path(args.out)
    else:  # a run keeps its eval; a shipped model directory is left as it is
        out = Path(f"{run.run_dir.resolve().name}_eval") if run.model_dir else run.run_dir / "eval"
    check_output_dir(out, "--out")
    md = evaluate_run(run, args.nfe, args.n, out, seed=args.seed, solver=args.solver,
                      labels=args.labels, inception_weights=args.inception_weights,
                      cache_dir=out / "fid_cache" if run.model_dir else None)
    print(md)
    print(f"tables and plots written to {out}")


def _cmd_export(args: argparse.Namespace) -> None:
    """Export a run: a FlowDistillPipeline directory, or for a diffusers pipeline run the LoRA weights
    and scheduler config the original pipeline class loads."""
    from flowdistill.integrations.diffusers.export import export_run
    from flowdistill.runs import check_output_dir

    check_output_dir(args.out_dir, "OUT_DIR")
    if Path(args.out_dir).exists():
        check_output_dir(Path(args.out_dir).resolve().parent, "the directory of OUT_DIR")
    if pipeline_student(args.run_dir) is not None:
        return cmd_export_pipeline(args)
    out = export_run(args.run_dir, args.out_dir, overwrite=args.overwrite)
    print(f"diffusers pipeline written to {out} (load with FlowDistillPipeline.from_pretrained)")


def _cmd_recipe(args: argparse.Namespace) -> None:
    from flowdistill.recipes import run_recipe

    only = [s for s in (args.only or "").split(",") if s.strip()] or None
    runs = run_recipe(args.recipe, args.overrides, report=not args.no_report, only=only)
    if _is_main_process():
        print("runs: " + ", ".join(f"{k}={v}" for k, v in runs.items()))


def _cmd_demo(args: argparse.Namespace) -> None:
    from flowdistill.demo import run_demo

    run_demo(Path(args.out), quick=args.quick, train_teacher=args.train_teacher)


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e).strip() else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = parse_args(argv)
    try:
        load_plugins(args.plugin)
        if args.command == "train-teacher":
            _cmd_train(args, "flow_matching")
        elif args.command == "distill":
            _cmd_train(args, "freeflow")
        elif args.command == "config":
            _cmd_config_show(args)
        elif args.command == "couple":
            _cmd_couple(args)
        elif args.command == "recipe":
            _cmd_recipe(args)
        elif args.command == "sample":
            _cmd_sample(args)
        elif args.command == "eval":
            _cmd_eval(args)
        elif args.command == "export":
            _cmd_export(args)
        elif args.command == "embed":
            cmd_embed(args)
        elif args.command == "stream":
            cmd_stream(args)
        elif args.command == "demo":
            _cmd_demo(args)
    except FlowDistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except UnknownNameError as e:
        hint = "" if args.plugin or "--plugin" in str(e) else \
            " (a component of your own registers when --plugin MODULE imports it)"
        print(f"error: {e}{hint}", file=sys.stderr)
        return 2
    except ValueError as e:  # bad values met below the config layer (e.g. an NFE a solver cannot take)
        if os.environ.get("FLOWDISTILL_TRACEBACK"):
            raise
        print(f"error: {_first_line(e)} (set FLOWDISTILL_TRACEBACK=1 for the traceback)", file=sys.stderr)
        return 2
    except OSError as e:  # a file system refusing a read or write that no check foresaw
        if os.environ.get("FLOWDISTILL_TRACEBACK"):
            raise
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or _first_line(e)}{where} (set FLOWDISTILL_TRACEBACK=1 for the "
              f"traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
