"""Latent generator benchmark of the RecTok chain (issue #17): FID vs training steps of a DiT
flow-matching teacher on the latents of each tokenizer (plain AE vs RecTok, several channel
counts), then a FreeFlow few-step student on one tokenizer's latents at 1/2/4 steps vs its teacher.

    OMP_NUM_THREADS=1 python scripts/bench_latent_chain.py \\
        --tokenizers ae_c8=runs/tok_ae_c8,rectok_c8=runs/tok_rectok_c8,\\
ae_c32=runs/tok_ae_c32,rectok_c32=runs/tok_rectok_c32 \\
        --steps 1500 --every 250 --student-of rectok_c8 --student-steps 400 --out runs/bench_latent_chain

For each tokenizer ``LABEL=DIR``: its digits-32 train latents are cached (posterior mean,
normalised by the tokenizer's factors) in ``OUT/LABEL/cache``; a DiT teacher trains on them in
``OUT/LABEL/teacher`` with a checkpoint every ``--every`` steps (EMA weights; constant learning rate
after warm-up, so a checkpoint is the model at that point of training, not of a shorter schedule).
Every checkpoint is sampled (``--solver`` at ``--nfe``), decoded by the tokenizer and scored by FID
against the 360 digits test images (digits-classifier features, n = 360) — one sampling seed per
intermediate checkpoint, ``--final-seeds`` at the last — beside the floor (FID of 360 real train
images vs the test split, one random subset per seed). ``--student-of LABEL`` distils that
teacher with FreeFlow (``OUT/LABEL/student``) and scores it at 1, 2 and 4 steps and the teacher at
its ``--nfe``, with FID and KID over ``--student-seeds`` seeds. Runs resume: a finished cache,
teacher or student is reused, a killed one continues from its newest checkpoint.

Writes ``OUT/curves.json``, ``OUT/curves.md``, ``OUT/student.json``, ``OUT/student.md`` and the plot
``--plot`` (default ``docs/img/latent_fid_vs_steps.png``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

TEACHER_MODEL = {"name": "dit", "params": {"patch_size": 1, "hidden": 96, "depth": 4, "heads": 4}}
FREEFLOW = {"name": "freeflow", "derivative": "jvp", "adaptive_p": 0.5, "s_weight_c": 0.1,
            "shortcut_weight": 0.1, "s_zero_share": 0.25, "multi_start": True, "multi_start_share": 0.5,
            "t_min": 0.05, "correction": True, "correction_fraction": 0.5, "correction_warmup": 50,
            "fake_repeats": 2, "uncond_share": 1.0}


def parse_args() -> argparse.Namespace:
    """Command-line options (module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizers", required=True, help="LABEL=DIR,... tokenizer runs or model directories")
    p.add_argument("--out", default="runs/bench_latent_chain")
    p.add_argument("--steps", type=int, default=1500, help="teacher training steps")
    p.add_argument("--every", type=int, default=250, help="checkpoint / FID every this many steps")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--solver", default="euler")
    p.add_argument("--nfe", type=int, default=32, help="teacher sampling NFE for the curves")
    p.add_argument("--final-seeds", type=int, default=3)
    p.add_argument("--n", type=int, default=360, help="samples per FID (digits test split: 360)")
    p.add_argument("--student-of", default="", help="LABEL whose teacher FreeFlow distils ('' = none)")
    p.add_argument("--student-steps", type=int, default=400)
    p.add_argument("--student-seeds", type=int, default=5)
    p.add_argument("--teacher-nfes", default="", help="NFEs of the teacher in the student table "
                   "(comma-separated; default: --nfe)")
    p.add_argument("--model", default=json.dumps(TEACHER_MODEL), help="teacher model section (JSON)")
    p.add_argument("--plot", default="docs/img/latent_fid_vs_steps.png")
    p.add_argument("--only-plot", action="store_true", help="redraw the plot from OUT/curves.json")
    p.add_argument("--student-only", action="store_true",
                   help="skip the curves (their teachers must be trained): only the --student-of part")
    return p.parse_args()


def encode_cache(tok_dir: str, root: Path) -> Path:
    """The digits-32 train latents of the tokenizer at ``tok_dir`` (written, resumed or reused),
    normalised by its own factors, or by measured ones (unit variance) where its config has the
    defaults 1 and 0 (a tokenizer without stage 2, which writes them)."""
    from flowdistill.data.couplings import MANIFEST
    from flowdistill.data.latent_cache import encode_dataset, measure_factors, tokenizer_factors
    from flowdistill.data.registry import build_dataset
    from flowdistill.models.latent_codec import load_tokenizer

    spec = SimpleNamespace(name="digits", image_size=32, conditional=True, root="", params={})
    if (root / MANIFEST).is_file() and json.loads((root / MANIFEST).read_text()).get("complete"):
        return root  # a finished cache is kept as made (its manifest records the factors it used)
    tok = load_tokenizer(tok_dir, "--tokenizers")
    source = build_dataset(spec, "train")
    factors = tokenizer_factors(tok)
    if factors == (1.0, 0.0):
        factors = measure_factors(tok, source)
        print(f"{tok_dir}: no latent statistics in its config; normalising by measured "
              f"scale {factors[0]:.4f}, shift {factors[1]:.4f}", flush=True)
    return encode_dataset(tok, source, root, data=spec, tokenizer_path=tok_dir, batch_size=128,
                          shard_size=512, resume=(root / MANIFEST).is_file(), progress=False, factors=factors)


def teacher_config(cache: Path, out: Path, args: argparse.Namespace):
    """The DiT flow-matching job on the latents at ``cache``."""
    from flowdistill.config import load_config_mapping

    every = args.every
    return load_config_mapping({
        "out_dir": str(out), "model": json.loads(args.model),
        "data": {"name": "tokenizer_latents", "root": str(cache), "conditional": False},
        "train": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": 100,
                  "lr_schedule": "constant", "ema_decay": 0.995, "log_every": every, "ckpt_every": every,
                  "keep_checkpoints": 1000, "seed": 0},
        "eval": {"nfe": [args.nfe], "n_samples": args.n, "solver": args.solver},
        "distiller": {"name": "flow_matching"}})


