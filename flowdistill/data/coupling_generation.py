"""Generate teacher couplings ``(ε, x = ODE_T(ε; 1 → 0), c)`` into a sharded, resumable store.

Step 1 of reflow (Rectified Flow, Liu et al. 2022; InstaFlow, arXiv 2309.06380; rfpp,
arXiv 2405.20320): draw noise (and conditions), integrate the — optionally guided — teacher ODE
accurately from ``t = 1`` to ``t = 0``, and keep the pairs. This module solves a ready velocity
field; :func:`flowdistill.api.couple` builds it from a job — the teacher guided as the job's
``guidance:`` section says (:mod:`flowdistill.models.teachers`, the same field a distillation job's
teacher is), e.g. the ODE of ``v_∅ + w·(v_c − v_∅)`` for CFG — and the teacher's identity and
guidance are recorded in the store's header, so a store made from another teacher or with other
guidance is refused on resume. The papers use about a million pairs (CIFAR-10), so generation is
split across processes and survives being killed.

**Process-count independence.** Shard ``k``'s noise and conditions come from a CPU generator
seeded by ``shard_seed(seed, k)`` alone, and the ODE is solved in fixed chunks of ``chunk_size``
pairs *within* the shard. Nothing depends on which process solves it or how many there are, so
1 and N processes give byte-identical stores (on the same hardware and thread settings). Note that
``dopri5``'s step-size control uses one error norm for the whole chunk, so a pair's trajectory
depends on the other pairs of its chunk (within the tolerance) — another reason chunks are fixed.

**Sharding.** Process ``r`` of ``W`` writes shards ``k ≡ r (mod W)``; each shard is written
atomically and then added to the manifest under a lock (:mod:`flowdistill.data.couplings`).
**Resume** re-reads the manifest, keeps every listed shard whose checksum still matches, and
regenerates the rest; the settings must match the stored header (``n_pairs`` may grow).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from torch import Tensor, nn
from tqdm.auto import tqdm

from flowdistill.core.guidance import GuidanceSpec
from flowdistill.core.sampling import sample_velocity
from flowdistill.core.solvers import SOLVERS, solve
from flowdistill.core.timesteps import TIME_GRIDS
from flowdistill.data.couplings import (
    FORMAT,
    MANIFEST,
    STORAGE_DTYPES,
    CouplingError,
    add_shard,
    drop_shards,
    file_sha256,
    num_shards,
    read_manifest,
    shard_count,
    shard_name,
    shard_seed,
    update_manifest,
    write_manifest,
    write_shard,
)
from flowdistill.errors import ConfigError


@dataclass
class CoupleSpec:
    """How to generate a coupling store (the ``couple`` section of reflow/InstaFlow configs).

    ``solver``: ``dopri5`` (adaptive, ``rtol``/``atol``) or a fixed-step solver with ``nfe``
    evaluations on ``grid``. ``uncond_share`` of the pairs of a class-conditional teacher get the
    null label (so the student also learns the unguided flow); the teacher's guidance is the job's
    ``guidance:`` section, not a setting of this one. ``storage_dtype`` of the stored noise and
    samples (``float16``/``bfloat16`` halve the disk at scale; the stored — rounded — noise is what
    training pairs with the sample).
    """

    n_pairs: int = 20000
    shard_size: int = 5000
    chunk_size: int = 5000
    solver: str = "dopri5"
    nfe: int = 256
    grid: str = "uniform"
    rtol: float = 1e-5
    atol: float = 1e-5
    seed: int = 0
    uncond_share: float = 0.0
    storage_dtype: str = "float32"
    cpu: bool = False

    def validate(self) -> None:
        """Ranges and registered names, each error naming its key."""
        for key in ("n_pairs", "shard_size", "chunk_size", "nfe"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"couple.{key} must be positive, got {getattr(self, key)}")
        if self.solver not in SOLVERS:
            raise ConfigError(f"couple.solver: unknown solver {self.solver!r}; available: "
                              f"{', '.join(SOLVERS.names())}")
        if self.grid not in TIME_GRIDS:
            raise ConfigError(f"couple.grid: unknown time grid {self.grid!r}; available: "
                              f"{', '.join(TIME_GRIDS.names())}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ConfigError(f"couple.storage_dtype must be one of {', '.join(STORAGE_DTYPES)}, "
                              f"got {self.storage_dtype!r}")
        if not 0.0 <= self.uncond_share <= 1.0:
            raise ConfigError(f"couple.uncond_share must be in [0, 1], got {self.uncond_share}")
        if self.rtol <= 0 or self.atol <= 0:
            raise ConfigError("couple.rtol and couple.atol must be positive")

    def generation_header(self) -> dict:
        """The settings that fix the pairs (must match when a store is resumed)."""
        d = asdict(self)
        for k in ("n_pairs", "shard_size", "seed", "storage_dtype", "cpu"):
            d.pop(k)
        if self.solver == "dopri5":
            d.pop("nfe"), d.pop("grid")
        else:
            d.pop("rtol"), d.pop("atol")
        return d


@torch.no_grad()
def solve_teacher(field: nn.Module, noise: Tensor, cond: Tensor | None, spec: CoupleSpec) -> Tensor:
    """``ODE_T(noise; 1 → 0)`` with the spec's solver (``dopri5`` with its tolerances, or fixed-step)."""
    if spec.solver == "dopri5":
        grid = torch.tensor([1.0, 0.0], dtype=torch.float64)
        return solve(field, noise, grid, "dopri5", cond=cond, rtol=spec.rtol, atol=spec.atol).x
    return sample_velocity(field, noise, spec.nfe, spec.solver, spec.grid, cond=cond).x


