"""NFE sweep of a diffusers pipeline run (``flowdistill eval RUN --reference FOLDER``): images
rendered through the user's own pipeline class (:mod:`.render`), FID / KID with torch-fidelity's
Inception (offline weights file) against a folder of real images, CLIP score against the prompts
when a CLIP model directory is given; ``sweep.md`` / ``sweep.json``, ``fid_vs_nfe.png`` (and
``clip_vs_nfe.png``) and a labelled grid, as the built-in image sweeps write.

Protocol: at every NFE the same ``n`` prompts (the ``--prompts`` file, else the prompts of the run's
own prompt cache, repeated in turn up to ``n``) are rendered from the same seeded noise; FID is
biased by set size, so compare rows at equal ``n`` and read KID beside it (DESIGN.md §7). The KID
subset size is ``min(1000, n, n_ref)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from flowdistill.errors import ConfigError
from flowdistill.integrations.diffusers import render

COLUMNS = ["model", "nfe", "fid", "kid_mean", "kid_std", "clip_score", "n", "n_ref"]


def run_prompts(student_dir: str | Path) -> list[str]:
    """The prompts of the run's own prompt cache (``data.root``'s ``prompts.jsonl``), in cache order."""
    import json

    cfg = render.run_config(student_dir)
    if cfg is None:
        raise ConfigError(f"{student_dir} is an export (no run config to find the run's prompts); "
                          f"give --prompts FILE")
    root = Path(str(cfg.data.root or ""))
    f = root / "prompts.jsonl"
    if not f.is_file():
        raise ConfigError(f"the run's prompt cache {root} has no prompts.jsonl; give --prompts FILE")
    return [json.loads(line)["prompt"] for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]


def _images(pipe: Any, prompts: list[str], nfe: int, noise: torch.Tensor, guidance: dict[str, Any],
            batch_size: int, height: int, width: int) -> torch.Tensor:
    """``[n, 3, H, W]`` in [-1, 1]: the pipeline's decoded images of ``prompts`` from ``noise``."""
    out = []
    for lo in range(0, len(prompts), batch_size):
        x = render.generate(pipe, nfe, noise[lo:lo + batch_size], prompts=prompts[lo:lo + batch_size],
                            output_type="pt", guidance=guidance, height=height, width=width)
        out.append(x.float().cpu() * 2 - 1)
    return torch.cat(out)


def evaluate_pipeline_run(run_dir: str | Path, out_dir: str | Path, *, reference: str | Path,
                          nfes: Sequence[int] | None = None, n: int | None = None,
                          prompts: Sequence[str] | None = None, seed: int = 0,
                          clip_model: str | Path | None = None, inception_weights: str | Path | None = None,
                          batch_size: int = 8, device: str = "cpu") -> str:
    """Sweep a pipeline run (or its export) over ``nfes`` (default: the run's ``eval.nfe``; an export's
    1, 2, 4); returns the markdown table.

    Everything the sweep needs (the reference folder, the Inception weights, the CLIP model) is
    checked before the first image is rendered.
    """
    from flowdistill.eval.fid import compute_fid
    from flowdistill.eval.image_io import resolve_input
    from flowdistill.eval.inception import inception_weights_path
    from flowdistill.eval.plots import metric_vs_nfe
    from flowdistill.eval.sweep import write_table

    sdir = render.student_dir_of(run_dir)
    if sdir is None:
        raise ConfigError(f"{run_dir} is not a diffusers pipeline run")
    meta = render.read_student_meta(sdir)
    ref = Path(reference)
    try:
        n_ref = resolve_input(str(ref), "--reference", None, 1, 0, "cpu").n
        weights = inception_weights_path(inception_weights)
    except ValueError as e:
        raise ConfigError(str(e).replace("inception_weights=PATH", "--inception-weights PATH")) from None
    clip = None
    if clip_model is not None:
        from flowdistill.eval.clip_score import load_clip

        clip = load_clip(clip_model, device)
    if nfes is None:  # the run's eval.nfe; an export: 1, 2, 4
        cfg = render.run_config(sdir)
        nfes = list(cfg.eval.nfe) if cfg is not None else [1, 2, 4]
    prompt_list = list(prompts) if prompts else run_prompts(sdir)
    n = int(n if n is not None else len(prompt_list))
    if n < 4:
        raise ConfigError(f"--n {n}: FID/KID need at least 4 images per NFE")
    flat = [prompt_list[i % len(prompt_list)] for i in range(n)]
    pipe = render.load_run_pipeline(run_dir, device=device)
    guidance = render.run_guidance(pipe, sdir)
    h, w = render.run_image_size(pipe, sdir)
    noise = render.draw_noise(render.latent_shape(pipe, h, w), n, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    label = str(meta.get("distiller", "student"))
    rows, shown = [], {}
    for nfe in nfes:
        x = _images(pipe, flat, int(nfe), noise, guidance, batch_size, h, w)
        m = compute_fid(x, str(ref), feature_extractor="inception", inception_weights=weights, seed=seed,
                        cache_dir=out / "fid_cache", cuda=str(device).startswith("cuda"))
        row = {"model": label, "nfe": int(nfe), "fid": m["fid"], "kid_mean": m["kid_mean"],
               "kid_std": m["kid_std"], "clip_score": float("nan"), "n": m["n"], "n_ref": m["n_ref"]}
        if clip is not None:
            from flowdistill.eval.clip_score import clip_score

            row["clip_score"] = clip_score(x, flat, *clip)["clip_score"]
        rows.append(row)
        shown[int(nfe)] = [render.to_pil(img) for img in x[:4]]
    md = write_table(rows, COLUMNS, out, stem="sweep")
    metric_vs_nfe({label: {r["nfe"]: r["fid"] for r in rows}}, out / "fid_vs_nfe.png",
                  ylabel=f"FID (Inception, n={n} vs {n_ref} reference)")
    if clip is not None:
        metric_vs_nfe({label: {r["nfe"]: r["clip_score"] for r in rows}}, out / "clip_vs_nfe.png",
                      ylabel="CLIP score (100·cos)")
    k = min(4, n)
    cells = [[shown[int(nfe)][i] for nfe in nfes] for i in range(k)]
    render.labelled_grid(cells, flat[:k], [f"NFE {v}" for v in nfes], out / "grid.png")
    notes = [f"reference {ref} ({n_ref} images); prompts: {'--prompts' if prompts else 'the run cache'}, "
             f"seed {seed}"]
    if clip is None:
        notes.append("CLIP score not computed (give --clip-model DIR)")
    md = md + "\n\n" + "\n".join(f"- {note}" for note in notes)
    (out / "sweep.md").write_text(md + "\n")
    return md
