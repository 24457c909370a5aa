"""``flowdistill`` command line: thin over :mod:`flowdistill.api`.

Every user error (bad config, unknown name, missing checkpoint, existing run, diverged loss, a
value a solver cannot take) prints one line ``error: ...`` and exits with status 2; nothing is
overwritten. ``FLOWDISTILL_TRACEBACK=1`` re-raises a ``ValueError`` with its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from flowdistill.core.registry import UnknownNameError
from flowdistill.errors import FlowDistillError


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
    root = couple_job(cfg, resume=args.resume, overwrite=args.overwrite)
    print(f"couplings written to {root}")


def _cmd_sample(args: argparse.Namespace) -> None:
    import torch

    from flowdistill.api import load_run
    from flowdistill.eval.plots import scatter_grid

    run = load_run(args.run_dir)
    x = run.sample(args.n, args.nfe, seed=args.seed, solver=args.solver)
    out = Path(args.out)
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
    else:
        raise FlowDistillError(f"--out must end in .png or .safetensors, got {out.name}")
    print(f"{x.shape[0]} samples at NFE {args.nfe} written to {out}")
    del torch


def _cmd_eval(args: argparse.Namespace) -> None:
    from flowdistill.api import load_run
    from flowdistill.eval.run_eval import evaluate_run

    run = load_run(args.run_dir)
    out = Path(args.out) if args.out else run.run_dir / "eval"
    md = evaluate_run(run, args.nfe, args.n, out, seed=args.seed, solver=args.solver)
    print(md)
    print(f"tables and plots written to {out}")


def _cmd_export(args: argparse.Namespace) -> None:
    from flowdistill.integrations.diffusers.export import export_run

    out = export_run(args.run_dir, args.out_dir, overwrite=args.overwrite)
    print(f"diffusers pipeline written to {out} (load with FlowDistillPipeline.from_pretrained)")


def _cmd_reflow(args: argparse.Namespace) -> None:
    from flowdistill.couplings.pipeline import run_pipeline

    runs = run_pipeline(args.config, args.overrides, report=not args.no_report)
    print("runs: " + ", ".join(f"{k}={v}" for k, v in runs.items()))


def _cmd_demo(args: argparse.Namespace) -> None:
    from flowdistill.demo import run_demo

    run_demo(Path(args.out), quick=args.quick)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump)."""

    def error(self, message: str):  # type: ignore[override]
        """Print ``error: ...`` and exit 2."""
        self.exit(2, f"error: {self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (one sub-command per job)."""
    p = _Parser(prog="flowdistill", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    for name, helptext in (("train-teacher", "train a flow-matching teacher"),
                           ("distill", "distil a teacher into a few-step student")):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("config", nargs="?", help="YAML config (configs/*.yaml)")
        sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100")
        sp.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
        sp.add_argument("--overwrite", action="store_true", help="replace a run in out_dir")

    sp = sub.add_parser("couple", help="generate teacher couplings for reflow / InstaFlow (sharded)")
    sp.add_argument("config", nargs="?", help="YAML config of a reflow or instaflow job")
    sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. distiller.couple.n_pairs=1000")
    sp.add_argument("--resume", action="store_true", help="finish an interrupted or smaller coupling store")
    sp.add_argument("--overwrite", action="store_true", help="replace the couplings in distiller.couplings")

    sp = sub.add_parser("reflow", help="couple → 2-rectified flow → couple → InstaFlow student, from one "
                                       "config (resumes finished stages)")
    sp.add_argument("config", help="YAML chain config (configs/reflow_*.yaml)")
    sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. reflow.train.steps=500")
    sp.add_argument("--no-report", action="store_true", help="skip OUT_DIR/report.md")

    sp = sub.add_parser("sample", help="sample a trained run")
    sp.add_argument("run_dir")
    sp.add_argument("--nfe", type=_positive, default=1)
    sp.add_argument("--n", type=_positive, default=2000)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--solver", default=None, help="override the run's sampler (velocity students)")
    sp.add_argument("--out", default="samples.png", help=".png or .safetensors")

    sp = sub.add_parser("eval", help="evaluate a run at several NFE")
    sp.add_argument("run_dir")
    sp.add_argument("--nfe", type=_nfe_list, default=[1, 2, 4, 8])
    sp.add_argument("--n", type=_positive, default=4000)
    sp.add_argument("--seed", type=int, default=1234)
    sp.add_argument("--solver", default=None)
    sp.add_argument("--out", default=None, help="output directory (default RUN_DIR/eval)")

    sp = sub.add_parser("export", help="export a run's student as a diffusers pipeline directory")
    sp.add_argument("run_dir")
    sp.add_argument("out_dir")
    sp.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")

    sp = sub.add_parser("demo", help="the default job on a built-in problem")
    sp.add_argument("--out", default="runs/demo", help="demo run directory (replaced each time)")
    sp.add_argument("--quick", action="store_true", help="tiny settings (seconds), for smoke tests")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
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
    except (FlowDistillError, UnknownNameError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # bad values met below the config layer (e.g. an NFE a solver cannot take)
        if os.environ.get("FLOWDISTILL_TRACEBACK"):
            raise
        print(f"error: {e} (set FLOWDISTILL_TRACEBACK=1 for the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