def shard_inputs(spec: CoupleSpec, index: int, sample_shape: tuple[int, ...],
                 num_classes: int) -> tuple[Tensor, Tensor | None]:
    """Noise ``[count, *shape]`` and conditions ``[count]`` of shard ``index``, from its own seed."""
    g = torch.Generator().manual_seed(shard_seed(spec.seed, index))
    count = shard_count(index, spec.n_pairs, spec.shard_size)
    noise = torch.randn(count, *sample_shape, generator=g)
    cond = None
    if num_classes > 0:
        cond = torch.randint(num_classes, (count,), generator=g)
        if spec.uncond_share > 0:
            null = torch.rand(count, generator=g) < spec.uncond_share
            cond = torch.where(null, torch.full_like(cond, num_classes), cond)
    return noise, cond


def _header(spec: CoupleSpec, identity: dict, sample_shape: tuple[int, ...], num_classes: int) -> dict:
    return {
        "format": FORMAT, "teacher": str(identity["teacher"]), "teacher_sha256": identity["teacher_sha256"],
        "teacher_state_sha256": identity["teacher_state_sha256"], "seed": spec.seed, "n_pairs": spec.n_pairs,
        "shard_size": spec.shard_size, "sample_shape": list(sample_shape), "dtype": spec.storage_dtype,
        "conditional": num_classes > 0, "num_classes": num_classes,
        "generation": spec.generation_header(), "guidance": identity.get("guidance", {}), "shards": [],
        "complete": False,
    }


_FIXED = ("format", "teacher_sha256", "teacher_state_sha256", "seed", "shard_size", "sample_shape", "dtype",
          "conditional", "num_classes", "generation", "guidance")


def _upgrade_manifest(man: dict) -> dict:
    """A store written before the ``guidance:`` section kept ``generation.guidance_scale``: read it
    as the equivalent ``guidance`` header (so an unguided old store still resumes)."""
    gen = man.get("generation")
    if "guidance" in man or not isinstance(gen, dict) or "guidance_scale" not in gen:
        return man
    old = GuidanceSpec(scale=float(gen["guidance_scale"]))
    gen = {k: v for k, v in gen.items() if k != "guidance_scale"}
    return {**man, "generation": gen, "guidance": old.header()}


