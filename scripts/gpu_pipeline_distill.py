"""Distil a real-shaped diffusers transformer on a GPU: step time, peak memory, throughput (issue 15).

An SD3-medium sized ``SD3Transformer2DModel`` (the public config in ``pipeline_memory_plan.py``;
random weights, ``--blocks`` of them, 24 by default) in bf16 is the frozen teacher. The student is
a LoRA (rank ``--rank`` on the attention projections) of a copy of it with the two-time second
time embedding (:mod:`flowdistill.integrations.diffusers.two_time`), gradient checkpointing on,
its trainable weights (LoRA + embedding) in float32 with AdamW. Random prompt embeddings (fresh
each step) and 1024² latents (``--resolution``).

``--method freeflow`` (default) runs the project's FreeFlow distiller (prediction with a
finite-difference ``∂_s u`` + correction, multi-start on) constructed standalone: per step
``fake_repeats = 2`` updates of the fake-velocity net ψ and one of the student. ψ is a LoRA of its
own bf16 copy of the base (``--fake lora``) or the distiller's own full trainable copy
(``--fake full``: bf16 weights, AdamW on them as they are). ``--method regress`` is plain velocity
regression of the student onto the frozen teacher's jump,
``‖u(x_t, t, s) − sg (X_T(x_t, t, s) − x_t)/(s − t)‖²`` with ``X_T`` two Euler steps of the
teacher and ``x_t`` on the path of random "data" latents (one graph per step).

Reports the mean and median step time after ``--warmup`` steps, samples per second, the peak CUDA
memory (allocated and reserved) and the first/last losses as JSON and markdown in ``--out``.
``--tiny`` runs a two-block tiny model on the CPU as a smoke check of the script (no timing
meaning). Usage: ``python scripts/gpu_pipeline_distill.py --steps 300 --out runs/gpu_distill``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_memory_plan import SD3_MEDIUM  # noqa: E402  (the public SD3-medium config)

TINY = {"sample_size": 32, "patch_size": 2, "in_channels": 4, "num_layers": 2, "attention_head_dim": 16,
        "num_attention_heads": 2, "joint_attention_dim": 32, "caption_projection_dim": 32,
        "pooled_projection_dim": 32, "out_channels": 4, "pos_embed_max_size": 32}


def build(args, device: torch.device):
    """(teacher adapter, two-time LoRA student, model config, text tokens)."""
    from diffusers import SD3Transformer2DModel

    from flowdistill.integrations.diffusers import SD3Adapter
    from flowdistill.integrations.diffusers.lora import add_lora
    from flowdistill.integrations.diffusers.two_time import add_second_time

    cfg = dict(TINY if args.tiny else SD3_MEDIUM)
    if args.blocks is not None:
        cfg["num_layers"] = args.blocks
    torch.manual_seed(0)
    with torch.device(device):
        base = SD3Transformer2DModel(**cfg)
    base = base.to(torch.bfloat16).eval().requires_grad_(False)
    teacher = SD3Adapter(base)
    student_tf = add_lora(base, rank=args.rank, copy_model=True)
    if not args.no_checkpointing:
        student_tf.enable_gradient_checkpointing()
    student = add_second_time(student_tf)
    _fp32_trainable(student)
    return teacher, student, cfg


def _fp32_trainable(module: torch.nn.Module) -> None:
    """Trainable weights (LoRA, second time embedding) in float32; the frozen base stays bf16."""
    for p in module.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def make_fake_lora(teacher, rank: int, checkpointing: bool):
    """ψ as a LoRA on its own bf16 copy of the teacher's base (one-time, starts as the teacher)."""
    from flowdistill.integrations.diffusers import SD3Adapter
    from flowdistill.integrations.diffusers.lora import add_lora

    tf = add_lora(teacher.model, rank=rank, copy_model=True)
    if checkpointing:
        tf.enable_gradient_checkpointing()
    fake = SD3Adapter(tf).train()
    _fp32_trainable(fake)
    return fake


