"""The distributed engine under the training loop: accelerate's DDP, FSDP2, mixed precision.

:func:`build_accelerator` makes the :class:`accelerate.Accelerator` a run asks for;
:func:`prepare_nets` wraps every trainable net of a distiller and their optimisers —
``accelerator.prepare`` (DDP on several processes, FSDP2 when ``train.distributed=fsdp`` on GPUs) —
so gradients are averaged by the engine, never by hand. accelerate runs several CPU processes
as DDP only (it does not offer FSDP on CPU); there ``train.distributed=fsdp`` applies torch's own
FSDP2 (``torch.distributed.fsdp.fully_shard``, the engine accelerate uses on GPUs) to each net's
top-level blocks and the net, and accelerate still prepares the optimisers. The state helpers
gather full (unsharded) weights and optimiser state for checkpoints and load them back, the same
code for one process, DDP and FSDP.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from torch import nn

from flowdistill.errors import ConfigError

DISTRIBUTED = ("auto", "ddp", "fsdp")
PRECISIONS = ("no", "bf16", "fp16")
#: What ``train.mixed_precision`` may say: a precision, or ``auto`` (accelerate's own setting).
CONFIG_PRECISIONS = ("auto", *PRECISIONS)
#: The variable ``accelerate launch`` sets from ``--mixed_precision`` or the ``accelerate config`` file.
ACCELERATE_PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"


def normalize_precision(value: object) -> str:
    """``train.mixed_precision`` as written: YAML reads an unquoted ``no`` as false (``False``,
    stored as the string ``"False"``), which means ``no``."""
    text = str(value).strip()
    return "no" if text.lower() in ("false", "no") else text


def resolve_mixed_precision(requested: str) -> tuple[str, str]:
    """The precision to train in and where it came from: ``(precision, "train.mixed_precision")``.

    An explicit ``no``/``bf16``/``fp16`` wins. ``auto`` (the config default) takes the user's
    accelerate setting — :data:`ACCELERATE_PRECISION_ENV`, which ``accelerate launch`` sets from
    ``--mixed_precision`` or from the file ``accelerate config`` wrote — and ``no`` when it is unset.
    A setting flowdistill does not train in (e.g. ``fp8``) is a :class:`ConfigError`.
    """
    requested = normalize_precision(requested)
    if requested not in CONFIG_PRECISIONS:
        raise ConfigError(f"train.mixed_precision must be one of {', '.join(CONFIG_PRECISIONS)}, "
                          f"got {requested!r}")
    if requested != "auto":
        return requested, "train.mixed_precision"
    env = os.environ.get(ACCELERATE_PRECISION_ENV, "").strip().lower()
    if not env:
        return "no", "default"
    if env not in PRECISIONS:
        raise ConfigError(f"{ACCELERATE_PRECISION_ENV}={env} (accelerate's mixed precision) is not one of "
                          f"{', '.join(PRECISIONS)}; set train.mixed_precision explicitly")
    return env, ACCELERATE_PRECISION_ENV


def check_precision_device(precision: str, origin: str, cpu: bool) -> None:
    """fp16 trains only on CUDA: on the CPU accelerate neither casts to fp16 nor scales the loss, so
    the run would silently be fp32. ``origin`` (from :func:`resolve_mixed_precision`) is named."""
    if precision == "fp16" and (cpu or not torch.cuda.is_available()):
        where = "" if origin == "train.mixed_precision" else f" ({origin}=fp16, train.mixed_precision=auto)"
        raise ConfigError(f"train.mixed_precision=fp16 needs CUDA{where}: on the CPU accelerate neither "
                          "casts to fp16 nor scales the loss (it would silently train in fp32): use bf16/no")


def build_accelerator(cpu: bool, mixed_precision: str, distributed: str, log_with: list[str] | None = None,
                      project_dir: str | None = None) -> Accelerator:
    """An Accelerator for ``distributed`` (``auto``/``ddp``: DDP when launched on several processes).

    ``mixed_precision`` is ``train.mixed_precision``; ``auto`` follows accelerate's own setting
    (:func:`resolve_mixed_precision`)."""
    if distributed not in DISTRIBUTED:
        raise ConfigError(f"train.distributed must be one of {', '.join(DISTRIBUTED)}, got {distributed!r}")
    mixed_precision, origin = resolve_mixed_precision(mixed_precision)
    check_precision_device(mixed_precision, origin, cpu)
    on_cuda = not cpu and torch.cuda.is_available()
    kw = {}
    if distributed == "fsdp" and on_cuda:
        from accelerate import FullyShardedDataParallelPlugin

        kw["fsdp_plugin"] = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True)
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision, log_with=log_with or None,
                       project_dir=project_dir, **kw)


def uses_fsdp(acc: Accelerator, distributed: str) -> bool:
    """Whether nets are sharded (FSDP through accelerate on GPUs, torch FSDP2 on CPU processes)."""
    return distributed == "fsdp" and acc.num_processes > 1


def _shard_cpu(net: nn.Module) -> nn.Module:
    """torch FSDP2 on gloo: shard each top-level child that holds parameters, then the net."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    blocks = []
    for child in net.children():  # containers without forward (ModuleList/Dict) shard their items
        blocks.extend(child.values() if isinstance(child, nn.ModuleDict)
                      else child if isinstance(child, nn.ModuleList) else [child])
    for block in blocks:
        if any(p.requires_grad for p in block.parameters()):
            fully_shard(block, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


@dataclass
class Prepared:
    """The engine's view of a distiller's trainable nets and optimisers."""

    nets: dict[str, nn.Module]            # name -> wrapped (DDP) or sharded (FSDP) module
    optims: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    sharded: bool = False


def prepare_nets(acc: Accelerator, distributed: str, nets: dict[str, nn.Module],
                 make_optims) -> Prepared:
    """Wrap ``nets`` and the optimisers ``make_optims()`` builds (called after any sharding, so
    they hold the sharded parameters) through the engine."""
    sharded = uses_fsdp(acc, distributed)
    names = list(nets)
    if sharded and acc.distributed_type.name == "MULTI_CPU":
        for n in names:
            _shard_cpu(nets[n])
        optims = make_optims()
        keys = list(optims)
        out = acc.prepare(*optims.values())
        out = out if isinstance(out, tuple) else (out,)
        return Prepared(dict(nets), dict(zip(keys, out, strict=True)), sharded=True)
    optims = make_optims()
    keys = list(optims)
    out = acc.prepare(*[nets[n] for n in names], *optims.values())
    out = out if isinstance(out, tuple) else (out,)
    wrapped = dict(zip(names, out[:len(names)], strict=True))
    return Prepared(wrapped, dict(zip(keys, out[len(names):], strict=True)), sharded=sharded)


def _options(full: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=True)


def gather_net_state(net: nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """Full state of a (possibly sharded) net; on FSDP only rank 0 receives it (others: ``{}``)."""
    from flowdistill.core.derivatives import unwrap

    if not sharded:
        return unwrap(net).state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(net, options=_options())


def gather_optim_state(net: nn.Module, optim: torch.optim.Optimizer, sharded: bool) -> dict:
    """Full optimiser state (rank 0 only under FSDP)."""
    if not sharded:
        return optim.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(net, _inner(optim), options=_options())


def load_net_state(net: nn.Module, state: dict[str, torch.Tensor], sharded: bool) -> None:
    """Load full ``state`` into a (possibly sharded) net; every rank passes the full state."""
    from flowdistill.core.derivatives import unwrap

    if not sharded:
        unwrap(net).load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(net, state, options=_options())


def load_optim_state(net: nn.Module, optim: torch.optim.Optimizer, state: dict, sharded: bool) -> None:
    """Load full optimiser ``state`` (every rank passes it)."""
    if not sharded:
        optim.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(net, _inner(optim), state, options=_options())


def _inner(optim: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optim, "optimizer", optim)  # accelerate's AcceleratedOptimizer wraps the real one


def full_tensor(p: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (an all-gather); any other tensor as it is."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def unsharded_copy(module: nn.Module, state: dict[str, torch.Tensor],
                   fresh: Callable[[], nn.Module] | None = None) -> nn.Module:
    """A fresh, unsharded instance of ``module`` holding ``state``: ``fresh()`` when given (a module
    without a diffusers config, e.g. a LoRA'd pipeline denoiser, is rebuilt by its job), else its
    class's ``from_config``."""
    fresh = fresh() if fresh is not None else type(module).from_config(module.config)
    fresh.load_state_dict(state)
    return fresh.eval()
