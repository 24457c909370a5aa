"""The Python API under the CLI: train/distil a run, load it, sample it, evaluate it.

Building a job's distiller (student, guided teacher, their checks) lives in :mod:`flowdistill.api_build`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from flowdistill.api_build import _default_params, _inference_distiller, build_distiller_for  # noqa: F401
from flowdistill.config import JobConfig, load_config, to_yaml
from flowdistill.data.registry import build_dataset as build_source
from flowdistill.data.registry import sample_shape_of
from flowdistill.distillers import DISTILLERS, Distiller
from flowdistill.errors import CheckpointError, ConfigError
from flowdistill.models import MODELS
from flowdistill.models.loading import find_model_dir, load_model_dir
from flowdistill.models.teachers import flow_map_teacher, guidance_for, is_flow_map_net
from flowdistill.runs import check_run_dir, export_student, prepare_run_dir, read_meta
from flowdistill.training.loop import Trainer

# -- data: build_source (= data.registry.build_dataset) and sample_shape_of come from the dataset
# registry, the one table that train, eval and model shapes share; ``train`` calls build_source
# through this module's name.

# -- building: build_distiller_for (and _default_params, which tests read from here) come from
# flowdistill.api_build and are re-exported; ``train`` calls build_distiller_for through this module's name.


# -- couplings ----------------------------------------------------------------------------
def couple_teacher(teacher: str | Path, root: str | Path, spec: Any, sample_shape: tuple[int, ...],
                   conditional: bool = False, guidance: Any = None, resume: bool = False,
                   overwrite: bool = False, progress: bool = True) -> Path:
    """Couplings of the saved ``teacher`` (a run or model directory), guided as ``guidance`` (a
    :class:`~flowdistill.core.guidance.GuidanceSpec`) says — the same field a distillation job's
    teacher is — written to ``root`` (:func:`flowdistill.data.coupling_generation.generate_couplings`,
    which records the teacher's hashes and the guidance in the store's header).

    ``conditional`` draws labels from the teacher's classes (an unconditional teacher cannot be
    conditional); per-sample guidance scales (``scale_range``) are not drawn here.
    """
    from flowdistill.core.guidance import GuidanceSpec
    from flowdistill.data.coupling_generation import generate_couplings
    from flowdistill.data.couplings import state_sha256, weights_file_sha256

    guidance = guidance if guidance is not None else GuidanceSpec()
    if guidance.scale_range:
        raise ConfigError(f"guidance.scale_range={list(guidance.scale_range)}: coupling generation guides "
                          f"the teacher with one scale (guidance.scale); per-sample scales need a method "
                          f"that draws them")
    tdir = find_model_dir(teacher, "teacher")
    net = load_model_dir(tdir)
    if is_flow_map_net(net):  # couplings come from the teacher's ODE: a velocity field
        flow_map_teacher(net, teacher, "coupling generation", False)
    num_classes = int(getattr(net.config, "num_classes", 0) or 0) if conditional else 0
    if conditional and num_classes == 0:
        raise ConfigError(f"data.conditional is set but the teacher in {tdir} is unconditional")
    if guidance.active and not guidance.autoguidance and num_classes == 0:
        raise ConfigError(f"{guidance.key}={guidance.scale} needs a class-conditional teacher and "
                          f"data.conditional=true (couplings drawn without labels are not guided)")
    guided = guidance_for(guidance, net, "teacher", tuple(sample_shape))
    bad_sha = state_sha256(guided.bad) if guided is not None and guided.bad is not None else ""
    identity = {"teacher": str(tdir), "teacher_sha256": weights_file_sha256(tdir),
                "teacher_state_sha256": state_sha256(net), "guidance": guidance.header(bad_sha)}
    net = net.eval().requires_grad_(False)
    field = net if guided is None else guided(net)
    return generate_couplings(field, root, spec, tuple(sample_shape), num_classes, identity,
                              resume=resume, overwrite=overwrite, progress=progress)


def couple(cfg: JobConfig, resume: bool = False, overwrite: bool = False, progress: bool = True) -> Path:
    """Generate the couplings a reflow/InstaFlow job trains on: ``cfg.teacher`` (guided as
    ``cfg.guidance`` says) → ``cfg.distiller.couplings`` (``flowdistill couple``)."""
    kind = job_kind(cfg)
    if kind is not None and kind.couple is not None:  # a diffusers pipeline teacher
        return kind.couple(cfg, resume=resume, overwrite=overwrite, progress=progress)
    spec, root = getattr(cfg.distiller, "couple", None), getattr(cfg.distiller, "couplings", None)
    if spec is None or not root:
        raise ConfigError(f"distiller {cfg.distiller.name!r} does not train on couplings; "
                          f"`flowdistill couple` needs distiller.name=reflow or instaflow")
    if not cfg.teacher:
        raise ConfigError("`flowdistill couple` needs teacher=PATH (a run directory or its student/)")
    return couple_teacher(cfg.teacher, root, spec, sample_shape_of(cfg.data), cfg.data.conditional,
                          cfg.guidance, resume=resume, overwrite=overwrite, progress=progress)


# -- job kinds --------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobKind:
    """How a job whose teacher is not a saved flowdistill model is trained and loaded
    (``train(cfg, resume, overwrite, on_plot) -> run_dir``, ``load(run_dir, cfg) -> LoadedRun``,
    ``build(cfg) -> job``), registered by the integration that reads such teachers."""

    train: Callable[..., Path]
    load: Callable[..., Any]
    build: Callable[..., Any] | None = None
    couple: Callable[..., Path] | None = None


_JOB_KINDS: dict[str, JobKind] = {}
#: The module that registers each built-in job kind (imported on first use, like a ``--plugin``).
_BUILTIN_KINDS = {"diffusers": "flowdistill.integrations.diffusers.pipeline_job"}


def register_job_kind(name: str, train: Callable[..., Path], load: Callable[..., Any],
                      build: Callable[..., Any] | None = None,
                      couple: Callable[..., Path] | None = None) -> None:
    """Register the train/load (build, couple) functions of the job kind ``name`` (``"diffusers"``:
    a config whose ``teacher`` is ``{diffusers: PATH, ...}``)."""
    _JOB_KINDS[name] = JobKind(train, load, build, couple)


def job_kind(cfg: JobConfig) -> JobKind | None:
    """The registered kind of ``cfg``'s job (``None``: a job on flowdistill's own models).

    A diffusers teacher's kind lives in the diffusers integration, above this layer; its module is
    imported by name on first use, the way ``--plugin`` imports a user's module."""
    from flowdistill.config import diffusers_teacher

    if diffusers_teacher(cfg) is None:
        return None
    if "diffusers" not in _JOB_KINDS:
        from flowdistill.plugins import load_plugins

        load_plugins([_BUILTIN_KINDS["diffusers"]])
    return _JOB_KINDS["diffusers"]


