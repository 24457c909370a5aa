"""Evaluate a trained run at several NFE: toy distances or digits FID, tables and plots."""

from __future__ import annotations

from pathlib import Path

from flowdistill.eval.sweep import toy_sweep, write_table

TOY_COLUMNS = ["model", "nfe", "sw2", "sw2_floor", "energy", "energy_floor", "n"]


def evaluate_run(run, nfes: list[int], n: int, out_dir: Path, seed: int = 1234,
                 solver: str | None = None) -> str:
    """NFE sweep of a :class:`~flowdistill.api.LoadedRun`; writes ``sweep.md/json`` and PNGs.

    The dataset comes from the registry by the run's own ``data`` spec: toy datasets get distances
    to their exact sampler, image datasets FID/KID against their reference images.
    """
    from flowdistill.data.registry import build_dataset, dataset_entry
    from flowdistill.eval.plots import metric_vs_nfe, scatter_grid

    entry = dataset_entry(run.cfg.data.name)  # the run's own dataset; unknown -> UnknownNameError
    label = run.cfg.distiller.name
    if entry.kind == "toy":
        ds = build_dataset(run.cfg.data).dataset  # the exact sampler behind the SamplerSource
        rows, samples = toy_sweep({label: lambda k, nfe, s: run.sample(k, nfe, seed=s, solver=solver)},
                                  {label: nfes}, ds, n, seed)
        md = write_table(rows, TOY_COLUMNS, out_dir)
        data, _ = ds.sample(n, __import__("torch").Generator().manual_seed(seed + 7))
        scatter_grid({"data": data, **{f"NFE {k}": v for k, v in samples[label].items()}},
                     out_dir / "samples.png")
        metric_vs_nfe({label: {r["nfe"]: r["sw2"] for r in rows}}, out_dir / "sw2_vs_nfe.png",
                      ylabel="sliced W2", floor=rows[0]["sw2_floor"])
        return md
    from flowdistill.eval.image_eval import evaluate_image_run

    return evaluate_image_run(run, nfes, n, out_dir, seed=seed, solver=solver)