def teacher_jump(teacher, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond) -> torch.Tensor:
    """The teacher's average velocity from ``t`` to ``s`` by two Euler steps (through ``m = (t + s)/2``):
    ``(X_T(x, t, s) − x)/(s − t)``, the regression target of ``--method regress``."""
    m = (t + s) / 2
    sh = (-1,) + (1,) * (x.ndim - 1)
    x_m = x + (m - t).view(sh) * teacher(x, t, cond=cond)
    x_s = x_m + (s - m).view(sh) * teacher(x_m, m, cond=cond)
    return (x_s - x) / (s - t).view(sh)


def random_cond(b: int, cfg: dict, tokens: int, device, gen: torch.Generator) -> dict:
    """Random prompt embeddings of the teacher's widths (bf16)."""
    pe = torch.randn(b, tokens, cfg["joint_attention_dim"], generator=gen, device=device)
    pp = torch.randn(b, cfg["pooled_projection_dim"], generator=gen, device=device)
    return {"prompt_embeds": pe.to(torch.bfloat16), "pooled_prompt_embeds": pp.to(torch.bfloat16)}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="two-block tiny model on the CPU (smoke check)")
    ap.add_argument("--blocks", type=int, default=None, help="transformer blocks (default: 24, tiny: 2)")
    ap.add_argument("--method", choices=("freeflow", "regress"), default="freeflow")
    ap.add_argument("--fake", choices=("lora", "full"), default="lora", help="FreeFlow's ψ")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--resolution", type=int, default=1024, help="image side in pixels (latent = /8)")
    ap.add_argument("--text-tokens", type=int, default=333, help="77 CLIP + 256 T5 in the SD3 pipeline")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--time-limit", type=float, default=0.0, help="stop after this many seconds (0 = none)")
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--out", default="runs/gpu_pipeline_distill")
    args = ap.parse_args(argv)

    from flowdistill.core.rng import StepRNG
    from flowdistill.distillers.freeflow import FreeFlow, FreeFlowConfig

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if device.type == "cpu" and not args.tiny:
        ap.error("no CUDA device: run with --tiny for the CPU smoke check")
    if args.tiny:
        args.resolution, args.text_tokens = min(args.resolution, 64), min(args.text_tokens, 7)
    if args.resolution % 16:
        ap.error(f"--resolution must be a multiple of 16, got {args.resolution}")
    t_build = time.time()
    teacher, student, cfg = build(args, device)
    latent = (cfg["in_channels"], args.resolution // 8, args.resolution // 8)
    gen = torch.Generator(device=device).manual_seed(0)
    distiller = None
    if args.method == "freeflow":
        fcfg = FreeFlowConfig(derivative="fd", correction_warmup=0)
        fcfg.validate()
        distiller = FreeFlow(fcfg, student, teacher)
        if args.fake == "lora":
            distiller.fake = make_fake_lora(teacher, args.rank, not args.no_checkpointing)
        groups = distiller.optim_groups(args.lr)
    else:
        groups = None
    params = {"student": [p for p in student.parameters() if p.requires_grad]}
    if groups is not None:
        params = {g.name: list(g.params) for g in groups}
    opts = {k: torch.optim.AdamW(v, lr=args.lr, weight_decay=0.0) for k, v in params.items()}
    n_total = sum(p.numel() for p in teacher.model.parameters())
    n_train = {k: sum(p.numel() for p in v) for k, v in params.items()}
    build_s = time.time() - t_build
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    times, losses = [], []
    t_start = time.time()
    for step in range(args.steps):
        t0 = time.time()
        noise = torch.randn(args.batch, *latent, generator=gen, device=device)
        cond = random_cond(args.batch, cfg, args.text_tokens, device, gen)
        if distiller is not None:
            batch = {"noise": noise, "cond": cond}
            for g in groups:
                for _ in range(g.repeats):
                    out = distiller.loss(batch, step, g.name, StepRNG(0, step))
                    opts[g.name].zero_grad(set_to_none=True)
                    out["loss"].backward()
                    opts[g.name].step()
            loss = float(out["loss"].detach())
        else:
            x = torch.randn(args.batch, *latent, generator=gen, device=device)
            t = 0.05 + 0.95 * torch.rand(args.batch, generator=gen, device=device)
            s = t * 0.9 * torch.rand(args.batch, generator=gen, device=device)
            x_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise
            with torch.no_grad():
                target = teacher_jump(teacher, x_t, t, s, cond)
            out = (student(x_t, t, s, cond=cond) - target).float().pow(2).mean()
            opts["student"].zero_grad(set_to_none=True)
            out.backward()
            opts["student"].step()
            loss = float(out.detach())
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.time() - t0)
        losses.append(loss)
        if args.time_limit and time.time() - t_start > args.time_limit:
            break
    steps_done = len(losses)
    if not times:  # fewer steps than warmup: time them all
        times = [(time.time() - t_start) / max(steps_done, 1)]
    mean_t = statistics.fmean(times)
    res = {
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else platform.processor() or "cpu"),
        "torch": torch.__version__, "tiny": args.tiny, "method": args.method,
        "fake": args.fake if args.method == "freeflow" else None, "blocks": cfg["num_layers"],
        "width": cfg["num_attention_heads"] * cfg["attention_head_dim"], "resolution": args.resolution,
        "latent": list(latent), "text_tokens": args.text_tokens, "batch": args.batch, "rank": args.rank,
        "gradient_checkpointing": not args.no_checkpointing, "dtype": "bf16 base, fp32 trainable",
        "params_total": n_total, "params_trained": n_train, "build_s": build_s,
        "steps": steps_done, "timed_steps": len(times), "step_time_mean_s": mean_t,
        "step_time_median_s": statistics.median(times), "samples_per_s": args.batch / mean_t,
        "loss_first": losses[0], "loss_last": losses[-1], "losses_finite": all(map(_finite, losses)),
    }
    if device.type == "cuda":
        res["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        res["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    else:
        res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "result.json").write_text(json.dumps(res, indent=1))
    md = to_markdown(res, " ".join(["python scripts/gpu_pipeline_distill.py", *(sys.argv[1:] if argv is None
                                                                                 else argv)]))
    (out_dir / "result.md").write_text(md)
    print(md)
    return 0 if res["losses_finite"] else 1


