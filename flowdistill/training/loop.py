"""The one training loop (accelerate): any distiller, one CPU up to many processes.

Per step, for each of the distiller's parameter groups that is due, the loop draws the batch
(from the data source, or from the prior for data-free distillers), asks the distiller for its
losses, back-propagates, averages gradients across processes, clips, and steps that group's
optimiser. All randomness comes from :class:`~flowdistill.core.rng.StepRNG`, keyed by
``(seed, step, group, repeat)``, so a resumed run and a multi-process run reproduce a one-process
uninterrupted run. Gradients are averaged by an explicit flat all-reduce (DDP-equivalent), which
lets distillers run JVPs and several models without DDP wrappers (DESIGN.md §1).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from flowdistill.core.rng import StepRNG
from flowdistill.errors import ConfigError, TrainingDiverged
from flowdistill.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from flowdistill.training.ema import EMA
from flowdistill.training.metrics_log import MetricsLog


@dataclass
class TrainConfig:
    """Options of the training loop (shared by every distiller)."""

    steps: int = 2000
    batch_size: int = 512
    lr: float = 1e-3
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    mixed_precision: str = "no"  # no | bf16
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 500
    keep_checkpoints: int = 3
    plot_every: int = 0
    cpu: bool = False

    def validate(self) -> None:
        """Raise :class:`ConfigError` for values that cannot work."""
        if self.steps <= 0:
            raise ConfigError(f"train.steps must be positive, got {self.steps}")
        if self.batch_size <= 0:
            raise ConfigError(f"train.batch_size must be positive, got {self.batch_size}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        if self.mixed_precision not in ("no", "bf16"):
            raise ConfigError(f"train.mixed_precision must be 'no' or 'bf16' (fp16 needs loss scaling), "
                              f"got {self.mixed_precision!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"train.lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up then constant or cosine decay (to 0 at ``cfg.steps``)."""
    f = 1.0
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        f = (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        f *= 0.5 * (1 + math.cos(math.pi * min(step, cfg.steps) / cfg.steps))
    return f


class Trainer:
    """Drives a :class:`~flowdistill.distillers.base.Distiller` for ``cfg.steps`` steps."""

    def __init__(self, distiller: nn.Module, cfg: TrainConfig, run_dir: str | Path, source=None,
                 sample_shape: tuple[int, ...] | None = None, accelerator: Accelerator | None = None,
                 on_plot: Callable[[Trainer, int], None] | None = None):
        cfg.validate()
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.acc = accelerator or Accelerator(cpu=cfg.cpu, mixed_precision=cfg.mixed_precision)
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        if cfg.batch_size % self.world:
            raise ConfigError(f"train.batch_size {cfg.batch_size} is not divisible by {self.world} processes")
        self.local_batch = cfg.batch_size // self.world
        self.distiller = distiller.to(self.acc.device)
        if distiller.needs_data and source is None:
            raise ConfigError(f"distiller {distiller.name!r} needs a dataset")
        # Data-free distillers never receive a data source.
        self.source = source if distiller.needs_data else None
        if sample_shape is None:
            sample_shape = tuple(source.sample_shape) if source is not None else None
        if sample_shape is None:
            raise ConfigError("sample_shape is needed for a data-free distiller")
        self.sample_shape = sample_shape
        self.groups = distiller.optim_groups(cfg.lr)
        self.optims = {
            g.name: torch.optim.AdamW(g.params, lr=g.lr, betas=g.betas, weight_decay=g.weight_decay)
            for g in self.groups
        }
        self.ema = EMA(distiller.student, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.step = 0
        self.on_plot = on_plot
        self.is_main = self.acc.is_main_process
        self.log = MetricsLog(self.run_dir / "metrics.jsonl", enabled=self.is_main)

    # -- state -------------------------------------------------------------------------
    @property
    def ckpt_root(self) -> Path:
        """``run_dir/checkpoints``."""
        return self.run_dir / "checkpoints"

    def save(self) -> None:
        """Write an atomic checkpoint of the current step (main process only)."""
        if self.is_main:
            save_checkpoint(
                self.ckpt_root, self.step, self.distiller.trainable_state_dict(),
                {k: o.state_dict() for k, o in self.optims.items()},
                self.ema.state_dict() if self.ema is not None else None,
                keep=self.cfg.keep_checkpoints,
            )
        if self.world > 1:
            dist.barrier()

    def resume(self, path: Path | None = None) -> int:
        """Load the newest complete checkpoint (or ``path``); returns its step (0 if none)."""
        path = path or latest_checkpoint(self.ckpt_root)
        if path is None:
            return 0
        ck = load_checkpoint(path, map_location=self.acc.device)
        self.distiller.load_trainable_state_dict(ck["model"])
        for name, opt in self.optims.items():
            if name in ck["optim"]:
                opt.load_state_dict(ck["optim"][name])
        if self.ema is not None and ck["ema"] is not None:
            self.ema.load_state_dict(ck["ema"])
        self.step = ck["step"]
        self.log.truncate_after(self.step)
        return self.step

    # -- one step ----------------------------------------------------------------------
    def _sync_grads(self, params: list[nn.Parameter]) -> None:
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        off = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            p.grad = flat[off:off + n].view_as(p).clone()
            off += n

    def _batch(self, rng: StepRNG) -> dict:
        if self.source is not None:
            return self.source.batch(rng, self.local_batch)
        return self.distiller.prior_batch(rng, self.local_batch, self.sample_shape)

    def train_step(self) -> dict[str, float]:
        """One training step over every due parameter group."""
        logs: dict[str, float] = {}
        factor = lr_factor(self.step, self.cfg)
        self.distiller.train()
        for gi, g in enumerate(self.groups):
            if self.step % g.every:
                continue
            opt = self.optims[g.name]
            for pg in opt.param_groups:
                pg["lr"] = g.lr * factor
            for r in range(g.repeats):
                rng = StepRNG(self.cfg.seed, self.step, self.rank, self.world, self.acc.device,
                              tag=gi * 64 + r)
                batch = self._batch(rng)
                opt.zero_grad(set_to_none=True)
                with self.acc.autocast():
                    out = self.distiller.loss(batch, self.step, g.name, rng)
                loss = out["loss"]
                if not torch.isfinite(loss).all():
                    raise TrainingDiverged(
                        f"non-finite loss ({loss.item()}) in group {g.name!r} at step {self.step}; "
                        f"training stopped, last good checkpoint kept in {self.ckpt_root}")
                if not loss.requires_grad:
                    # nothing of this group is active at this step (e.g. a loss switched on later):
                    # no update, the same decision on every rank since it depends on the step only
                    continue
                loss.backward()
                self._sync_grads(g.params)
                if self.cfg.grad_clip > 0:
                    gn = torch.nn.utils.clip_grad_norm_(g.params, self.cfg.grad_clip)
                    logs[f"{g.name}/grad_norm"] = float(gn)
                opt.step()
            for k, v in out.items():
                key = k if len(self.groups) == 1 else f"{g.name}/{k}"
                logs[key] = float(v.detach())
        if self.ema is not None:
            self.ema.update(self.distiller.student)
        self.step += 1
        return logs

    def _reduce_logs(self, logs: dict[str, float]) -> dict[str, float]:
        if self.world == 1 or not logs:
            return logs
        keys = sorted(logs)
        t = torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=self.acc.device)
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist(), strict=True)}

    def fit(self) -> Trainer:
        """Train until ``cfg.steps``, logging, plotting and checkpointing on schedule."""
        cfg = self.cfg
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.is_main, desc="train",
                   dynamic_ncols=True)
        t0 = time.time()
        while self.step < cfg.steps:
            logs = self.train_step()
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                logs = self._reduce_logs(logs)
                rec = {"step": self.step, "lr": self.groups[0].lr * lr_factor(self.step - 1, cfg),
                       "elapsed_s": round(time.time() - t0, 3), **logs}
                self.log.write(rec)
                bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if "grad" not in k})
            if cfg.ckpt_every and (self.step % cfg.ckpt_every == 0 or self.step == cfg.steps):
                self.save()
            if self.on_plot is not None and cfg.plot_every and self.step % cfg.plot_every == 0 \
                    and self.is_main:
                self.on_plot(self, self.step)
        bar.close()
        return self

    def eval_student(self) -> nn.Module:
        """The student to sample and export: the EMA copy when EMA is on."""
        return self.ema.module if self.ema is not None else self.distiller.student