# -- training -----------------------------------------------------------------------------
def progress_plot(trainer: Trainer, step: int, eval_spec=None) -> Path:
    """The default ``train.plot_every`` plot: the current (EMA) student's samples at the first
    eval NFEs from fixed noise, written to ``run_dir/plots/step-NNNNNNN.png`` (and logged to the
    trackers as an image by the loop). Scatter plots for 2-D data, image grids otherwise."""
    from flowdistill.eval.plots import image_grid, scatter_grid

    cfg_eval = eval_spec if eval_spec is not None else JobConfig().eval
    student = trainer.eval_student()
    was_training = student.training
    student.eval()
    g = torch.Generator().manual_seed(cfg_eval.seed)
    n = min(cfg_eval.n_samples, 2000 if len(trainer.sample_shape) == 1 else 16)
    noise = torch.randn(n, *trainer.sample_shape, generator=g).to(trainer.acc.device)
    panels = {}
    with torch.no_grad():
        for nfe in list(cfg_eval.nfe)[:3]:
            panels[f"NFE {nfe}"] = trainer.distiller.sample(noise, nfe, model=student).cpu()
    student.train(was_training)
    path = trainer.run_dir / "plots" / f"step-{step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    if len(trainer.sample_shape) == 1:
        return scatter_grid(panels, path, title=f"step {step}")
    return image_grid(torch.cat(list(panels.values())), path, nrow=n)


def train(cfg: JobConfig, resume: bool = False, overwrite: bool = False,
          on_plot: Callable | None = None) -> Path:
    """Run a training job (teacher or distillation) and export the student; returns the run dir.

    Nothing is written before every check has passed: the run directory is checked (writable,
    not a refused existing run, the saved config matches on ``resume``) before anything is built,
    and on ``resume`` the newest checkpoint is loaded before ``config.yaml`` is rewritten, so a
    corrupt checkpoint leaves the run as it was.
    """
    kind = job_kind(cfg)
    if kind is not None:  # a diffusers pipeline teacher: the integration's job
        return kind.train(cfg, resume=resume, overwrite=overwrite, on_plot=on_plot)
    run_dir = Path(cfg.out_dir)
    config_yaml = to_yaml(cfg)
    check_run_dir(run_dir, config_yaml, resume=resume, overwrite=overwrite)  # read-only, every process
    cls = DISTILLERS.get(cfg.distiller.name)
    source = build_source(cfg.data) if cls.needs_data else None
    distiller = build_distiller_for(cfg, source)
    trainer = Trainer(distiller, cfg.train, run_dir, source=source,
                      sample_shape=sample_shape_of(cfg.data),
                      on_plot=on_plot if on_plot is not None else partial(progress_plot, eval_spec=cfg.eval),
                      tracker_config=OmegaConf.to_container(OmegaConf.structured(cfg)))
    if resume:
        trainer.resume()  # CheckpointError on a corrupt newest checkpoint, before anything is written
    if trainer.is_main:
        prepare_run_dir(run_dir, config_yaml, resume=resume, overwrite=overwrite)
    trainer.acc.wait_for_everyone()
    trainer.fit()
    student = trainer.eval_student()  # every rank: gathering a sharded student is a collective
    if trainer.is_main:
        export_student(student, run_dir,
                       {"distiller": cfg.distiller.name, "data": cfg.data.name, "steps": trainer.step})
    trainer.acc.wait_for_everyone()
    return run_dir


