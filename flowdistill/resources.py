"""Shipped data: the job configs (``configs/``) and the small weights (``assets/``).

Both folders live once, at the top of the repository; the build maps them into the package
(``pyproject.toml``/``setup.py``: ``flowdistill.configs`` = ``configs/``, ``flowdistill.assets`` =
``assets/``), so a wheel, a non-editable ``pip install .`` and an editable install all find them
through :mod:`importlib.resources` — and a source checkout on ``sys.path`` without any install
finds the folders beside the package. Every piece of code that reads a shipped config or asset goes
through :func:`config_path` / :func:`asset_path`, never through ``Path(__file__).parents[...]``.

    >>> from flowdistill.resources import config_path, asset_path
    >>> config_path("freeflow_checkerboard.yaml")      # .../flowdistill/configs/freeflow_checkerboard.yaml
    >>> asset_path("digits_teacher")                   # a model directory (load_model_dir)
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

CONFIGS_PACKAGE = "flowdistill.configs"
ASSETS_PACKAGE = "flowdistill.assets"
_REPO = Path(__file__).resolve().parents[1]  # the checkout, when the package is used from source


def _root(package: str, folder: str) -> Path:
    """The directory that holds ``package``'s files (or the checkout's ``folder`` as a fallback)."""
    try:
        root = importlib.resources.files(package)
    except (ModuleNotFoundError, TypeError):  # not installed with the mapping (a bare checkout)
        root = None
    if root is not None:
        path = Path(str(root))
        if path.is_dir():
            return path
    return _REPO / folder


def configs_dir() -> Path:
    """The folder of shipped job configs (``configs/`` in the repository)."""
    return _root(CONFIGS_PACKAGE, "configs")


def assets_dir() -> Path:
    """The folder of shipped weights (``assets/`` in the repository)."""
    return _root(ASSETS_PACKAGE, "assets")


def _resolve(base: Path, name: str | Path, what: str, listing: list[str]) -> Path:
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"{what} name must be relative to the shipped folder, got {str(name)!r}")
    path = base / rel
    if not path.exists():
        raise FileNotFoundError(f"no shipped {what} {str(name)!r} in {base} (shipped: {', '.join(listing)})")
    return path


def list_configs() -> list[str]:
    """Names of the shipped configs, relative to :func:`configs_dir` (``recipes/x.yaml`` for sub-folders)."""
    base = configs_dir()
    return sorted(p.relative_to(base).as_posix() for p in base.rglob("*.yaml"))


def list_assets() -> list[str]:
    """Names of the shipped assets (the top-level entries of :func:`assets_dir`)."""
    base = assets_dir()
    return sorted(p.name for p in base.iterdir() if not p.name.startswith(("_", ".")))


def config_path(name: str | Path) -> Path:
    """Path of the shipped config ``name`` (e.g. ``"freeflow_checkerboard.yaml"``; ``.yaml`` may be
    left off). A name that is not shipped is a :class:`FileNotFoundError` listing those that are."""
    name = str(name)
    if not name.endswith((".yaml", ".yml")):
        name += ".yaml"
    return _resolve(configs_dir(), name, "config", list_configs())


def asset_path(name: str | Path) -> Path:
    """Path of the shipped asset ``name`` (``"digits_teacher"``, ``"digits_classifier.safetensors"``,
    ``"checkerboard_teacher"``). A missing one is a :class:`FileNotFoundError` listing those shipped."""
    return _resolve(assets_dir(), name, "asset", list_assets())
