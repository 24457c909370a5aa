"""Benchmark: the plain autoencoder vs RecTok on the digits at 32×32, per latent channel count.

For each tokenizer kind (``ae``: configs/ae_digits.yaml, ``rectok``: configs/rectok_digits.yaml) and
latent channels C, the run ``RUNS/tok_{kind}_c{C}`` is trained when it has no exported tokenizer yet
(``flowdistill distill CONFIG model.params.latent_channels=C out_dir=RUNS/tok_{kind}_c{C}``, in
process), its latent statistics (shift = mean z, scale = 1/std z over the train split) are written
into its exported config when not measured yet, and it is evaluated on the 360 test digits:

- reconstruction: PSNR, rFID / rKID on the digits-classifier features at n = 360, and the
  real-vs-real floor at the same n (train subsets vs the test set, mean over ``--seeds``);
- linear probe (logistic regression) on z_t = (1−t)·ẑ + t·ε at t ∈ {0, .25, .5, .75}, trained on the
  1 437 train digits, scored on the test digits.

Writes ``OUT/results.json`` (after each run, so a partial benchmark keeps what it measured),
``OUT/table.md`` and ``OUT/probe_vs_t.png`` (probe accuracy vs t, one panel per C, both kinds).

    OMP_NUM_THREADS=1 python scripts/bench_tokenizers.py --channels 8 32 4 16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"ae": ROOT / "configs" / "ae_digits.yaml", "rectok": ROOT / "configs" / "rectok_digits.yaml"}
T_VALUES = (0.0, 0.25, 0.5, 0.75)


def train_run(kind: str, channels: int, run_dir: Path, steps: int | None, extra: list[str]) -> float:
    """Train the tokenizer ``kind`` at ``channels`` into ``run_dir`` (resuming a partial run), with
    config overrides ``extra``; returns the seconds taken."""
    from flowdistill.api import train
    from flowdistill.config import load_config

    over = [f"model.params.latent_channels={channels}", f"out_dir={run_dir}"]
    if steps:
        over.append(f"train.steps={steps}")
    over += extra
    cfg = load_config(CONFIGS[kind], over)
    resume = (run_dir / "checkpoints").is_dir()
    t0 = time.time()
    train(cfg, resume=resume, on_plot=lambda trainer, step: None)
    return time.time() - t0


def train_stage2(kind: str, channels: int, stage1: Path, run_dir: Path, steps: int) -> None:
    """Stage 2 (decoder-only fine-tune on clean latents, EMA off: the latent statistics are written)
    of the stage-1 run ``stage1`` into ``run_dir`` (as configs/recipes/rectok_digits.yaml does)."""
    from flowdistill.api import train
    from flowdistill.config import load_config

    over = [f"model.params.latent_channels={channels}", f"out_dir={run_dir}", "distiller.stage=2",
            f"init={stage1}", f"train.steps={steps}", "train.lr=5.0e-4", "train.warmup_steps=0",
            "train.ema_decay=0.0"]
    cfg = load_config(CONFIGS[kind], over)
    train(cfg, resume=(run_dir / "checkpoints").is_dir(), on_plot=lambda trainer, step: None)


def train_seconds(run_dir: Path) -> float | None:
    """The run's recorded training time (last ``elapsed_s`` of metrics.jsonl)."""
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return None
    lines = [json.loads(s) for s in f.read_text().splitlines() if s.strip()]
    return float(lines[-1]["elapsed_s"]) if lines else None


def evaluate(run_dir: Path, seeds: list[int]) -> dict:
    """Latent statistics (written when missing), reconstruction report and linear probe of a run."""
    from flowdistill.data.digits import digits_tensors
    from flowdistill.eval import tokenizer_eval as te
    from flowdistill.models.loading import load_model_dir

    xtr, ytr = digits_tensors("train", 32)
    xte, yte = digits_tensors("test", 32)
    student = run_dir / "student"
    tok = load_model_dir(student).eval().requires_grad_(False)
    conf = tok.config
    stats = {"shift_factor": float(conf.shift_factor), "scaling_factor": float(conf.scaling_factor)}
    if stats == {"shift_factor": 0.0, "scaling_factor": 1.0}:  # not measured yet (stage 1 only)
        stats = te.latent_stats(tok, xtr)
        te.write_latent_stats(student, stats)
    t0 = time.time()
    rec = te.reconstruction_report(tok, xte, seeds=seeds)
    probe = te.linear_probe(tok, xtr, ytr, xte, yte, t_values=T_VALUES, seed=0)
    return {**rec, "probe": {str(t): a for t, a in probe.items()}, **stats,
            "eval_s": round(time.time() - t0, 1)}


