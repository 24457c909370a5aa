"""``--plugin MODULE``: import the user's modules before a config is read.

A module registers its own datasets (``flowdistill.data.registry.register_dataset``), models
(``flowdistill.models.MODELS.register``) and distillers (``flowdistill.distillers.register_distiller``)
on import; configs then name them. Configs themselves never import anything.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

from flowdistill.errors import PluginError


def _is_path(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or (os.altsep is not None and os.altsep in spec)


def _import_file(spec: str) -> ModuleType:
    """Import the ``.py`` file (or package directory) ``spec`` under its own stem as module name."""
    path = Path(spec)
    if not path.exists():
        raise PluginError(f"--plugin {spec}: no such file")
    is_pkg = path.is_dir()
    file = path / "__init__.py" if is_pkg else path
    if is_pkg and not file.is_file():
        raise PluginError(f"--plugin {spec}: a directory without __init__.py is not a Python package")
    if file.suffix != ".py":
        raise PluginError(f"--plugin {spec}: not a Python file (expected a .py file or a module name)")
    name = path.resolve().name if is_pkg else path.stem
    have = sys.modules.get(name)
    if have is not None:
        if getattr(have, "__file__", None) and Path(have.__file__).resolve() == file.resolve():
            return have  # imported before (a second --plugin of the same file)
        raise PluginError(f"--plugin {spec}: the module name {name!r} is taken by "
                          f"{getattr(have, '__file__', None) or 'a built-in module'}; rename the file")
    mspec = importlib.util.spec_from_file_location(
        name, file, submodule_search_locations=[str(path)] if is_pkg else None)
    if mspec is None or mspec.loader is None:
        raise PluginError(f"--plugin {spec}: cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(mspec)
    sys.modules[name] = module
    try:
        mspec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def load_plugins(specs: Iterable[str]) -> list[ModuleType]:
    """Import each ``--plugin``: a module name (``importlib.import_module``, looked up on
    ``sys.path``) or a path to a ``.py`` file or package directory (imported under its stem).

    The datasets, models and distillers a module registers on import can then be named in a
    config. Importing the same module again is a no-op. A module that cannot be found or that
    raises while importing is a :class:`~flowdistill.errors.PluginError` naming it and the error.
    """
    modules = []
    for spec in specs:
        try:
            modules.append(_import_file(spec) if _is_path(spec) else importlib.import_module(spec))
        except PluginError:
            raise
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else ""
            hint = ""
            missing = getattr(e, "name", None) if isinstance(e, ModuleNotFoundError) else None
            if missing and (spec == missing or spec.startswith(missing + ".")):
                hint = (" (a module name is looked up on sys.path; give a file by its path, "
                        f"e.g. --plugin ./{spec.replace('.', '/')}.py)")
            raise PluginError(f"--plugin {spec}: importing it failed: {type(e).__name__}: "
                              f"{msg}{hint}") from None
    return modules
