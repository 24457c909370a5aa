"""Job configs: omegaconf structured dataclasses, YAML files and ``key=value`` overrides.

The ``distiller`` section is typed by the config dataclass of the distiller that
``distiller.name`` selects, so an unknown key, a wrong type or a missing value is an error that
names the key. Configs name registered components only; nothing is imported from a string.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from flowdistill.core.guidance import GuidanceSpec
from flowdistill.core.registry import UnknownNameError
from flowdistill.distillers import DISTILLERS
from flowdistill.errors import ConfigError
from flowdistill.training.loop import TrainConfig


@dataclass
class ModelSpec:
    """A registered network (``mlp``, ``unet``, ``dit``) and its constructor arguments."""

    name: str = "mlp"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSpec:
    """A registered dataset (``flowdistill.data.registry``): a toy target, ``digits``,
    ``image_folder`` or one a ``--plugin`` module registers; ``params`` are that factory's own."""

    name: str = "checkerboard"
    conditional: bool = False
    image_size: int = 16  # digits / image folders
    root: str = ""  # image folders
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalSpec:
    """What ``eval``/``demo`` measure: NFE budgets, sample count, solver."""

    nfe: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 32, 128])
    n_samples: int = 4000
    solver: str = "euler"
    seed: int = 1234


#: Weight dtypes a diffusers teacher can be loaded in (``teacher.dtype``).
TEACHER_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class DiffusersTeacherSpec:
    """A teacher read from a diffusers pipeline directory (``teacher: {diffusers: PATH, ...}``).

    ``diffusers`` is the pipeline directory (``model_index.json`` + component folders), or a hub id
    when the user names one (then it is downloaded; nothing else ever reaches the network);
    ``subfolder`` the denoiser's folder (``""``: ``transformer`` or ``unet``, whichever the
    pipeline has); ``variant`` a weights variant (``fp16``; ``""``: none); ``dtype`` the weights'
    dtype (``float32`` | ``bfloat16`` | ``float16``), which LoRA and full students share.
    """

    diffusers: str = ""
    subfolder: str = ""
    variant: str = ""
    dtype: str = "float32"

    def validate(self) -> None:
        """One-line :class:`~flowdistill.errors.ConfigError` naming the key for a bad value."""
        if not str(self.diffusers).strip():
            raise ConfigError("teacher.diffusers must name a diffusers pipeline directory (or a hub id)")
        if self.dtype not in TEACHER_DTYPES:
            raise ConfigError(f"teacher.dtype must be one of {', '.join(TEACHER_DTYPES)}, got {self.dtype!r}")
        if self.subfolder and self.subfolder not in ("transformer", "unet"):
            raise ConfigError(f"teacher.subfolder must be 'transformer' or 'unet' (or empty: whichever the "
                              f"pipeline has), got {self.subfolder!r}")


def diffusers_teacher(cfg: JobConfig) -> DiffusersTeacherSpec | None:
    """The job's diffusers teacher spec, or ``None`` when ``teacher`` is a run/model path (or empty)."""
    return cfg.teacher if isinstance(cfg.teacher, DiffusersTeacherSpec) else None


@dataclass
class JobConfig:
    """A training job (teacher training or distillation)."""

    out_dir: str = MISSING
    # a saved teacher's directory (run_dir/student or a model dir), or a diffusers pipeline:
    # {diffusers: PATH, subfolder, variant, dtype} (DiffusersTeacherSpec; a mapping here)
    teacher: Any = ""
    init: str = ""  # start the student from this run/model directory instead of the teacher (recipes)
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalSpec = field(default_factory=EvalSpec)
    # the teacher's guidance (CFG scale, per-sample scale range, interval, autoguidance), applied
    # once where the teacher is built; for a flow-matching run, when its model is sampled
    guidance: GuidanceSpec = field(default_factory=GuidanceSpec)
    distiller: Any = None


def _err(e: Exception) -> ConfigError:
    key = getattr(e, "full_key", None)
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return ConfigError(f"config key '{key}': {msg}" if key else f"config: {msg}")


def _schema(name: str) -> DictConfig:
    dist_cls = DISTILLERS.get(name)  # UnknownNameError lists what is available
    base = OmegaConf.structured(JobConfig)
    base.distiller = OmegaConf.structured(dist_cls.Config)
    return base


_MAGIC = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
          (b"PK\x03\x04", "a zip archive"), (b"\x1f\x8b", "gzip data"), (b"%PDF", "a PDF file"),
          (b"\x7fELF", "an executable"))


