"""The ``flowdistill`` sub-commands of diffusers pipeline runs (``teacher: {diffusers: ...}``).

:mod:`flowdistill.cli` parses the command line and hands a run whose directory holds a pipeline
student (:func:`pipeline_student`) to the handlers here: ``sample`` renders prompts through the
original pipeline class, ``eval`` scores FID/KID (and CLIP score) per NFE, ``export`` writes the
LoRA weights and scheduler config; ``embed`` (its registration and handler) caches a pipeline's
prompt embeddings or image latents. Nothing here imports torch at module level.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from flowdistill.errors import FlowDistillError


def pipeline_student(run_dir: str) -> Path | None:
    """The student directory of a diffusers pipeline run (or of its export), else ``None``."""
    from flowdistill.integrations.student_dir import student_dir_of  # no torch / diffusers import

    return student_dir_of(run_dir)


def cmd_sample_pipeline(args: argparse.Namespace, student_dir: Path) -> None:
    """``sample`` of a diffusers pipeline run: the original pipeline class with the student's LoRA
    and scheduler renders the prompts at each NFE (VAE decode), PNGs plus a labelled grid."""
    from flowdistill.integrations.diffusers import render
    from flowdistill.runs import check_output_dir

    if args.solver is not None or args.labels is not None:
        raise FlowDistillError("--solver, --class and --labels are for built-in runs; a pipeline run samples "
                               "with its own scheduler and takes --prompt / --prompts")
    out = Path(args.out or "samples")
    if out.suffix in (".png", ".safetensors"):
        raise FlowDistillError(f"--out of a pipeline run is a directory (PNGs per NFE and grid.png), "
                               f"got {out.name}")
    check_output_dir(out, "--out")
    prompts = render.read_prompts_arg(args.prompt, args.prompts)
    nfes = args.nfe or [1, 2, 4]
    pipe = render.load_run_pipeline(args.run_dir, device=args.device)
    h, w = render.run_image_size(pipe, student_dir)
    res = render.render_prompts(pipe, prompts, nfes, out, seed=args.seed, per_prompt=args.n or 1,
                                height=args.height or h, width=args.width or w,
                                guidance=render.run_guidance(pipe, student_dir), batch_size=args.batch_size)
    count = sum(len(v) for v in res.files.values())
    print(f"{count} images ({len(prompts)} prompts at NFE {', '.join(map(str, nfes))}) written to {out} "
          f"(nfeK/pNN_J.png and grid.png)")


def cmd_eval_pipeline(args: argparse.Namespace, student_dir: Path) -> None:
    """``eval`` of a diffusers pipeline run: FID/KID (Inception) against ``--reference``, CLIP score with
    ``--clip-model``, at each NFE; tables, plots and a grid."""
    from flowdistill.integrations.diffusers.pipeline_eval import evaluate_pipeline_run
    from flowdistill.integrations.diffusers.render import read_prompts_arg
    from flowdistill.runs import check_output_dir

    if args.reference is None:
        raise FlowDistillError("eval of a pipeline run needs --reference FOLDER (real images for FID/KID)")
    if args.solver is not None or args.labels is not None:
        raise FlowDistillError("--solver, --class and --labels are for built-in runs")
    if args.out:
        out = Path(args.out)
    else:
        run_dir = Path(args.run_dir)
        out = run_dir / "eval" if student_dir.name == "student" else Path(f"{run_dir.resolve().name}_eval")
    check_output_dir(out, "--out")
    prompts = read_prompts_arg(None, args.prompts) if args.prompts else None
    md = evaluate_pipeline_run(args.run_dir, out, reference=args.reference, nfes=args.nfe, n=args.n,
                               prompts=prompts, seed=args.seed if args.seed is not None else 0,
                               clip_model=args.clip_model, inception_weights=args.inception_weights,
                               device=args.device)
    print(md)
    print(f"tables and plots written to {out}")


def cmd_export_pipeline(args: argparse.Namespace) -> None:
    """``export`` of a diffusers pipeline run (``OUT_DIR`` already checked by the caller): the LoRA
    weights and scheduler config the original pipeline class loads."""
    from flowdistill.integrations.diffusers.export import export_pipeline_run

    out = export_pipeline_run(args.run_dir, args.out_dir, overwrite=args.overwrite,
                              check=not args.no_check)
    print(f"student written to {out}: pipe.load_lora_weights({str(out)!r}) on the original pipeline "
          f"class, then pipe.scheduler = <scheduler class, README.md>.from_pretrained({str(out)!r})")


def cmd_embed(args: argparse.Namespace) -> None:
    """``flowdistill embed``: the prompt-embedding (or latent) cache of a pipeline (:mod:`.prompt_cache`)."""
    from flowdistill.integrations.diffusers import prompt_cache

    prompt_cache.cmd_embed(args)


EMBED_HELP = "cache a pipeline's prompt embeddings (or image latents) for training"


def add_embed_command(sub: Any, parents: list[argparse.ArgumentParser], full: bool) -> None:
    """Register ``embed`` on the sub-command parsers ``sub``: with ``full`` its real parser
    (:func:`~flowdistill.integrations.diffusers.prompt_cache.add_embed_parser`, which imports torch),
    else only its name and help (``--version`` and ``--help`` stay light)."""
    if full:
        from flowdistill.integrations.diffusers.prompt_cache import add_embed_parser

        add_embed_parser(sub, parents)
    else:  # listed without importing torch; parse_args builds the real one when the command is embed
        sub.add_parser("embed", help=EMBED_HELP)