def student_config(cache: Path, teacher: Path, out: Path, args: argparse.Namespace):
    """FreeFlow of the teacher at ``teacher`` (data-free; the latents fix the shape and the eval)."""
    from flowdistill.config import load_config_mapping

    model = json.loads(args.model)
    return load_config_mapping({
        "out_dir": str(out), "teacher": str(teacher),
        "model": {"name": model["name"], "params": {"delta_time_scale": 5.0}},
        "data": {"name": "tokenizer_latents", "root": str(cache), "conditional": False},
        "train": {"steps": args.student_steps, "batch_size": 64, "lr": 3e-4, "warmup_steps": 50,
                  "lr_schedule": "cosine", "ema_decay": 0.99, "grad_clip": 1.0, "log_every": 50,
                  "ckpt_every": 100, "seed": 0},
        "eval": {"nfe": [1, 2, 4], "n_samples": args.n}, "distiller": FREEFLOW}, default_distiller="freeflow")


def train_or_resume(cfg) -> float:
    """Train the job ``cfg`` unless finished (resuming an interrupted run); wall seconds spent."""
    from flowdistill.api import train
    from flowdistill.recipes.runner import is_finished
    from flowdistill.runs import holds_run

    if is_finished(cfg):
        return 0.0
    t0 = time.perf_counter()
    train(cfg, resume=holds_run(Path(cfg.out_dir)))
    return time.perf_counter() - t0


class Scorer:
    """FID/KID of decoded samples against the digits test split, with per-seed floors."""

    def __init__(self, data, n: int, cache_dir: Path):
        from flowdistill.data.latent_cache import open_cache
        from flowdistill.data.registry import build_dataset, reference_images
        from flowdistill.eval.image_eval import sample_decoder

        self.decode = sample_decoder(data)
        real = reference_images(data, n)
        self.ref, self.n, self.cache_dir = real.reference, real.reference.shape[0], cache_dir
        self.ref_name = f"{real.name}-n{self.n}"
        self.train = build_dataset(open_cache(data.root).source_spec, "train")
        self._floors: dict[int, dict] = {}

    def metrics(self, images: torch.Tensor, seed: int) -> dict:
        """FID, KID of ``images`` (in [-1, 1]) vs the reference."""
        from flowdistill.eval.fid import compute_fid

        return compute_fid(images.clamp(-1, 1), self.ref, feature_extractor="digits", seed=seed,
                           cache_dir=self.cache_dir, reference_name=self.ref_name)

    def floor(self, seed: int) -> dict:
        """The metrics of ``n`` random real train images (subset seeded by ``seed``) vs the test split."""
        if seed not in self._floors:
            perm = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(seed))[:self.n]
            self._floors[seed] = self.metrics(self.train.get_many(perm)["x"], seed)
        return self._floors[seed]

    def recon(self, data, seed: int) -> dict:
        """rFID: the cached latents of the floor's ``n`` train images, decoded, vs the test split
        (the best FID a generator on these latents can reach in this protocol)."""
        from flowdistill.data.registry import build_dataset

        perm = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(seed))[:self.n]
        m = self.metrics(self.decode(build_dataset(data).get_many(perm)["x"]), seed)
        return {"rfid": m["fid"], "rkid": m["kid_mean"], "fid_floor": self.floor(seed)["fid"], "seed": seed}

    def score(self, sample, seed: int) -> dict:
        """``sample(n, seed)`` (latents) decoded and scored, with the floor of the same seed."""
        m = self.metrics(self.decode(sample(self.n, seed)), seed)
        f = self.floor(seed)
        return {"fid": m["fid"], "kid": m["kid_mean"], "fid_floor": f["fid"], "kid_floor": f["kid_mean"],
                "seed": seed, "n": self.n}