def _yaml_position(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""


def _yaml_problem(e: yaml.YAMLError) -> str:
    problem = getattr(e, "problem", None)
    if not problem:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    ctx, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if ctx and cmark is not None:
        problem += f" ({ctx} at line {cmark.line + 1}, column {cmark.column + 1})"
    elif ctx:
        problem += f" ({ctx})"
    return problem


def read_yaml_file(path: str | Path, what: str = "config file") -> DictConfig | ListConfig:
    """Parse the YAML file ``path``; a missing, unreadable, binary or malformed file is a
    :class:`~flowdistill.errors.ConfigError` naming the file (and the line where YAML gives one).

    ``what`` names the file in messages (``"config file"``, ``"saved config"``).
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what} {p} does not exist")
    if p.is_dir():
        raise ConfigError(f"{what} {p} is a directory, not a YAML file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{what} {p} cannot be read: {e.strerror or e}") from None
    kind = next((k for magic, k in _MAGIC if data.startswith(magic)), None)
    nul = data.find(b"\x00")
    if kind is not None or nul >= 0:
        why = kind or f"binary data, a NUL byte at offset {nul}"
        raise ConfigError(f"{what} {p} is not a text file ({why}); expected YAML")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {p} is not a text file (byte 0x{data[e.start]:02x} at offset {e.start} "
                          f"is not UTF-8); expected YAML") from None
    try:
        return OmegaConf.load(io.StringIO(text))
    except yaml.reader.ReaderError as e:  # control characters: binary content that decodes as UTF-8
        raise ConfigError(f"{what} {p} is not a text file (control character 0x{e.character:02x} at "
                          f"character {e.position}); expected YAML") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {p} is not valid YAML: {_yaml_position(e)}{_yaml_problem(e)}") from None
    except (OmegaConfBaseException, OSError, ValueError) as e:  # a scalar document, a bad interpolation
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if msg.startswith("Invalid loaded object type: "):
            raise ConfigError(f"{what} {p} must hold a mapping (key: value lines), not a single "
                              f"{msg.rsplit(' ', 1)[-1]} value") from None
        key = getattr(e, "full_key", None)
        raise ConfigError(f"{what} {p}: " + (f"key '{key}': " if key else "") + msg) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                default_distiller: str = "flow_matching") -> JobConfig:
    """Load YAML (optional) + ``key=value`` overrides into a validated :class:`JobConfig`.

    A file that is missing, binary or not valid YAML, an unknown key, a wrong type or a bad value
    is a :class:`~flowdistill.errors.ConfigError` naming the file or the key.
    """
    raw: Any = OmegaConf.create({})
    if path is not None:
        raw = read_yaml_file(path)
        if not isinstance(raw, DictConfig):
            raise ConfigError(f"config file {path} must hold a mapping (key: value lines), not a list")
    return load_config_mapping(raw, overrides, default_distiller)


def load_config_mapping(raw: dict[str, Any] | DictConfig, overrides: list[str] | None = None,
                        default_distiller: str = "flow_matching") -> JobConfig:
    """:func:`load_config` of a job held in memory (a mapping, e.g. a recipe stage's job)."""
    try:
        raw = OmegaConf.create(raw) if not isinstance(raw, DictConfig) else raw
        bad = [o for o in overrides or [] if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
        over = OmegaConf.from_dotlist(list(overrides or []))
        raw, over = _drop_legacy_guidance(raw), _drop_legacy_guidance(over)
        name = OmegaConf.select(over, "distiller.name") or OmegaConf.select(raw, "distiller.name") \
            or default_distiller
        schema = _schema(str(name))
        _type_teacher(schema, raw, over)
        merged = OmegaConf.merge(schema, raw, over)
        obj = OmegaConf.to_object(merged)
    except (ConfigError, UnknownNameError):
        raise
    except OmegaConfBaseException as e:
        raise _err(e) from None
    _check_teacher(obj)
    obj.train.validate()
    try:
        obj.distiller.validate()
    except ValueError as e:
        raise ConfigError(f"distiller: {e}") from None
    try:
        obj.guidance.validate()
    except ValueError as e:  # the message starts with the key
        raise ConfigError(str(e)) from None
    return obj


def _type_teacher(schema: DictConfig, raw: DictConfig, over: DictConfig) -> None:
    """Type ``teacher`` as :class:`DiffusersTeacherSpec` when the file or an override gives it as a
    mapping (``teacher: {diffusers: ...}`` or ``teacher.diffusers=PATH``), so its keys are checked
    like any section's; a plain string keeps the saved-model meaning."""
    if any(isinstance(c.get("teacher"), DictConfig) for c in (raw, over)):
        schema.teacher = OmegaConf.structured(DiffusersTeacherSpec)


def _check_teacher(obj: JobConfig) -> None:
    """``teacher`` is a path string or a valid :class:`DiffusersTeacherSpec` (one-line errors)."""
    t = obj.teacher
    if isinstance(t, DiffusersTeacherSpec):
        t.validate()
    elif isinstance(t, (int, float)) and not isinstance(t, bool):  # a path typed as a number, as before
        obj.teacher = str(t)
    elif not isinstance(t, str):
        raise ConfigError(f"config key 'teacher' must be a path or a mapping {{diffusers: PATH, subfolder, "
                          f"variant, dtype}}, got {type(t).__name__}")


#: Per-distiller guidance keys of earlier versions, now the top-level ``guidance:`` section.
_LEGACY_GUIDANCE = ("distiller.guidance_scale", "distiller.couple.guidance_scale")


def _drop_legacy_guidance(conf: DictConfig) -> DictConfig:
    """Saved configs of earlier versions hold ``distiller.guidance_scale`` (and reflow's
    ``distiller.couple.guidance_scale``): at its default ``1.0`` (no guidance) the key is dropped;
    another value is a :class:`~flowdistill.errors.ConfigError` pointing at ``guidance.scale``."""
    for key in _LEGACY_GUIDANCE:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(conf, parent)
        if not isinstance(node, DictConfig) or leaf not in node:
            continue
        value = node[leaf]
        if value not in (1, 1.0, "1", "1.0"):
            raise ConfigError(f"config key '{key}' was replaced by the top-level guidance section: set "
                              f"guidance.scale={value} (the teacher's guidance, applied where it is built)")
        del node[leaf]
    return conf


def to_yaml(cfg: JobConfig) -> str:
    """The resolved config as YAML (written to ``run_dir/config.yaml``)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
