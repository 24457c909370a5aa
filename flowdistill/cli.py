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
live in :mod:`flowdistill.cli_pipeline`; this module is the parser and the built-in commands.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from flowdistill.cli_pipeline import (
    add_embed_command,
    cmd_embed,
    cmd_eval_pipeline,
    cmd_export_pipeline,
    cmd_sample_pipeline,
    pipeline_student,
)
from flowdistill.cli_stream import add_stream_command, cmd_stream
from flowdistill.core.registry import UnknownNameError
from flowdistill.errors import FlowDistillError
from flowdistill.plugins import load_plugins


def _nfe_list(s: str) -> list[int]:
    try:
        vals = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--nfe must be comma-separated integers, got {s!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"--nfe values must be positive, got {s!r}")
    return vals


def _positive(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {v}")
    return v


def _labels(s: str) -> list[int]:
    """``--labels 0,3,7``: comma-separated non-negative class labels."""
    try:
        vals = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integer class labels, got {s!r}") from None
    if not vals or any(v < 0 for v in vals):
        raise argparse.ArgumentTypeError(f"class labels must be non-negative integers, got {s!r}")
    return vals


def _labels_or_balanced(s: str) -> list[int] | str:
    """``--labels balanced`` (class ``i mod C`` for sample ``i``) or comma-separated class labels."""
    return "balanced" if s.strip() == "balanced" else _labels(s)


def _label(s: str) -> list[int]:
    """``--class N``: one non-negative class label (as a one-element list)."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer class label, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"class labels are non-negative, got {v}")
    return [v]


class _SolverChoices(Sequence):
    """``--solver`` choices: the registered ODE solvers and reflow's ``noise_reuse``, read when
    argparse first needs them (so ``--version`` and the top-level ``--help`` do not import torch)."""

    def _names(self) -> list[str]:
        """The names, from the solver registry."""
        from flowdistill.core.solvers import SOLVERS

        return [*SOLVERS.names(), "noise_reuse"]  # noise_reuse: flowdistill.distillers.reflow.NOISE_REUSE

    def __getitem__(self, i):  # type: ignore[override]
        """The i-th name."""
        return self._names()[i]

    def __len__(self) -> int:
        """How many names."""
        return len(self._names())


def package_version() -> str:
    """The installed distribution's version (``importlib.metadata``), else ``flowdistill.__version__``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flowdistill")
    except PackageNotFoundError:
        import flowdistill

        return str(getattr(flowdistill, "__version__", "unknown"))


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


DESCRIPTION = (
    "flowdistill distils a slow flow-matching or diffusion teacher (tens to hundreds of network "
    "evaluations per sample) into a few-step student (1-8 evaluations), and trains, samples, "
    "evaluates and exports the runs. Jobs are YAML configs with key=value overrides."
)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help with each option's default appended, except where there is none to show (``None``,
    an off switch, an empty list) or the help text states it itself."""

    def _get_help_string(self, action: argparse.Action) -> str:
        """The help text, with ``(default: ...)`` where a default means something."""
        text = action.help or ""
        d = action.default
        if d is None or d is False or d == [] or d is argparse.SUPPRESS or "default" in text:
            return text
        return super()._get_help_string(action) or text


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and defaults shown in ``--help``."""

    def __init__(self, *args, **kwargs) -> None:
        """As ``ArgumentParser``, with :class:`_HelpFormatter` unless another is given."""
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        """Print ``error: ...`` and exit 2."""
        self.exit(2, f"error: {self.prog}: {message}\n")


def _add_labels(sp: argparse.ArgumentParser, balanced: bool = False) -> None:
    """``--class N`` / ``--labels A,B,...`` (exclusive) for class-conditional runs; with ``balanced``
    also ``--labels balanced``."""
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--class", dest="labels", type=_label, default=None, metavar="N",
                   help="draw every sample from class N (class-conditional runs; default: unconditional)")
    extra = (" or 'balanced': sample i from class i mod C, the class-conditional FID protocol against all "
             "real images" if balanced else "")
    g.add_argument("--labels", dest="labels", type=_labels_or_balanced if balanced else _labels, default=None,
                   metavar="A,B,...", help=f"class labels taken in turn by the samples{extra} "
                                           f"(default: unconditional)")