def checkpoint_student(run, step_dir: Path):
    """The run's exported student with the EMA weights of checkpoint ``step_dir``."""
    import copy

    from safetensors.torch import load_file

    net = copy.deepcopy(run.student)
    sd = load_file(str(step_dir / "ema.safetensors"))
    sd.pop("__ema_num_updates__", None)
    net.load_state_dict(sd)
    return net.eval()


def curve(label: str, run_dir: Path, args: argparse.Namespace, scorer: Scorer) -> list[dict]:
    """FID at every checkpoint of the teacher run (``--final-seeds`` seeds at the last one)."""
    from flowdistill.api import load_run
    from flowdistill.training.checkpoint import list_checkpoints

    run = load_run(run_dir)
    rows = []
    ckpts = list_checkpoints(run_dir / "checkpoints")
    for i, ck in enumerate(ckpts):
        step = int(ck.name.split("-")[1])
        net = checkpoint_student(run, ck)
        seeds = range(args.final_seeds) if i == len(ckpts) - 1 else range(1)
        for seed in seeds:
            r = scorer.score(lambda n, s, net=net: run.distiller.sample(
                _noise(run, n, s), args.nfe, model=net, solver=args.solver), 1000 + seed)
            rows.append({"tokenizer": label, "step": step, **r})
            print(f"{label} step {step} seed {seed}: FID {r['fid']:.3f} (floor {r['fid_floor']:.3f})",
                  flush=True)
    return rows


def _noise(run, n: int, seed: int) -> torch.Tensor:
    """Seeded prior noise of the run's sample shape."""
    from flowdistill.data.registry import sample_shape_of

    return torch.randn(n, *sample_shape_of(run.cfg.data), generator=torch.Generator().manual_seed(seed))


def mean_sd(vals: list[float]) -> str:
    """``mean ± sd`` (sd over seeds; 0 for one value)."""
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.fmean(vals):.3f} ± {sd:.3f}"