# -- loading and sampling -----------------------------------------------------------------
@dataclass
class LoadedRun:
    """A trained run ready to sample: its config, student and distiller (no teacher needed).

    ``run_dir`` is the directory it was loaded from: a run directory, or a saved model directory
    (``model_dir`` is then true; see :func:`load_run`)."""

    cfg: JobConfig
    student: nn.Module
    distiller: Distiller
    run_dir: Path
    model_dir: bool = False

    @property
    def num_classes(self) -> int:
        """Classes the student is conditioned on (``0``: unconditional)."""
        conf = getattr(self.student, "config", None) or {}
        return int(conf.get("num_classes", 0) or 0) if hasattr(conf, "get") else 0

    @torch.no_grad()
    def sample(self, n: int, nfe: int, seed: int = 0, cond: torch.Tensor | None = None,
               solver: str | None = None, device: str = "cpu", **options: Any) -> torch.Tensor:
        """``n`` samples at ``nfe`` evaluations from seeded noise (``cond``: class labels ``[n]``).

        ``solver`` and ``options`` go to the distiller's sampler (``None`` = its default); an
        option the method does not take is a :class:`~flowdistill.errors.ConfigError` naming
        those it does (:attr:`Distiller.sample_options`)."""
        if n <= 0 or nfe <= 0:
            raise ConfigError(f"n and nfe must be positive, got n={n}, nfe={nfe}")
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(n, *sample_shape_of(self.cfg.data), generator=g).to(device)
        if cond is not None:
            cond = cond.to(device)
        return self.distiller.sample(noise, nfe, cond=cond, model=self.student.to(device), solver=solver,
                                     **options)


def _model_dir_config(path: Path, model: nn.Module, data: Any = None) -> JobConfig:
    """The config a saved model directory is sampled with: its ``train_config.yaml`` when one lies
    beside the weights (a shipped teacher), else flow matching (or the distiller its
    ``flowdistill.json`` names) on ``data`` (default: the dataset ``flowdistill.json`` names, at the
    net's ``sample_size``)."""
    shipped = path / "train_config.yaml"
    if shipped.is_file():
        return load_config(shipped, [f"out_dir={path}"])
    meta = read_meta(path)
    over = [f"out_dir={path}", f"distiller.name={meta.get('distiller', 'flow_matching')}"]
    name = next((n for n in MODELS.names() if MODELS.get(n) is type(model)), None)
    if name is not None:
        over.append(f"model.name={name}")
    conf = getattr(model, "config", None) or {}
    if data is not None:
        over += [f"data.name={data.name}", f"data.image_size={data.image_size}"]
    elif meta.get("data"):
        over.append(f"data.name={meta['data']}")
        if conf.get("sample_size"):
            over.append(f"data.image_size={conf['sample_size']}")
    return load_config(None, over)


def load_run(run_dir: str | Path, data: Any = None) -> LoadedRun:
    """Load a run, or a saved model directory, ready to sample.

    ``run_dir`` is a run directory (its ``config.yaml`` and exported ``student/``), a run's
    ``student/``, or a saved model directory (``config.json`` + weights): a shipped model with its
    ``train_config.yaml`` beside it (``assets/digits_teacher``) is sampled as that training run; a
    bare one as a flow-matching velocity field on ``data`` (a :class:`~flowdistill.config.DataSpec`;
    default the dataset its ``flowdistill.json`` names). Anything else is a
    :class:`~flowdistill.errors.CheckpointError` saying what is missing.
    """
    run_dir = Path(run_dir)
    if run_dir.name == "student" and not (run_dir / "config.yaml").is_file() \
            and (run_dir.parent / "config.yaml").is_file():
        run_dir = run_dir.parent
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        if (run_dir / "config.json").is_file():
            model = load_model_dir(run_dir)
            cfg = _model_dir_config(run_dir, model, data)
            distiller = _inference_distiller(cfg, model)
            return LoadedRun(cfg, model, distiller, run_dir, model_dir=True)
        raise CheckpointError(f"{run_dir} is not a run directory (config.yaml missing) nor a saved model "
                              f"directory (config.json missing)")
    cfg = load_config(cfg_file)
    kind = job_kind(cfg)
    if kind is not None:  # a diffusers pipeline run: the integration rebuilds teacher denoiser + student
        return kind.load(run_dir, cfg)
    student_dir = run_dir / "student"
    if not student_dir.is_dir():
        raise CheckpointError(f"{run_dir} has no exported student (training unfinished?)")
    student = load_model_dir(student_dir)
    read_meta(student_dir)
    distiller = _inference_distiller(cfg, student)  # no teacher; the run's guidance for sampling
    return LoadedRun(cfg, student, distiller, run_dir)
