"""The import rule of docs/ARCHITECTURE.md section 0, checked on the source: who may import whom.

Every ``import`` / ``from ... import`` of a ``reclora_ds`` module anywhere in a file (function-level
imports included) is read with ``ast``; a module's layer is its first package component under
``reclora_ds`` (``reclora_ds/data/loader.py`` -> ``data``, ``reclora_ds/files.py`` -> ``files``).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "reclora_ds"

FOUNDATION = {"__init__", "config", "files", "batch", "distributed", "package_data"}
# layer -> the layers it may import (besides itself). Anything not listed may import nothing of reclora_ds.
ALLOWED: dict[str, set[str]] = {
    "__init__": set(),
    "config": set(),
    "files": set(),
    "batch": set(),
    "distributed": set(),
    "package_data": set(),
    "download": {"__init__", "files"},
    "data": {"__init__", "config", "files", "batch"},
    "models": {"batch"},  # pure: no I/O, no data layer, no training, no platform code
    "metrics": {"distributed"},
    "comparison": {"metrics"},
    "backbone": {"files"},
    "llm_loader": {"backbone", "models"},  # registers the models' attention function with transformers
    "cpu": {"distributed", "models"},  # fills the models' ops seam; only recipes and scoring import it
    "malloc_preload": set(),  # a process's malloc: run by a command's entry, read by the stage-2 recipe
    "retrieval": FOUNDATION | {"data", "backbone", "llm_loader"},
    "training": FOUNDATION
    | {"data", "models", "metrics", "cpu", "backbone", "llm_loader", "retrieval", "malloc_preload"},
    "pipeline": FOUNDATION | {"data", "models", "metrics", "comparison", "training", "retrieval", "backbone"},
    "experiments": FOUNDATION | {"data", "metrics", "training", "pipeline"},
    "commands": FOUNDATION
    | {
        "data",
        "models",
        "metrics",
        "comparison",
        "training",
        "retrieval",
        "backbone",
        "llm_loader",
        "pipeline",
        "download",
        "experiments",
        "malloc_preload",
    },
    "cli": FOUNDATION | {"data", "pipeline", "commands", "malloc_preload"},
    "__main__": {"cli"},
    "config_docs": FOUNDATION | {"data", "training", "retrieval", "pipeline"},
}
# who may import the CPU extras (platform code): the recipes and the scoring runner that switch them on
CPU_IMPORTERS = {"training/crm_recipe.py", "training/plora_recipe.py", "training/scoring.py"}


def layer_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_layers(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module != "reclora_ds":
                names = [node.module]
            else:  # from reclora_ds import <submodule> | <a name defined in reclora_ds/__init__.py>
                names = [
                    f"reclora_ds.{a.name}"
                    if (PACKAGE / a.name).is_dir() or (PACKAGE / f"{a.name}.py").is_file()
                    else "reclora_ds"
                    for a in node.names
                ]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "reclora_ds":
                out.add(parts[1] if len(parts) > 1 else "__init__")
    return out


def test_every_module_imports_only_the_layers_it_may():
    problems = []
    layers_seen = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = layer_of(path)
        layers_seen.add(layer)
        if layer not in ALLOWED:
            problems.append(f"{path.relative_to(PACKAGE)}: layer {layer!r} has no rule in ALLOWED")
            continue
        for used in sorted(imported_layers(path) - {layer}):
            if used not in ALLOWED[layer]:
                problems.append(f"{path.relative_to(PACKAGE)} ({layer}) imports {used}")
            if used == "cpu" and str(path.relative_to(PACKAGE)) not in CPU_IMPORTERS:
                problems.append(f"{path.relative_to(PACKAGE)} imports the CPU extras")
    assert not problems, "\n".join(problems)
    assert {"data", "models", "training", "retrieval", "pipeline", "config"} <= layers_seen


def test_the_rule_catches_a_violation(tmp_path):
    """The checker itself: a model file that imports the training layer is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from reclora_ds.training.checkpoint import load_crm\n")
    assert imported_layers(bad) == {"training"}
    assert "training" not in ALLOWED["models"]
