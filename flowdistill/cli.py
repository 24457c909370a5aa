"""``flowdistill`` command line: thin over :mod:`flowdistill.api`.

Every user error (a config file that is missing, binary or not YAML, an unknown key or name, a
teacher of another architecture, an output directory that is a file, lies under one or cannot be
written, a missing or corrupt checkpoint, an existing run, a diverged loss, a value a solver cannot
take, a ``--plugin`` that fails to import) prints one line ``error: ...`` and exits with status 2;
nothing that existed before is changed. ``FLOWDISTILL_TRACEBACK=1`` re-raises a ``ValueError`` or
``OSError`` with its traceback.

Flags may stand anywhere among the ``key=value`` overrides (``distill CFG a=1 --resume b=2``).
``--plugin MODULE`` (every sub-command, repeatable) imports a module by name or a ``.py`` file by
path before the config is read, so the datasets, models and distillers it registers can be named
in the config; configs themselves never import anything.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

from flowdistill.core.registry import UnknownNameError
from flowdistill.errors import FlowDistillError, PluginError


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


def _is_path(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or (os.altsep is not None and os.altsep in spec)


def _import_file(spec: str) -> ModuleType:
    """Import the ``.py`` file (or package directory) ``spec`` under its own stem as module name."""
    path = Path(spec)
    if not path.exists():
        raise PluginError(f"--plugin {spec}: no such file")
    is_pkg = path.is_dir()
    file = path / "__init__.py" if is_pkg else path
    if is_pkg and not file.is_file():
        raise PluginError(f"--plugin {spec}: a directory without __init__.py is not a Python package")
    if file.suffix != ".py":
        raise PluginError(f"--plugin {spec}: not a Python file (expected a .py file or a module name)")
    name = path.resolve().name if is_pkg else path.stem
    have = sys.modules.get(name)
    if have is not None:
        if getattr(have, "__file__", None) and Path(have.__file__).resolve() == file.resolve():
            return have  # imported before (a second --plugin of the same file)
        raise PluginError(f"--plugin {spec}: the module name {name!r} is taken by "
                          f"{getattr(have, '__file__', None) or 'a built-in module'}; rename the file")
    mspec = importlib.util.spec_from_file_location(
        name, file, submodule_search_locations=[str(path)] if is_pkg else None)
    if mspec is None or mspec.loader is None:
        raise PluginError(f"--plugin {spec}: cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(mspec)
    sys.modules[name] = module
    try:
        mspec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def load_plugins(specs: Iterable[str]) -> list[ModuleType]:
    """Import each ``--plugin``: a module name (``importlib.import_module``, looked up on
    ``sys.path``) or a path to a ``.py`` file or package directory (imported under its stem).

    The datasets, models and distillers a module registers on import can then be named in a
    config. Importing the same module again is a no-op. A module that cannot be found or that
    raises while importing is a :class:`~flowdistill.errors.PluginError` naming it and the error.
    """
    modules = []
    for spec in specs:
        try:
            modules.append(_import_file(spec) if _is_path(spec) else importlib.import_module(spec))
        except PluginError:
            raise
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else ""
            hint = ""
            missing = getattr(e, "name", None) if isinstance(e, ModuleNotFoundError) else None
            if missing and (spec == missing or spec.startswith(missing + ".")):
                hint = (" (a module name is looked up on sys.path; give a file by its path, "
                        f"e.g. --plugin ./{spec.replace('.', '/')}.py)")
            raise PluginError(f"--plugin {spec}: importing it failed: {type(e).__name__}: "
                              f"{msg}{hint}") from None
    return modules


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
    print(f"run written to {run_dir}")


def _cmd_couple(args: argparse.Namespace) -> None:
    from flowdistill.config import load_config
    from flowdistill.couplings.pipeline import couple_job

    if args.config is not None and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides, args.config = [args.config, *args.overrides], None
    cfg = load_config(args.config, args.overrides, default_distiller="reflow")
    if getattr(cfg.distiller, "couplings", None):
        from flowdistill.runs import check_output_dir

        check_output_dir(cfg.distiller.couplings, "distiller.couplings")
    root = couple_job(cfg, resume=args.resume, overwrite=args.overwrite)
    print(f"couplings written to {root}")


def _cmd_sample(args: argparse.Namespace) -> None:
    import torch

    from flowdistill.api import load_run
    from flowdistill.eval.plots import scatter_grid
    from flowdistill.runs import check_output_dir

    out = Path(args.out)
    if out.suffix not in (".png", ".safetensors"):
        raise FlowDistillError(f"--out must end in .png or .safetensors, got {out.name}")
    if out.is_dir():
        raise FlowDistillError(f"--out {out} is a directory; give a file name ending in {out.suffix}")
    check_output_dir(out.parent, "--out directory")
    run = load_run(args.run_dir)
    x = run.sample(args.n, args.nfe, seed=args.seed, solver=args.solver)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".png":
        if x.ndim == 2:
            scatter_grid({f"NFE {args.nfe}": x}, out)
        else:
            from flowdistill.eval.plots import image_grid

            image_grid(x[:64], out)
    elif out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({"samples": x.contiguous()}, str(out))
    print(f"{x.shape[0]} samples at NFE {args.nfe} written to {out}")
    del torch


def _cmd_eval(args: argparse.Namespace) -> None:
    from flowdistill.api import load_run
    from flowdistill.eval.run_eval import evaluate_run
    from flowdistill.runs import check_output_dir

    run = load_run(args.run_dir)
    out = Path(args.out) if args.out else run.run_dir / "eval"
    check_output_dir(out, "--out")
    md = evaluate_run(run, args.nfe, args.n, out, seed=args.seed, solver=args.solver)
    print(md)
    print(f"tables and plots written to {out}")


def _cmd_export(args: argparse.Namespace) -> None:
    from flowdistill.integrations.diffusers.export import export_run
    from flowdistill.runs import check_output_dir

    check_output_dir(args.out_dir, "OUT_DIR")
    if Path(args.out_dir).exists():
        check_output_dir(Path(args.out_dir).resolve().parent, "the directory of OUT_DIR")
    out = export_run(args.run_dir, args.out_dir, overwrite=args.overwrite)
    print(f"diffusers pipeline written to {out} (load with FlowDistillPipeline.from_pretrained)")


def _cmd_reflow(args: argparse.Namespace) -> None:
    from flowdistill.config import read_yaml_file
    from flowdistill.couplings.pipeline import run_pipeline

    read_yaml_file(args.config)  # a missing, binary or malformed file: one line naming it
    runs = run_pipeline(args.config, args.overrides, report=not args.no_report)
    print("runs: " + ", ".join(f"{k}={v}" for k, v in runs.items()))


def _cmd_demo(args: argparse.Namespace) -> None:
    from flowdistill.demo import run_demo

    run_demo(Path(args.out), quick=args.quick, train_teacher=args.train_teacher)


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e).strip() else type(e).__name__


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump)."""

    def error(self, message: str):  # type: ignore[override]
        """Print ``error: ...`` and exit 2."""
        self.exit(2, f"error: {self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (one sub-command per job)."""
    p = _Parser(prog="flowdistill", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    plugin = argparse.ArgumentParser(add_help=False)
    plugin.add_argument("--plugin", action="append", default=None, metavar="MODULE",
                        help="import MODULE (a module name or a path to a .py file) before the config is "
                             "read, so the datasets, models and distillers it registers can be named "
                             "there; repeatable")

    for name, helptext in (("train-teacher", "train a flow-matching teacher"),
                           ("distill", "distil a teacher into a few-step student")):
        sp = sub.add_parser(name, parents=[plugin], help=helptext)
        sp.add_argument("config", nargs="?", help="YAML config (configs/*.yaml)")
        sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
        sp.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
        sp.add_argument("--overwrite", action="store_true", help="replace a run in out_dir")

    sp = sub.add_parser("couple", parents=[plugin],
                        help="generate teacher couplings for reflow / InstaFlow (sharded)")
    sp.add_argument("config", nargs="?", help="YAML config of a reflow or instaflow job")
    sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. distiller.couple.n_pairs=1000")
    sp.add_argument("--resume", action="store_true", help="finish an interrupted or smaller coupling store")
    sp.add_argument("--overwrite", action="store_true", help="replace the couplings in distiller.couplings")

    sp = sub.add_parser("reflow", parents=[plugin],
                        help="couple → 2-rectified flow → couple → InstaFlow student, from one config "
                             "(resumes finished stages)")
    sp.add_argument("config", help="YAML chain config (configs/reflow_*.yaml)")
    sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. reflow.train.steps=500")
    sp.add_argument("--no-report", action="store_true", help="skip OUT_DIR/report.md")

    sp = sub.add_parser("sample", parents=[plugin], help="sample a trained run")
    sp.add_argument("run_dir")
    sp.add_argument("--nfe", type=_positive, default=1)
    sp.add_argument("--n", type=_positive, default=2000)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--solver", default=None, help="override the run's sampler (velocity students)")
    sp.add_argument("--out", default="samples.png", help=".png or .safetensors")

    sp = sub.add_parser("eval", parents=[plugin], help="evaluate a run at several NFE")
    sp.add_argument("run_dir")
    sp.add_argument("--nfe", type=_nfe_list, default=[1, 2, 4, 8])
    sp.add_argument("--n", type=_positive, default=4000)
    sp.add_argument("--seed", type=int, default=1234)
    sp.add_argument("--solver", default=None)
    sp.add_argument("--out", default=None, help="output directory (default RUN_DIR/eval)")

    sp = sub.add_parser("export", parents=[plugin],
                        help="export a run's student as a diffusers pipeline directory")
    sp.add_argument("run_dir")
    sp.add_argument("out_dir")
    sp.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")

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
    parser = build_parser()
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
        elif args.command == "couple":
            _cmd_couple(args)
        elif args.command == "reflow":
            _cmd_reflow(args)
        elif args.command == "sample":
            _cmd_sample(args)
        elif args.command == "eval":
            _cmd_eval(args)
        elif args.command == "export":
            _cmd_export(args)
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
