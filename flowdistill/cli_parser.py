"""The ``flowdistill`` argument parser: one sub-command per job, one-line errors, each option's
default in ``--help``.

:func:`build_parser` builds it and :func:`parse_args` reads a command line with it (flags may stand
between ``key=value`` overrides). The command handlers live in :mod:`flowdistill.cli` (and
:mod:`flowdistill.cli_pipeline`, :mod:`flowdistill.cli_stream`); nothing here imports torch at
module level, so ``--version`` and the top-level ``--help`` stay light.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from flowdistill.cli_pipeline import add_embed_command
from flowdistill.cli_stream import add_stream_command


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
