"""The one training loop (accelerate): any distiller, one CPU up to many processes.

Per step, for each of the distiller's parameter groups that is due, the loop takes the batch
(from a DataLoader over the data source, or from the prior for data-free distillers), asks the
distiller for its losses, back-propagates through the engine (``accelerator.backward``: DDP
averages the gradients, FSDP reduce-scatters them, fp16 scales the loss), clips with
``accelerator.clip_grad_norm_`` and steps that group's optimiser. ``train.grad_accum`` splits
each step's batch into micro-batches (gradient sync only on the last). All randomness is keyed by
``(seed, step, group, repeat, virtual rank)`` (:class:`~flowdistill.core.rng.StepRNG`,
:mod:`flowdistill.data.loader`), so a resumed run, a multi-process run and an accumulated run
reproduce a one-process uninterrupted run with the same global batch.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from torch import nn
from tqdm.auto import tqdm

from flowdistill.core.rng import StepRNG
from flowdistill.data.loader import BatchKey, make_loader, virtual_rank
from flowdistill.errors import ConfigError, TrainingDiverged
from flowdistill.training import engine
from flowdistill.training.checkpoint import (
    clean_temporaries,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from flowdistill.training.ema import EMA
from flowdistill.training.metrics_log import MetricsLog
from flowdistill.training.trackers import Trackers


@dataclass
class TrainConfig:
    """Options of the training loop (shared by every distiller)."""

    steps: int = 2000
    batch_size: int = 512  # global batch of one micro-step (all processes together)
    grad_accum: int = 1  # micro-steps per optimiser step: effective batch = batch_size · grad_accum
    lr: float = 1e-3
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    # auto (accelerate's setting: ACCELERATE_MIXED_PRECISION, set by `accelerate launch`, else no;
    # validate() replaces it by the precision it resolves to, so config.yaml records what the run
    # trains in) | no | bf16 | fp16 (fp16 scales the loss, CUDA only); an explicit value wins
    mixed_precision: str = "auto"
    distributed: str = "auto"  # auto | ddp | fsdp (how several processes share the nets)
    num_workers: int = 0  # DataLoader workers for data-based methods
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 500
    keep_checkpoints: int = 3
    plot_every: int = 0
    trackers: str = "auto"  # auto (tensorboard when installed) | none | tensorboard | wandb | comma list
    cpu: bool = False

    def validate(self) -> None:
        """Raise :class:`ConfigError` for values that cannot work; resolve ``mixed_precision=auto``."""
        for key in ("steps", "batch_size", "grad_accum", "lr"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"train.{key} must be positive, got {getattr(self, key)}")
        if self.num_workers < 0:
            raise ConfigError(f"train.num_workers must be >= 0, got {self.num_workers}")
        # "auto" -> accelerate's setting (or "no"), so the saved config says what the run trains in
        self.mixed_precision, origin = engine.resolve_mixed_precision(self.mixed_precision)
        if origin == engine.ACCELERATE_PRECISION_ENV:
            engine.check_precision_device(self.mixed_precision, origin, self.cpu)
        if self.distributed not in engine.DISTRIBUTED:
            raise ConfigError(f"train.distributed must be one of {', '.join(engine.DISTRIBUTED)}, "
                              f"got {self.distributed!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"train.lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")


def to_device(batch, device):
    """``batch`` (tensors, possibly in nested dicts: a text condition's embeddings) moved to ``device``."""
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch.to(device, non_blocking=True) if isinstance(batch, torch.Tensor) else batch


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up then constant or cosine decay (to 0 at ``cfg.steps``)."""
    f = 1.0
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        f = (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        f *= 0.5 * (1 + math.cos(math.pi * min(step, cfg.steps) / cfg.steps))
    return f


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


def _progress_line(stream: TextIO, step: int, steps: int, logs: dict[str, float], done: int,
                   seconds: float, elapsed: float) -> None:
    """One plain progress line (what a non-terminal gets instead of tqdm's ``\\r`` updates)."""
    rate = f"{done / seconds:.3g} it/s" if seconds > 0 and done > 0 else "- it/s"
    vals = " ".join(f"{k}={v:.4g}" for k, v in logs.items())
    print(f"train {step}/{steps} ({100 * step / steps:.0f}%) {vals} [{rate}, elapsed {elapsed:.1f}s]",
          file=stream, flush=True)


class Trainer:
    """Drives a :class:`~flowdistill.distillers.base.Distiller` for ``cfg.steps`` steps."""

    def __init__(self, distiller: nn.Module, cfg: TrainConfig, run_dir: str | Path, source=None,
                 sample_shape: tuple[int, ...] | None = None, accelerator=None,
                 on_plot: Callable[[Trainer, int], None] | None = None, tracker_config: dict | None = None,
                 constant_keys: frozenset[str] = frozenset()):
        """``constant_keys``: state-dict keys of tensors that never change in training (the frozen base
        weights of a LoRA student, rebuilt from the teacher): checkpoints leave them out and a resume
        keeps the values the distiller was built with (unsharded runs)."""
        cfg.validate()
        self.constant_keys = frozenset(constant_keys)
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.trackers = Trackers(cfg.trackers, self.run_dir)
        self.acc = accelerator or engine.build_accelerator(
            cfg.cpu, cfg.mixed_precision, cfg.distributed, log_with=self.trackers.log_with,
            project_dir=str(self.run_dir))
        #: the precision the run trains in (``train.mixed_precision``, or accelerate's setting for auto)
        self.mixed_precision = str(self.acc.mixed_precision)
        self.world, self.rank = self.acc.num_processes, self.acc.process_index
        if cfg.batch_size % self.world:
            raise ConfigError(f"train.batch_size {cfg.batch_size} is not divisible by {self.world} processes")
        self.local_batch = cfg.batch_size // self.world
        self.distiller = distiller.to(self.acc.device)
        own = distiller.batch_source()
        if own is None and distiller.needs_data and source is None:
            raise ConfigError(f"distiller {distiller.name!r} needs a dataset")
        # Data-free distillers never receive the job's dataset, except a condition-only one (its
        # items hold "cond" alone, e.g. prompt embeddings): its conditions join the prior batch.
        self.source = own if own is not None else (source if distiller.needs_data else None)
        self.cond_source = source if (self.source is None and source is not None
                                      and getattr(source, "condition_only", False)) else None
        if sample_shape is None:
            sample_shape = tuple(self.source.sample_shape) if self.source is not None else None
        if sample_shape is None:
            raise ConfigError("sample_shape is needed for a data-free distiller")
        if self.source is not None and getattr(self.source, "condition_only", False):
            raise ConfigError(f"distiller {distiller.name!r} trains on data, but the dataset holds "
                              f"conditions only (no samples): use a dataset with samples (e.g. latents)")
        if self.source is not None and tuple(self.source.sample_shape) != tuple(sample_shape):
            raise ConfigError(f"the data source has sample shape {list(self.source.sample_shape)}, "
                              f"but the job's data {list(sample_shape)}")
        self.sample_shape = tuple(sample_shape)
        self.is_main = self.acc.is_main_process
        # EMA of the full (unsharded) student, taken before any sharding
        self.ema = EMA(distiller.student, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.groups = distiller.optim_groups(cfg.lr)
        nets = distiller.trainable_nets()
        self._check_groups(nets)

        def make_optims():  # after any sharding: FSDP2 replaces the parameters, so ask again
            self.groups = distiller.optim_groups(cfg.lr)
            return {g.name: torch.optim.AdamW(g.params, lr=g.lr, betas=g.betas, weight_decay=g.weight_decay)
                    for g in self.groups}

        self.engine = engine.prepare_nets(self.acc, cfg.distributed, nets, make_optims)
        distiller.attach_engine(self.engine.nets)
        self.optims = self.engine.optims
        self._group_nets = {g.name: [n for n in nets if self._owns(nets[n], g.params)] for g in self.groups}
        self.step = 0
        self.elapsed_before = 0.0  # training seconds of the run before this process (from the checkpoint)
        self._t0: float | None = None
        self.on_plot = on_plot
        self.log = MetricsLog(self.run_dir / "metrics.jsonl", enabled=self.is_main)
        self._tracker_config = tracker_config or {}
        self._batches: Iterator | None = None

    @staticmethod
    def _owns(net: nn.Module, params: list[nn.Parameter]) -> bool:
        mine = {id(p) for p in net.parameters()}
        return any(id(p) in mine for p in params)

    def _check_groups(self, nets: dict[str, nn.Module]) -> None:
        known = {id(p) for n in nets.values() for p in n.parameters()}
        for g in self.groups:
            if any(id(p) not in known for p in g.params):
                raise ConfigError(f"optimiser group {g.name!r} holds parameters outside the distiller's "
                                  f"trainable_nets() ({', '.join(nets)})")

    # -- state -------------------------------------------------------------------------
    @property
    def ckpt_root(self) -> Path:
        """``run_dir/checkpoints``."""
        return self.run_dir / "checkpoints"

    def _model_state(self) -> dict[str, torch.Tensor]:
        if not self.engine.sharded:
            state = self.distiller.trainable_state_dict()
            return {k: v for k, v in state.items() if k not in self.constant_keys}
        out = {}
        for name, net in self.engine.nets.items():
            out.update({f"{name}.{k}": v for k, v in engine.gather_net_state(net, True).items()})
        return out

    def _optim_states(self) -> dict[str, dict]:
        out = {}
        for g in self.groups:
            nets = self._group_nets[g.name]
            net = self.engine.nets[nets[0]] if nets else None
            out[g.name] = engine.gather_optim_state(net, self.optims[g.name], self.engine.sharded)
        return out

    def save(self) -> None:
        """Write an atomic checkpoint of the current step (gathered by every rank, written by rank 0)."""
        model, optim = self._model_state(), self._optim_states()
        if self.is_main:
            save_checkpoint(self.ckpt_root, self.step, model, optim,
                            self.ema.state_dict() if self.ema is not None else None,
                            extra={"world": self.world, "batch_size": self.cfg.batch_size,
                                   "grad_accum": self.cfg.grad_accum, "elapsed_s": round(self.elapsed(), 3),
                                   "mixed_precision": self.mixed_precision},
                            keep=self.cfg.keep_checkpoints)
        self.acc.wait_for_everyone()

    def resume(self, path: Path | None = None) -> int:
        """Load the newest complete checkpoint (or ``path``); returns its step (0 if none).

        Temporary directories of a killed checkpoint write are removed, and ``metrics.jsonl`` is
        cut back to the step it restarts from (step 0 when no complete checkpoint exists). The
        run's training time so far (``elapsed_s``) continues from the checkpoint's.
        """
        path = path or latest_checkpoint(self.ckpt_root)
        if path is None:
            self._clean()
            self.step = 0
            self.elapsed_before = 0.0
            self.log.truncate_after(0)
            self._batches = None
            return 0
        ck = load_checkpoint(path, map_location="cpu")
        if self.engine.sharded:
            for name, net in self.engine.nets.items():
                pre = f"{name}."
                engine.load_net_state(net, {k[len(pre):]: v for k, v in ck["model"].items()
                                            if k.startswith(pre)}, True)
        else:
            dev = self.acc.device
            kept = {k: v for k, v in self.distiller.trainable_state_dict().items() if k in self.constant_keys}
            saved = {k: v.to(dev) for k, v in ck["model"].items()}
            self.distiller.load_trainable_state_dict({**kept, **saved})
        for g in self.groups:
            if g.name in ck["optim"]:
                nets = self._group_nets[g.name]
                net = self.engine.nets[nets[0]] if nets else None
                engine.load_optim_state(net, self.optims[g.name], ck["optim"][g.name], self.engine.sharded)
        if self.ema is not None and ck["ema"] is not None:
            self.ema.load_state_dict({k: v.to(self.acc.device) for k, v in ck["ema"].items()})
        self.step = ck["step"]
        self.elapsed_before = float(ck["state"].get("elapsed_s", 0.0))  # 0 for checkpoints from before it
        self._clean()
        self.log.truncate_after(self.step)
        self._batches = None
        return self.step

    def _clean(self) -> None:
        """Remove a killed write's temporary checkpoint directories (rank 0), once the resume point
        is known to load (a failed resume changes nothing)."""
        if self.is_main:
            clean_temporaries(self.ckpt_root)
        self.acc.wait_for_everyone()

    # -- batches -----------------------------------------------------------------------
    def _keys(self, start: int) -> Iterator[BatchKey]:
        """Every data batch the loop will take from step ``start`` on, in the order it takes them."""
        a = self.cfg.grad_accum
        for step in range(start, self.cfg.steps):
            for gi, g in enumerate(self.groups):
                if step % g.every:
                    continue
                for r in range(g.repeats):
                    for j in range(a):
                        vr, vw = virtual_rank(self.rank, self.world, j, a)
                        yield BatchKey(step, gi * 64 + r, vr, vw, self.local_batch)

    def _next_data(self, key: BatchKey) -> dict[str, torch.Tensor]:
        if self._batches is None:
            source = self.source if self.source is not None else self.cond_source
            loader = make_loader(source, self._keys(self.step), self.cfg.seed, self.cfg.num_workers)
            self._batches = iter(zip(self._keys(self.step), loader, strict=False))
        want, batch = next(self._batches)
        if want != key:  # the loop and its key list disagree: a bug, never silently wrong data
            raise RuntimeError(f"data loader out of step: expected {key}, loader served {want}")
        return to_device(batch, self.acc.device)

    def _batch(self, rng: StepRNG, key: BatchKey) -> dict:
        """The batch of ``key``: the dataset's, or the prior's (data-free methods) with the
        condition-only dataset's ``cond`` of the same key merged in (deterministic per key, so
        resumed and multi-process runs see the same conditions)."""
        if self.source is not None:
            return self._next_data(key)
        batch = self.distiller.prior_batch(rng, self.local_batch, self.sample_shape)
        if self.cond_source is not None:
            batch["cond"] = self._next_data(key)["cond"]
        return batch

    # -- one step ----------------------------------------------------------------------
    def _no_sync(self, group: str, last: bool):
        stack = contextlib.ExitStack()
        if not last:
            for n in self._group_nets[group]:
                stack.enter_context(self.acc.no_sync(self.engine.nets[n]))
        return stack

    def train_step(self) -> dict[str, float]:
        """One training step over every due parameter group."""
        logs: dict[str, float] = {}
        factor = lr_factor(self.step, self.cfg)
        a = self.cfg.grad_accum
        self.distiller.train()
        for gi, g in enumerate(self.groups):
            if self.step % g.every:
                continue
            opt = self.optims[g.name]
            for pg in opt.param_groups:
                pg["lr"] = g.lr * factor
            for r in range(g.repeats):
                opt.zero_grad(set_to_none=True)
                active = False
                sums: dict[str, float] = {}
                for j in range(a):
                    vr, vw = virtual_rank(self.rank, self.world, j, a)
                    rng = StepRNG(self.cfg.seed, self.step, vr, vw, self.acc.device, tag=gi * 64 + r)
                    batch = self._batch(rng, BatchKey(self.step, gi * 64 + r, vr, vw, self.local_batch))
                    with self._no_sync(g.name, last=j == a - 1), self.acc.autocast():
                        out = self.distiller.loss(batch, self.step, g.name, rng)
                        loss = out["loss"]
                        if not torch.isfinite(loss).all():
                            raise TrainingDiverged(
                                f"non-finite loss ({loss.item()}) in group {g.name!r} at step {self.step}; "
                                f"training stopped, last good checkpoint kept in {self.ckpt_root}")
                        if loss.requires_grad:
                            # nothing of this group may be active at this step (a loss switched on
                            # later): then no update, the same decision on every rank
                            self.acc.backward(loss / a)
                            active = True
                    for k, v in out.items():
                        sums[k] = sums.get(k, 0.0) + float(v.detach()) / a
                if active:
                    params = [p for pg in opt.param_groups for p in pg["params"]]
                    if self.cfg.grad_clip > 0:
                        gn = self.acc.clip_grad_norm_(params, self.cfg.grad_clip)
                        logs[f"{g.name}/grad_norm"] = float(engine.full_tensor(gn))
                    opt.step()
                    self.distiller.after_step(self.step, g.name)
            for k, v in sums.items():
                logs[k if len(self.groups) == 1 else f"{g.name}/{k}"] = v
        if self.ema is not None:
            self.ema.update(self.distiller.student)
        self.step += 1
        return logs

    def _reduce_logs(self, logs: dict[str, float]) -> dict[str, float]:
        if self.world == 1 or not logs:
            return logs
        keys = sorted(logs)
        t = torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=self.acc.device)
        t = self.acc.reduce(t, reduction="mean")
        return {k: float(v) for k, v in zip(keys, t.tolist(), strict=True)}

    def elapsed(self) -> float:
        """Seconds of training in this run: this process's ``fit`` so far plus what the checkpoint it
        resumed from had recorded (``metrics.jsonl``'s ``elapsed_s``)."""
        return self.elapsed_before + (time.time() - self._t0 if self._t0 is not None else 0.0)

    def fit(self, progress: TextIO | None = None) -> Trainer:
        """Train until ``cfg.steps``, logging, plotting and checkpointing on schedule.

        The run directory is created if it does not exist (``metrics.jsonl``, ``checkpoints/``).
        Progress goes to ``progress`` (default ``sys.stderr``) on the main process: a tqdm bar when
        it is a terminal, else one plain line every ``train.log_every`` steps (and at the end), so
        a log file or pipe gets readable lines instead of one long line of ``\\r`` updates.
        """
        cfg = self.cfg
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.acc.wait_for_everyone()
        self.trackers.start(self.acc, self._tracker_config)
        stream = progress if progress is not None else sys.stderr
        progress_bar = _isatty(stream)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (self.is_main and progress_bar),
                   desc="train", dynamic_ncols=True, file=stream)
        self._t0 = time.time()
        first_step = self.step
        try:
            while self.step < cfg.steps:
                logs = self.train_step()
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    logs = self._reduce_logs(logs)
                    rec = {"step": self.step, "lr": self.groups[0].lr * lr_factor(self.step - 1, cfg),
                           "elapsed_s": round(self.elapsed(), 3), **logs}
                    rec = self.log.write(rec)  # every record with the same keys (None: not measured)
                    self.trackers.log(self.acc, rec, self.step)
                    shown = {k: v for k, v in logs.items() if "grad" not in k and v is not None}
                    if progress_bar:
                        bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()})
                    elif self.is_main:
                        _progress_line(stream, self.step, cfg.steps, shown, self.step - first_step,
                                       time.time() - self._t0, rec["elapsed_s"])
                if cfg.ckpt_every and (self.step % cfg.ckpt_every == 0 or self.step == cfg.steps):
                    self.save()
                if self.on_plot is not None and cfg.plot_every and self.step % cfg.plot_every == 0 \
                        and self.is_main and (self.ema is not None or not self.engine.sharded):
                    # (a sharded student without EMA is gathered only at the end: a collective)
                    image = self.on_plot(self, self.step)
                    if image is not None:
                        self.trackers.log_image(self.acc, "samples", image, self.step)
        finally:
            bar.close()  # an error's line then starts on its own line, not after the bar
            self.elapsed_before, self._t0 = self.elapsed(), None
            self.trackers.end(self.acc)
        return self

    def eval_student(self, fresh: Callable[[], nn.Module] | None = None) -> nn.Module:
        """The student to sample and export: the EMA copy when EMA is on (else the full student,
        gathered from its shards under FSDP — a collective: call it on every rank — into ``fresh()``
        or, by default, a ``from_config`` instance of the student's class)."""
        if self.ema is not None:
            return self.ema.module
        if not self.engine.sharded:
            return self.distiller.student
        state = engine.gather_net_state(self.engine.nets["student"], True)
        if not self.is_main:
            return self.distiller.student
        return engine.unsharded_copy(self.distiller.student, state, fresh)