def plot(curves: list[dict], path: Path) -> None:
    """FID vs training steps, one line per tokenizer (mean over the seeds at each step, with the
    seeds' standard deviation as an error bar where there are several); the floor in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    labels = list(dict.fromkeys(r["tokenizer"] for r in curves))
    for label in labels:
        steps = sorted({r["step"] for r in curves if r["tokenizer"] == label})
        vals = [[r["fid"] for r in curves if r["tokenizer"] == label and r["step"] == s] for s in steps]
        ys = [statistics.fmean(v) for v in vals]
        err = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
        style = "-" if label.startswith("rectok") else "--"
        ax.errorbar(steps, ys, yerr=err, fmt=style, marker="o", capsize=3, label=label)
    floor = statistics.fmean({r["seed"]: r["fid_floor"] for r in curves}.values())
    ax.set_xlabel("teacher training steps")
    ax.set_ylabel("FID (digits features, n=360, decoded)")
    ax.legend()
    ax.set_title(f"latent DiT teacher: FID vs steps (real-vs-real floor {floor:.2f})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def curves_table(curves: list[dict]) -> str:
    """Markdown: FID per tokenizer and step (mean ± sd over seeds where several)."""
    steps = sorted({r["step"] for r in curves})
    labels = list(dict.fromkeys(r["tokenizer"] for r in curves))
    lines = ["| tokenizer | " + " | ".join(str(s) for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]
    for label in labels:
        cells = []
        for s in steps:
            v = [r["fid"] for r in curves if r["tokenizer"] == label and r["step"] == s]
            cells.append(mean_sd(v) if len(v) > 1 else (f"{v[0]:.3f}" if v else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    floors = list({r["seed"]: r["fid_floor"] for r in curves}.values())
    lines.append(f"\nfloor (360 train vs 360 test, {len(floors)} subsets): {mean_sd(floors)}")
    return "\n".join(lines)


def student_rows(label: str, teacher_dir: Path, student_dir: Path, args, scorer: Scorer) -> list[dict]:
    """The student at 1/2/4 steps and its teacher at ``--nfe``, ``--student-seeds`` seeds each."""
    from flowdistill.api import load_run

    rows = []
    teacher_nfes = [int(v) for v in args.teacher_nfes.split(",") if v] or [args.nfe]
    for name, run_dir, nfes, solver in (("teacher", teacher_dir, teacher_nfes, args.solver),
                                        ("freeflow", student_dir, [1, 2, 4], None)):
        run = load_run(run_dir)
        for nfe in nfes:
            for seed in range(args.student_seeds):
                r = scorer.score(lambda n, s, run=run, nfe=nfe, solver=solver: run.sample(
                    n, nfe, seed=s, **({"solver": solver} if solver else {})), 2000 + seed)
                rows.append({"tokenizer": label, "model": name, "nfe": nfe, **r})
                print(f"{label} {name} nfe {nfe} seed {seed}: FID {r['fid']:.3f} KID {r['kid']:.4f}",
                      flush=True)
    return rows


def student_table(rows: list[dict]) -> str:
    """Markdown: FID and KID (mean ± sd over seeds) per model and NFE, with the floors."""
    out = ["| model | NFE | FID | KID | FID floor | KID floor | seeds |", "|---|---|---|---|---|---|---|"]
    for key in dict.fromkeys((r["model"], r["nfe"]) for r in rows):
        sel = [r for r in rows if (r["model"], r["nfe"]) == key]
        out.append(f"| {key[0]} | {key[1]} | {mean_sd([r['fid'] for r in sel])} | "
                   f"{mean_sd([r['kid'] for r in sel])} | {mean_sd([r['fid_floor'] for r in sel])} | "
                   f"{mean_sd([r['kid_floor'] for r in sel])} | {len(sel)} |")
    return "\n".join(out)


def main() -> None:
    """Run the benchmark (module docstring)."""
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    toks = dict(item.split("=", 1) for item in args.tokenizers.split(",") if item)
    if args.only_plot:
        plot(json.loads((out / "curves.json").read_text()), Path(args.plot))
        return
    old = json.loads((out / "curves.json").read_text()) if (out / "curves.json").is_file() else []
    curves = [r for r in old if r["tokenizer"] not in toks]  # rows of tokenizers not rerun are kept
    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").is_file() else {}
    scorers: dict[str, Scorer] = {}
    recon = json.loads((out / "recon.json").read_text()) if (out / "recon.json").is_file() else {}
    for label, tok_dir in ({} if args.student_only else toks).items():
        t0 = time.perf_counter()
        cache = encode_cache(tok_dir, out / label / "cache")
        timings[f"{label}/encode"] = round(time.perf_counter() - t0, 1)
        cfg = teacher_config(cache, out / label / "teacher", args)
        timings[f"{label}/teacher"] = round(train_or_resume(cfg), 1)
        scorers[label] = Scorer(cfg.data, args.n, out / "fid_cache")
        recon[label] = scorers[label].recon(cfg.data, 1000)
        print(f"{label}: rFID {recon[label]['rfid']:.3f} (floor {recon[label]['fid_floor']:.3f})", flush=True)
        (out / "recon.json").write_text(json.dumps(recon, indent=1))
        curves += curve(label, out / label / "teacher", args, scorers[label])
        (out / "curves.json").write_text(json.dumps(curves, indent=1))
        (out / "curves.md").write_text(curves_table(curves) + "\n")
        plot(curves, Path(args.plot))
    if curves and not args.student_only:
        print(curves_table(curves))
    if args.student_of:
        label = args.student_of
        cache = out / label / "cache"
        cfg = student_config(cache, out / label / "teacher", out / label / "student", args)
        timings[f"{label}/student"] = round(train_or_resume(cfg), 1)
        if label not in scorers:
            scorers[label] = Scorer(cfg.data, args.n, out / "fid_cache")
        rows = student_rows(label, out / label / "teacher", out / label / "student", args, scorers[label])
        (out / "student.json").write_text(json.dumps(rows, indent=1))
        (out / "student.md").write_text(student_table(rows) + "\n")
        print(student_table(rows))
    (out / "timings.json").write_text(json.dumps(timings, indent=1))


if __name__ == "__main__":
    main()