def _check_resumable(root: Path, header: dict, resume: bool, overwrite: bool) -> dict | None:
    """Read-only checks (run on every process): the existing manifest, or None for a fresh store."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    exists = (root / MANIFEST).is_file()
    if not exists:
        if resume:
            raise CouplingError(f"--resume: {root} holds no coupling store to resume")
        if root.is_dir() and any(root.glob("shard-*.safetensors")) and not overwrite:
            raise CouplingError(f"{root} holds coupling shards but no manifest; "
                                f"pass --overwrite to replace them")
        return None
    if overwrite:
        return None
    if not resume:
        raise CouplingError(f"{root} already holds couplings; pass --resume to continue them "
                            f"or --overwrite to replace them")
    man = _upgrade_manifest(read_manifest(root))
    for k in _FIXED:
        if man.get(k) != header[k]:
            raise CouplingError(f"--resume: coupling setting '{k}' differs from the store in {root} "
                                f"({man.get(k)!r} there, {header[k]!r} now)")
    if header["n_pairs"] < man["n_pairs"]:
        raise CouplingError(f"--resume: n_pairs may only grow "
                            f"({man['n_pairs']} stored, {header['n_pairs']} asked)")
    return man


def _prepare(root: Path, header: dict, existing: dict | None) -> None:
    """Main process: start a fresh store, or reopen an existing one for more/missing shards."""
    root.mkdir(parents=True, exist_ok=True)
    # leftovers of a killed writer: half-written shards (never listed) and a half-written manifest
    # (the old one is still in place: manifests are replaced atomically)
    for pattern in (".shard-*.tmp-*", f".{MANIFEST}.tmp-*"):
        for tmp in root.glob(pattern):
            tmp.unlink(missing_ok=True)
    if existing is None:
        for old in root.glob("shard-*.safetensors"):
            old.unlink()
        write_manifest(root / MANIFEST, header)
        return

    if existing["n_pairs"] != header["n_pairs"]:  # a complete store that is not grown is left as it is

        def grow(man: dict) -> dict:
            man["n_pairs"], man["complete"] = header["n_pairs"], False
            return man

        update_manifest(root, grow)


def _finish(root: Path, n_pairs: int, shard_size: int) -> dict:
    """Main process, after all shards: check the listing and mark the store complete."""

    def fn(man: dict) -> dict:
        recs = {s["index"]: s for s in man["shards"]}
        for k in range(num_shards(n_pairs, shard_size)):
            if k not in recs or recs[k]["count"] != shard_count(k, n_pairs, shard_size):
                raise CouplingError(f"coupling shard {root / shard_name(k)} is missing after generation")
        man["complete"] = True
        return man

    return update_manifest(root, fn)


def _use_cpu(asked: bool) -> bool:
    """CPU processes when asked, when ``ACCELERATE_USE_CPU`` is set, or when a multi-process launch
    has no CUDA (accelerate's ``PartialState`` otherwise stays single-process on a CPU box)."""
    env = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return asked or env or (multi and not torch.cuda.is_available())


def generate_couplings(field: nn.Module, root: str | os.PathLike, spec: CoupleSpec,
                       sample_shape: tuple[int, ...], num_classes: int, identity: dict,
                       resume: bool = False, overwrite: bool = False, progress: bool = True) -> Path:
    """Write ``spec.n_pairs`` couplings of the ready (guided) velocity ``field`` to ``root``.

    ``num_classes > 0`` draws labels (``uncond_share`` of them the null label ``num_classes``).
    ``identity`` says what the field is — ``teacher`` (its path), ``teacher_sha256`` (its weights
    file), ``teacher_state_sha256`` (its tensors), ``guidance`` (the guidance header) — and is kept
    in the store's header, so a store of another teacher or guidance is refused on resume
    (:func:`flowdistill.api.couple` builds both from a job). Under ``torchrun``/``accelerate``
    every process takes its share of the shards (gloo on CPU with ``ACCELERATE_USE_CPU=1``).
    ``resume`` continues a killed or smaller store with the same settings; ``overwrite`` replaces one.
    """
    spec.validate()
    state = PartialState(cpu=_use_cpu(spec.cpu))
    rank, world = state.process_index, state.num_processes
    root = Path(root)
    header = _header(spec, identity, tuple(sample_shape), num_classes)
    existing = _check_resumable(root, header, resume, overwrite)
    state.wait_for_everyone()
    if state.is_main_process:
        _prepare(root, header, existing)
    state.wait_for_everyone()

    field = field.to(state.device)
    records = {s["index"]: s for s in read_manifest(root)["shards"]}
    mine = [k for k in range(num_shards(spec.n_pairs, spec.shard_size)) if k % world == rank]
    todo = []
    for k in mine:
        rec, path = records.get(k), root / shard_name(k)
        if rec is not None and rec["count"] == shard_count(k, spec.n_pairs, spec.shard_size) \
                and path.is_file() and file_sha256(path) == rec["sha256"]:
            continue
        todo.append(k)
    drop_shards(root, {k for k in todo if k in records})  # never list a shard being rewritten
    dtype = STORAGE_DTYPES[spec.storage_dtype]
    meta = {"format": FORMAT, "teacher_sha256": header["teacher_sha256"],
            "teacher_state_sha256": header["teacher_state_sha256"], "seed": str(spec.seed)}
    bar = tqdm(todo, desc=f"couple[{rank}/{world}]", disable=not (progress and state.is_main_process),
               dynamic_ncols=True)
    for k in bar:
        noise, cond = shard_inputs(spec, k, tuple(sample_shape), num_classes)
        outs = []
        for i in range(0, noise.shape[0], spec.chunk_size):
            c = cond[i : i + spec.chunk_size].to(state.device) if cond is not None else None
            outs.append(solve_teacher(field, noise[i : i + spec.chunk_size].to(state.device), c, spec).cpu())
        tensors = {"noise": noise.to(dtype), "sample": torch.cat(outs).to(dtype)}
        if cond is not None:
            tensors["cond"] = cond.to(torch.int64)
        if not torch.isfinite(tensors["sample"].float()).all():
            raise CouplingError(f"teacher ODE produced non-finite samples in shard {k} "
                                f"(lower couple.rtol/atol or use more steps)")
        rec = write_shard(root, k, tensors, {**meta, "index": str(k), "count": str(noise.shape[0])})
        add_shard(root, rec)
    state.wait_for_everyone()
    if state.is_main_process:
        _finish(root, spec.n_pairs, spec.shard_size)
    state.wait_for_everyone()
    return root