def table(results: dict) -> str:
    """The markdown table of ``results`` (one row per run)."""
    head = ("| tokenizer | C | latent | PSNR (dB) | rFID | rKID | floor FID (n=360) | "
            + " | ".join(f"probe t={t:g}" for t in T_VALUES) + " | train s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key in sorted(results, key=lambda k: (results[k]["channels"], results[k]["kind"])):
        r = results[key]
        probe = " | ".join(f"{r['probe'][str(t)]:.3f}" for t in T_VALUES)
        ts = r.get("train_s")
        lines.append(f"| {r['kind']} | {r['channels']} | 64×{r['channels']} | {r['psnr']:.2f} | "
                     f"{r['rfid']:.3f} | {r['rkid']:.4f} | "
                     f"{r['rfid_floor']:.3f} ± {r['rfid_floor_std']:.3f} | {probe} | "
                     f"{ts if ts is None else round(ts)} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Probe accuracy vs t, one panel per channel count, a line per tokenizer kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chans = sorted({r["channels"] for r in results.values()})
    fig, axes = plt.subplots(1, len(chans), figsize=(3.2 * len(chans), 3), sharey=True, squeeze=False)
    for ax, c in zip(axes[0], chans, strict=True):
        for r in results.values():
            if r["channels"] == c and r["kind"] in ("ae", "rectok"):  # stage 2 keeps the encoder: same probe
                ax.plot(T_VALUES, [r["probe"][str(t)] for t in T_VALUES], marker="o",
                        label={"ae": "plain AE", "rectok": "RecTok"}[r["kind"]])
        ax.set_title(f"C = {c} (64 tokens)")
        ax.set_xlabel("t (noise level)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("linear-probe accuracy (test)")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    """Train what is missing, evaluate, write JSON + markdown + plot."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--channels", type=int, nargs="+", default=[8, 32, 4, 16])
    ap.add_argument("--kinds", nargs="+", default=["ae", "rectok"], choices=sorted(CONFIGS))
    ap.add_argument("--runs", type=Path, default=ROOT / "runs")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_tokenizers")
    ap.add_argument("--steps", type=int, default=None, help="override train.steps of the configs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--no-train", action="store_true", help="evaluate finished runs only")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="set_all",
                    help="a config override for every run (e.g. train.seed=1)")
    ap.add_argument("--rectok-set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for the RecTok runs only (e.g. distiller.semantic.weights=PATH)")
    ap.add_argument("--stage2", type=int, default=0, metavar="STEPS",
                    help="also fine-tune each run's decoder for STEPS steps (stage 2) and evaluate it")
    ap.add_argument("--reeval", action="store_true", help="evaluate runs already in OUT/results.json again")
    ap.add_argument("--announce", type=Path, default=None, help="append each finished run dir to this file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    res_file = args.out / "results.json"
    results = json.loads(res_file.read_text()) if res_file.is_file() else {}
    for c in args.channels:
        for kind in args.kinds:
            key, run_dir = f"{kind}_c{c}", args.runs / f"tok_{kind}_c{c}"
            if not (run_dir / "student" / "config.json").is_file():
                if args.no_train:
                    print(f"skip {key}: {run_dir} has no exported tokenizer", flush=True)
                    continue
                print(f"train {key} -> {run_dir}", flush=True)
                train_run(kind, c, run_dir, args.steps,
                          args.set_all + (args.rectok_set if kind == "rectok" else []))
                if args.announce:
                    with open(args.announce, "a") as f:
                        f.write(f"{run_dir} ({kind}, C={c}, stage 1)\n")
            if key not in results or args.reeval:
                print(f"eval {key}", flush=True)
                r = evaluate(run_dir, args.seeds)
                results[key] = {"kind": kind, "channels": c, "run_dir": str(run_dir),
                                "train_s": train_seconds(run_dir), **r}
                res_file.write_text(json.dumps(results, indent=2) + "\n")
                print(json.dumps(results[key]), flush=True)
            if args.stage2 > 0:
                key2, dir2 = f"{kind}+s2_c{c}", args.runs / f"tok_{kind}_c{c}_s2"
                if not (dir2 / "student" / "config.json").is_file():
                    if args.no_train:
                        continue
                    print(f"train {key2} -> {dir2}", flush=True)
                    train_stage2(kind, c, run_dir, dir2, args.stage2)
                    if args.announce:
                        with open(args.announce, "a") as f:
                            f.write(f"{dir2} ({kind}, C={c}, stage 1 + stage 2 ({args.stage2} steps))\n")
                if key2 in results and not args.reeval:
                    continue
                print(f"eval {key2}", flush=True)
                r = evaluate(dir2, args.seeds)
                results[key2] = {"kind": f"{kind}+s2", "channels": c, "run_dir": str(dir2),
                                 "train_s": train_seconds(dir2), **r}
                res_file.write_text(json.dumps(results, indent=2) + "\n")
                print(json.dumps(results[key2]), flush=True)
    (args.out / "table.md").write_text(table(results))
    plot(results, args.out / "probe_vs_t.png")
    print(table(results))


if __name__ == "__main__":
    main()
