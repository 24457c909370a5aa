"""Imports point down the layers only (DESIGN.md §2), checked on the source of every module,
including imports inside functions. The jobs layer (api.py, config.py, runs.py: one job = one
config) sits under recipes/ (which chain jobs) and integrations/ (whose export loads a run), and
over eval/ (api draws progress plots)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "flowdistill"
ORDER = ["cli", "recipes", "integrations", "jobs", "eval", "distillers", "training", "models", "data",
         "core", "kernels", "base"]
TOP_FILES = {"cli": "cli", "demo": "cli", "__main__": "cli", "api": "jobs", "config": "jobs", "runs": "jobs",
             "errors": "base", "atomic": "base", "resources": "base", "plugins": "base", "__init__": "base"}
TOP_FILES["cli_pipeline"] = "cli"  # the cli's handlers of diffusers pipeline runs
TOP_FILES["cli_parser"] = "cli"  # the cli's argument parser
TOP_FILES["cli_stream"] = "cli"  # the cli's stream command (StreamDiT runs)
TOP_FILES["api_build"] = "jobs"  # api's building of a job's distiller (student, guided teacher, checks)


def layer(module: str) -> str:
    """The layer of a dotted ``flowdistill...`` module name."""
    parts = module.split(".")
    if len(parts) == 1:
        return "base"
    return TOP_FILES.get(parts[1], parts[1])


def imports(path: Path) -> list[str]:
    """Every ``flowdistill`` module that ``path`` imports (module level or inside functions)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flowdistill"):
            out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("flowdistill")]
    return out


def test_every_import_points_down():
    bad, unknown = [], set()
    for f in sorted(PACKAGE.rglob("*.py")):
        mod = ".".join(f.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        src = layer(mod)
        for target in imports(f):
            dst = layer(target)
            for name in (src, dst):
                if name not in ORDER:
                    unknown.add(name)
            if src in ORDER and dst in ORDER and ORDER.index(dst) < ORDER.index(src):
                bad.append(f"{mod} ({src}) imports {target} ({dst})")
    assert not unknown, f"modules outside every layer: {sorted(unknown)} (add them to ORDER)"
    assert not bad, "\n".join(bad)


def test_the_check_sees_an_upward_import(tmp_path):
    """The checker itself: an import from core into api is found (so the test above can fail)."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from flowdistill.api import train\n")
    assert imports(f) == ["flowdistill.api"]
    assert ORDER.index(layer("flowdistill.api")) < ORDER.index(layer("flowdistill.core.paths"))