def build_parser(full_embed: bool = False) -> argparse.ArgumentParser:
    """The argument parser (one sub-command per job). ``full_embed=False`` lists ``embed`` without its
    options (its module imports torch; ``--version`` and ``--help`` stay light)."""
    p = _Parser(prog="flowdistill", description=DESCRIPTION,
                epilog="`flowdistill COMMAND --help` lists a command's options and their defaults.")
    p.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    plugin = argparse.ArgumentParser(add_help=False)
    plugin.add_argument("--plugin", action="append", default=None, metavar="MODULE",
                        help="import MODULE (a module name or a path to a .py file) before the config is "
                             "read, so the datasets, models and distillers it registers can be named "
                             "there; repeatable")
    solvers = _SolverChoices()

    for name, helptext, dist in (("train-teacher", "train a flow-matching teacher", "flow_matching"),
                                 ("distill", "distil a teacher into a few-step student", "freeflow")):
        sp = sub.add_parser(name, parents=[plugin], help=helptext, description=helptext +
                            f" (distiller.name defaults to {dist} unless the config names one)")
        sp.add_argument("config", nargs="?", help="YAML config (configs/*.yaml); optional")
        sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
        sp.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
        sp.add_argument("--overwrite", action="store_true", help="replace a run in out_dir")

    sp = sub.add_parser("config", help="show a job config resolved with every default",
                        description="Work with job configs.")
    csub = sp.add_subparsers(dest="config_command", required=True, parser_class=_Parser, metavar="ACTION")
    show = csub.add_parser(
        "show", parents=[plugin], help="print the resolved config (YAML) with every default",
        description="Print CONFIG with the overrides applied and every default filled in, as YAML — "
                    "what train-teacher / distill would run (distiller.name defaults to flow_matching "
                    "unless the config names one). A missing out_dir is shown as ???.")
    show.add_argument("config", nargs="?", help="YAML config; optional")
    show.add_argument("overrides", nargs="*", help="key=value overrides, e.g. distiller.name=freeflow")

    sp = sub.add_parser("couple", parents=[plugin],
                        help="generate teacher couplings for reflow / InstaFlow (sharded)")
    sp.add_argument("config", nargs="?", help="YAML config of a reflow or instaflow job")
    sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. distiller.couple.n_pairs=1000")
    sp.add_argument("--resume", action="store_true", help="finish an interrupted or smaller coupling store")
    sp.add_argument("--overwrite", action="store_true", help="replace the couplings in distiller.couplings")

    sp = sub.add_parser("recipe", parents=[plugin],
                        help="run a multi-stage recipe (e.g. couple → 2-RF → couple → InstaFlow); "
                             "rerunning resumes it stage by stage",
                        description="Run the stages of a recipe file in order (configs/recipes/*.yaml): "
                                    "finished stages are skipped, an interrupted one resumes from its "
                                    "newest checkpoint.")
    sp.add_argument("recipe", help="recipe YAML (out_dir, vars, common, stages)")
    sp.add_argument("overrides", nargs="*",
                    help="key=value overrides: out_dir=..., teacher=... (a key of vars), "
                         "stages.NAME.train.steps=500 (one stage's job key)")
    sp.add_argument("--only", default=None, metavar="NAMES",
                    help="comma-separated stages to run alone (their inputs must exist; default: all)")
    sp.add_argument("--no-report", action="store_true", help="skip report stages")

    run_help = ("a run directory, or a saved model directory (config.json + weights, e.g. "
                "assets/digits_teacher, with its train_config.yaml beside)")
    sp = sub.add_parser("sample", parents=[plugin], help="sample a trained run or a saved model",
                        description="Draw N samples from a run's student (or a saved model) and write them. "
                                    "A diffusers pipeline run (teacher: {diffusers: ...}) renders --prompt / "
                                    "--prompts through the original pipeline class at each --nfe: PNGs per "
                                    "NFE and a labelled grid (rows = prompts, columns = NFE).")
    sp.add_argument("run_dir", metavar="RUN", help=run_help + ", or a diffusers pipeline run or its export")
    sp.add_argument("--nfe", type=_nfe_list, default=None, metavar="NFE",
                    help="network evaluations per sample (default: 1); a pipeline run takes a "
                         "comma-separated list (default: 1,2,4)")
    sp.add_argument("--n", type=_positive, default=None,
                    help="number of samples (default: 64 for images, 2000 for 2-D data; a pipeline run: "
                         "images per prompt, default 1)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the noise")
    sp.add_argument("--solver", default=None, choices=solvers, metavar="SOLVER",
                    help="ODE solver for velocity students, one of: %(choices)s "
                         "(default: the run's distiller.sample_solver)")
    _add_labels(sp)
    sp.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                    help="a prompt to render (pipeline runs; repeatable)")
    sp.add_argument("--prompts", default=None, metavar="FILE",
                    help="prompts file to render (pipeline runs; .txt one a line, .jsonl / .csv 'prompt')")
    sp.add_argument("--height", type=_positive, default=None, help="image height in pixels (pipeline runs; "
                    "default: the size the run trained at)")
    sp.add_argument("--width", type=_positive, default=None, help="image width in pixels (pipeline runs; "
                    "default: the size the run trained at)")
    sp.add_argument("--batch-size", type=_positive, default=8,
                    help="images per pipeline call (pipeline runs)")
    sp.add_argument("--device", default="cpu", help="device the pipeline runs on (pipeline runs)")
    sp.add_argument("--out", default=None,
                    help="FILE.png (an image grid of all N, or a scatter plot for 2-D data), "
                         "FILE.safetensors (the tensor), or a directory (no suffix): one PNG per sample "
                         "(sample_NNNNN.png, replacing earlier ones) plus grid.png for images, "
                         "samples.safetensors plus scatter.png for 2-D data (default: samples.png; a "
                         "pipeline run writes a directory, default samples/)")

    sp = sub.add_parser("eval", parents=[plugin], help="evaluate a run or a saved model at several NFE",
                        description="NFE sweep: sliced W2 / energy distance on toy data, FID/KID on images, "
                                    "each with its data floor. Settings not given come from the run's "
                                    "eval: section (config.yaml); an NFE the solver cannot spend exactly "
                                    "is skipped with a note.")
    sp.add_argument("run_dir", metavar="RUN", help=run_help)
    sp.add_argument("--nfe", type=_nfe_list, default=None, help="comma-separated NFEs (default: eval.nfe)")
    sp.add_argument("--n", type=_positive, default=None, help="samples per NFE (default: eval.n_samples)")
    sp.add_argument("--seed", type=int, default=None, help="evaluation seed (default: eval.seed)")
    sp.add_argument("--solver", default=None, choices=solvers, metavar="SOLVER",
                    help="ODE solver for velocity students, one of: %(choices)s (default: eval.solver)")
    _add_labels(sp, balanced=True)
    sp.add_argument("--inception-weights", default=None, metavar="PATH",
                    help="local Inception-v3 weights file (.pth or .safetensors) for datasets scored with "
                         "Inception features (default: torch hub's cached copy; nothing is downloaded)")
    sp.add_argument("--reference", default=None, metavar="FOLDER",
                    help="real images for FID/KID of a diffusers pipeline run (required there)")
    sp.add_argument("--clip-model", default=None, metavar="PATH",
                    help="a local transformers CLIPModel directory: adds the CLIP score (pipeline runs)")
    sp.add_argument("--prompts", default=None, metavar="FILE",
                    help="prompts to render (pipeline runs; default: the prompts of the run's prompt cache)")
    sp.add_argument("--device", default="cpu", help="device the pipeline runs on (pipeline runs)")
    sp.add_argument("--out", default=None,
                    help="output directory (default: RUN/eval; NAME_eval in the current directory for a "
                         "saved model directory)")

    sp = sub.add_parser("export", parents=[plugin],
                        help="export a run's student as a diffusers pipeline directory (a pipeline run: LoRA "
                             "weights + scheduler config for the original pipeline class)")
    sp.add_argument("run_dir", metavar="RUN", help="a run directory")
    sp.add_argument("out_dir", metavar="OUT_DIR", help="the pipeline directory to write")
    sp.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    sp.add_argument("--no-check", action="store_true",
                    help="pipeline runs: skip sampling the export against the run's own sampler")

    add_embed_command(sub, [plugin], full=full_embed)
    add_stream_command(sub, [plugin])

    sp = sub.add_parser("demo", parents=[plugin], help="the default job on a built-in problem")
    sp.add_argument("--out", default="runs/demo", help="demo run directory (replaced each time)")
    sp.add_argument("--train-teacher", action="store_true",
                    help="train the checkerboard teacher instead of using the shipped one (adds ~40 s)")
    sp.add_argument("--quick", action="store_true", help="tiny settings (seconds), for smoke tests")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``); flags may stand between ``key=value`` overrides.

    Positional words that argparse leaves over after a flag are appended, in order, to the
    sub-command's overrides; a leftover flag, or a leftover word for a sub-command without
    overrides, is the usual ``unrecognized arguments`` error (exit status 2).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(full_embed="embed" in argv)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(a.startswith("-") for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    args.plugin = args.plugin or []
    return args


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