def _finite(v: float) -> bool:
    return v == v and abs(v) != float("inf")


def to_markdown(r: dict, command: str) -> str:
    """One-row table of the run."""
    mem = (f"{r['peak_allocated_gib']:.1f} / {r['peak_reserved_gib']:.1f}" if "peak_allocated_gib" in r
           else f"RSS {r['peak_rss_gib']:.2f}")
    trained = ", ".join(f"{k} {v:,}" for k, v in r["params_trained"].items())
    psi = f" (ψ {r['fake']})" if r["fake"] else ""
    ckpt = "on" if r["gradient_checkpointing"] else "off"
    model = (f"{'tiny SD3' if r['tiny'] else 'SD3-sized'} {r['blocks']} blocks × {r['width']} "
             f"({r['params_total']:,} params; trained: {trained})")
    setting = f"{r['method']}{psi}, LoRA r{r['rank']}, bf16, ckpt {ckpt}"
    times = (f"{r['step_time_mean_s']:.3f} / {r['step_time_median_s']:.3f} "
             f"({r['timed_steps']} timed of {r['steps']})")
    loss = f"{r['loss_first']:.4g} → {r['loss_last']:.4g}"
    return "\n".join([
        f"Command: `{command}`", "",
        "| device | model | method | batch × res | step time mean / median (s) | samples/s "
        "| peak mem GiB (alloc / reserved) | loss first → last |",
        "|---|---|---|---|---|---|---|---|",
        f"| {r['device']} | {model} | {setting} | {r['batch']} × {r['resolution']}² | {times} "
        f"| {r['samples_per_s']:.2f} | {mem} | {loss} |", ""])


if __name__ == "__main__":
    raise SystemExit(main())
