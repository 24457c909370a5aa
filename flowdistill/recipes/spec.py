"""Recipe files: multi-stage jobs as a YAML list of stages, checked before anything runs.

A recipe chains jobs whose inputs are earlier stages' outputs — reflow's couple → 2-RF → couple →
InstaFlow, a progressive 8 → 4 → 2 → 1-segment schedule, a two-stage training. The file::

    out_dir: runs/reflow_checkerboard        # stage NAME runs in OUT_DIR/NAME
    vars:                                    # the recipe's own variables: ${recipe:teacher}
      teacher: assets/checkerboard_teacher
    common:                                  # job keys merged into every stage (model, data, eval, guidance)
      model: {name: mlp}
      data: {name: checkerboard}
    stages:
      - name: 2rf
        kind: distill                        # train | distill | couple | report
        config: ../reflow_checkerboard.yaml  # optional base job config (relative to this file)
        job:                                 # job keys over config and common
          teacher: ${recipe:teacher}
          distiller: {name: reflow}
      - name: instaflow
        kind: distill
        job: {teacher: "${stage:2rf}", distiller: {name: instaflow}}

References are substituted in string values before each stage's job config is built:
``${stage:NAME}`` is the run directory of an *earlier* stage (``OUT_DIR/NAME``; a later or unknown
stage is an error naming both), ``${recipe:KEY}`` a key of ``vars`` (or ``out_dir``). Any other
``${...}`` is left for the job config (e.g. reflow's ``couplings: ${out_dir}/couplings``, which is
the *stage's* run directory).

Overrides (``key=value``) address the recipe: ``out_dir=…``, ``vars.teacher=…`` (or just
``teacher=…`` for a key of ``vars``), ``common.data.name=…``, and ``stages.NAME.…`` for one stage —
``stages.2rf.train.steps=500`` sets a job key (shorthand for ``stages.2rf.job.train.steps``).

Stage kinds: ``train`` and ``distill`` run :func:`flowdistill.api.train` (a distiller that trains
on teacher couplings generates or resumes its store first); ``couple`` only generates couplings;
``report`` tabulates the quality of earlier runs (``runs: {label: path}``, ``nfe: {label: [..]}``,
optional ``straightness``, ``n``, ``seed``; see :mod:`flowdistill.recipes.report`); ``encode``
caches a dataset's latents through a tokenizer run (:mod:`flowdistill.data.latent_cache`)::

      - name: encode
        kind: encode
        tokenizer: ${stage:tok}                  # a tokenizer run (its student/) or model directory
        data: {name: digits, image_size: 32, conditional: true}   # any indexed image dataset
        encode: {mode: mean, batch_size: 64, shard_size: 512, seed: 0, split: train}   # optional
        out: runs/my_cache                       # optional; default OUT_DIR/NAME

and a later stage trains on it with ``data: {name: tokenizer_latents, root: ${stage:encode}}``
(``${stage:NAME}`` of an encode stage is its cache directory).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from flowdistill.config import JobConfig, load_config_mapping, read_yaml_file
from flowdistill.core.registry import UnknownNameError
from flowdistill.errors import ConfigError

KINDS = ("train", "distill", "couple", "report", "encode")
TOP_KEYS = ("out_dir", "vars", "common", "stages")
STAGE_KEYS = ("name", "kind", "config", "job", "runs", "nfe", "straightness", "n", "seed",
              "tokenizer", "data", "encode", "out")
#: keys of encode stages only (``stages.NAME.data...`` of other stages is a job key)
ENCODE_KEYS = ("tokenizer", "data", "encode", "out")
#: the options of an encode stage's ``encode:`` mapping, with their defaults
ENCODE_OPTIONS = {"mode": "mean", "batch_size": 64, "shard_size": 1024, "seed": 0, "split": "train"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_REF = re.compile(r"\$\{(stage|recipe):([^}]*)\}")


@dataclass
class Stage:
    """One checked stage: its name, kind and run directory, and (train/distill/couple) its job
    config with references substituted, or (report) the runs, NFEs and options to tabulate."""

    name: str
    kind: str
    run_dir: Path
    job: JobConfig | None = None
    job_yaml: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    encode: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    """A loaded recipe: where it runs and its stages in order."""

    path: Path
    out_dir: Path
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        """The stage called ``name``."""
        for s in self.stages:
            if s.name == name:
                return s
        raise ConfigError(f"recipe {self.path} has no stage {name!r} "
                          f"(stages: {', '.join(s.name for s in self.stages)})")


def _stage_override(key: str, names: list[str], kinds: list[Any] | None = None) -> tuple[str, str]:
    """``stages.NAME.rest`` → ``(NAME, path inside the stage)``, job keys prefixed with ``job.``
    (``kinds``: the stages' kinds; encode-stage keys such as ``data`` are job keys elsewhere)."""
    rest = key[len("stages."):]
    name = next((n for n in sorted(names, key=len, reverse=True) if rest == n or rest.startswith(n + ".")),
                None)
    if name is None:
        raise ConfigError(f"override {key!r} names no stage (stages: {', '.join(names)})")
    inner = rest[len(name) + 1:]
    if not inner:
        raise ConfigError(f"override {key!r} needs a key after the stage name")
    head = inner.split(".")[0]
    kind = kinds[names.index(name)] if kinds else None
    if head not in STAGE_KEYS or (head in ENCODE_KEYS and kind != "encode"):
        inner = "job." + inner
    return name, inner


def _apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Merge ``key=value`` overrides into the recipe mapping (see the module docstring)."""
    names = [str(s.get("name")) for s in raw.get("stages") or [] if isinstance(s, dict)]
    kinds = [s.get("kind") for s in raw.get("stages") or [] if isinstance(s, dict)]
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        try:
            parsed = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={value}"]))["v"]
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {item!r}: {str(e).splitlines()[0]}") from None
        if key.startswith("stages."):
            name, inner = _stage_override(key, names, kinds)
            target = raw["stages"][names.index(name)]
        else:
            head = key.split(".")[0]
            if head not in TOP_KEYS and head in (raw.get("vars") or {}):
                key = "vars." + key
            elif head not in TOP_KEYS:
                raise ConfigError(f"recipe key '{head}' is unknown; allowed: {', '.join(TOP_KEYS)} "
                                  f"(or a key of vars: {', '.join(raw.get('vars') or {}) or 'none'})")
            target, inner = raw, key
        node = OmegaConf.create(target)
        OmegaConf.update(node, inner, parsed, force_add=True)
        target.clear()
        target.update(OmegaConf.to_container(node))
    return raw


def _substitute(value: Any, subs: dict[str, Any], where: str) -> Any:
    """Replace ``${stage:NAME}`` / ``${recipe:KEY}`` in the strings of ``value`` (recursively)."""
    if isinstance(value, dict):
        return {k: _substitute(v, subs, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, subs, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def repl(m: re.Match) -> str:
        kind, key = m.group(1), m.group(2).strip()
        table = subs[kind]
        if key not in table:
            if kind == "stage":
                later = subs["later"]
                why = "a later stage (a stage reads earlier stages' outputs only)" if key in later \
                    else f"no such stage (earlier stages: {', '.join(table) or 'none'})"
                raise ConfigError(f"recipe key '{where}': ${{stage:{key}}} names {why}")
            raise ConfigError(f"recipe key '{where}': ${{recipe:{key}}} is not a recipe variable "
                              f"(vars: {', '.join(k for k in table if k != 'out_dir') or 'none'})")
        return str(table[key])

    whole = _REF.fullmatch(value)
    if whole is not None and whole.group(1) == "recipe":  # keep the variable's type (a number, a list)
        key = whole.group(2).strip()
        if key in subs["recipe"]:
            return subs["recipe"][key]
    return _REF.sub(repl, value)


def _check_top(raw: Any, path: Path) -> None:
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path} must hold a mapping with keys {', '.join(TOP_KEYS)}")
    for key in raw:
        if key not in TOP_KEYS:
            raise ConfigError(f"recipe key '{key}' is unknown; allowed: {', '.join(TOP_KEYS)}")
    if not raw.get("out_dir"):
        raise ConfigError("recipe key 'out_dir' is missing")
    stages = raw.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ConfigError("recipe key 'stages' must be a non-empty list of stages")
    seen: set[str] = set()
    for i, st in enumerate(stages):
        if not isinstance(st, dict):
            raise ConfigError(f"recipe key 'stages[{i}]' must be a mapping (name, kind, ...)")
        for key in st:
            if key not in STAGE_KEYS:
                raise ConfigError(f"recipe key 'stages[{i}].{key}' is unknown; "
                                  f"allowed: {', '.join(STAGE_KEYS)}")
        name = str(st.get("name", ""))
        if not _NAME.match(name):
            raise ConfigError(f"recipe key 'stages[{i}].name' must be a directory-safe name, got {name!r}")
        if name in seen:
            raise ConfigError(f"recipe key 'stages[{i}].name': stage {name!r} appears twice")
        seen.add(name)
        if st.get("kind") not in KINDS:
            raise ConfigError(f"recipe key 'stages.{name}.kind' must be one of {', '.join(KINDS)}, "
                              f"got {st.get('kind')!r}")


def _job_mapping(st: dict[str, Any], common: dict[str, Any], base_dir: Path, run_dir: Path,
                 subs: dict[str, Any]) -> dict[str, Any]:
    """The stage's job: base config file, then ``common``, then ``job``; references substituted."""
    name = st["name"]
    layers: list[Any] = []
    if st.get("config"):
        cfg_path = Path(str(_substitute(st["config"], subs, f"stages.{name}.config")))
        cfg_path = cfg_path if cfg_path.is_absolute() else base_dir / cfg_path
        base = read_yaml_file(cfg_path)
        if not isinstance(base, DictConfig):
            raise ConfigError(f"recipe key 'stages.{name}.config': {cfg_path} must hold a job mapping")
        layers.append(OmegaConf.to_container(base))
    layers += [common, st.get("job") or {}]
    merged = OmegaConf.to_container(OmegaConf.merge(*[OmegaConf.create(x) for x in layers]))
    merged = _substitute(merged, subs, f"stages.{name}.job")
    merged["out_dir"] = str(run_dir)
    return merged


def _encode_stage(st: dict[str, Any], subs: dict[str, Any], out_dir: Path) -> Stage:
    """Check an encode stage: ``tokenizer`` (a path), ``data`` (a registered dataset spec),
    ``encode`` options (:data:`ENCODE_OPTIONS`) and ``out`` (default ``OUT_DIR/NAME``)."""
    from flowdistill.config import DataSpec
    from flowdistill.data.registry import dataset_entry

    name = st["name"]
    bad = [k for k in st if k not in ("name", "kind", *ENCODE_KEYS)]
    if bad:
        raise ConfigError(f"recipe key 'stages.{name}.{bad[0]}': an encode stage takes "
                          f"{', '.join(ENCODE_KEYS)}")
    spec = _substitute({k: st.get(k) for k in ENCODE_KEYS}, subs, f"stages.{name}")
    if not isinstance(spec["tokenizer"], str) or not spec["tokenizer"].strip():
        raise ConfigError(f"recipe key 'stages.{name}.tokenizer' must name a tokenizer run or model "
                          f"directory")
    if not isinstance(spec["data"], dict) or not spec["data"].get("name"):
        raise ConfigError(f"recipe key 'stages.{name}.data' must be a data spec with a name "
                          f"(e.g. {{name: digits, image_size: 32}})")
    try:
        data = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataSpec), spec["data"]))
    except OmegaConfBaseException as e:
        raise ConfigError(f"recipe key 'stages.{name}.data': {str(e).splitlines()[0]}") from None
    try:
        if dataset_entry(data.name).kind != "image":
            raise ConfigError(f"recipe key 'stages.{name}.data.name': {data.name!r} is not an image dataset")
    except UnknownNameError as e:
        raise ConfigError(f"recipe key 'stages.{name}.data.name': {e}") from None
    opts = dict(spec["encode"] or {})
    unknown = [k for k in opts if k not in ENCODE_OPTIONS]
    if unknown:
        raise ConfigError(f"recipe key 'stages.{name}.encode.{unknown[0]}' is unknown; allowed: "
                          f"{', '.join(ENCODE_OPTIONS)}")
    opts = {**ENCODE_OPTIONS, **opts}
    if opts["mode"] not in ("mean", "sample"):
        raise ConfigError(f"recipe key 'stages.{name}.encode.mode' must be mean or sample, "
                          f"got {opts['mode']!r}")
    for k in ("batch_size", "shard_size"):
        if not isinstance(opts[k], int) or opts[k] < 1:
            raise ConfigError(f"recipe key 'stages.{name}.encode.{k}' must be a positive integer")
    run_dir = Path(str(spec["out"])) if spec.get("out") else out_dir / name
    return Stage(name, "encode", run_dir, encode={"tokenizer": spec["tokenizer"], "data": data, **opts})


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and check a recipe; build every stage's job config (nothing is written).

    Every error — an unknown key, a reference to a later or unknown stage, a stage whose job config
    is invalid — is a :class:`~flowdistill.errors.ConfigError` naming the key or the stage.
    """
    path = Path(path)
    node = read_yaml_file(path, "recipe file")
    if isinstance(node, ListConfig):
        raise ConfigError(f"recipe {path} must hold a mapping with keys {', '.join(TOP_KEYS)}, not a list")
    raw = OmegaConf.to_container(node, resolve=False)
    _check_top(raw, path)
    raw = _apply_overrides(raw, list(overrides or []))
    _check_top(raw, path)
    out_dir = Path(str(raw["out_dir"]))
    variables = dict(raw.get("vars") or {})
    variables = {k: _substitute(v, {"recipe": {"out_dir": str(out_dir)}, "stage": {}, "later": []},
                                f"vars.{k}") for k, v in variables.items()}
    common = dict(raw.get("common") or {})
    names = [str(s["name"]) for s in raw["stages"]]
    stages: list[Stage] = []
    for i, st in enumerate(raw["stages"]):
        name, kind = names[i], st["kind"]
        subs = {"stage": {s.name: s.run_dir for s in stages},
                "recipe": {**variables, "out_dir": str(out_dir)}, "later": names[i:]}
        run_dir = out_dir / name
        if kind == "encode":
            stages.append(_encode_stage(st, subs, out_dir))
            continue
        wrong = [k for k in ENCODE_KEYS if k in st]
        if wrong:
            raise ConfigError(f"recipe key 'stages.{name}.{wrong[0]}' belongs to encode stages only "
                              f"(a job's data goes under job:)")
        if kind == "report":
            extra = [k for k in ("config", "job") if st.get(k)]
            if extra:
                raise ConfigError(f"recipe key 'stages.{name}.{extra[0]}': a report stage takes runs, nfe, "
                                  f"straightness, n, seed")
            report = _substitute({k: v for k, v in st.items() if k not in ("name", "kind")}, subs,
                                 f"stages.{name}")
            if not isinstance(report.get("runs"), dict) or not report["runs"]:
                raise ConfigError(f"recipe key 'stages.{name}.runs' must map labels to run directories")
            stages.append(Stage(name, kind, run_dir, report=report))
            continue
        bad = [k for k in ("runs", "nfe", "straightness", "n", "seed") if k in st]
        if bad:
            raise ConfigError(f"recipe key 'stages.{name}.{bad[0]}' belongs to report stages only")
        job = _job_mapping(st, common, path.parent, run_dir, subs)
        default = "flow_matching" if kind == "train" else "freeflow"
        try:
            cfg = load_config_mapping(job, default_distiller=default)
        except (ConfigError, UnknownNameError) as e:
            raise ConfigError(f"recipe stage '{name}': {e}") from None
        if kind == "train" and cfg.distiller.name != "flow_matching":
            raise ConfigError(f"recipe stage '{name}': kind 'train' trains flow_matching; use kind "
                              f"'distill' for distiller {cfg.distiller.name!r}")
        if kind == "couple" and getattr(cfg.distiller, "couple", None) is None:
            raise ConfigError(f"recipe stage '{name}': kind 'couple' needs a distiller that trains on "
                              f"couplings (reflow, instaflow), got {cfg.distiller.name!r}")
        stages.append(Stage(name, kind, run_dir, job=cfg, job_yaml=job))
    return Recipe(path, out_dir, stages)
