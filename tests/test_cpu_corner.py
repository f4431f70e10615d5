"""The CPU extras stay in their corner, and entry points end the same way on success and on an error.

- No model module imports :mod:`reclora_ds.cpu` (parsed with ``ast``, and checked again at import time, so
  an indirect import is caught too). Which modules may import it at all is ``tests/test_layers.py``'s rule.
- :func:`reclora_ds.distributed.run_and_exit` exits with ``main``'s code, and on an exception prints the
  traceback and exits 1, with and without a gloo process group.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.launch import clean_env

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "reclora_ds"
CORNER = "reclora_ds.cpu"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every module a file imports, at any depth of its code (``from a import b`` gives ``a`` and ``a.b``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this file's package
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def in_corner(name: str) -> bool:
    return name == CORNER or name.startswith(CORNER + ".")


def test_imported_modules_sees_every_import_form(tmp_path):
    pkg = tmp_path / "reclora_ds" / "models"
    pkg.mkdir(parents=True)
    file = pkg / "x.py"
    for line in ("import reclora_ds.cpu.kernels", "from reclora_ds import cpu", "from .. import cpu as c"):
        file.write_text(f"def f():\n    {line}\n")  # inside a function, too
        assert any(in_corner(n) for n in imported_modules(file, tmp_path)), line
    file.write_text("from . import ops\nimport reclora_ds.cpuinfo\n")
    assert not any(in_corner(n) for n in imported_modules(file, tmp_path))


@pytest.mark.parametrize("path", sorted((PACKAGE / "models").rglob("*.py")), ids=lambda p: p.name)
def test_no_model_module_imports_the_cpu_corner(path):
    assert not [n for n in imported_modules(path) if in_corner(n)], f"{path} imports {CORNER}"


def test_importing_the_models_loads_nothing_of_the_corner():
    """Also indirectly: the model package, the CRM registry and the checkpoint reader leave it unloaded."""
    code = (
        "import sys, reclora_ds.models.registry, reclora_ds.models.ops, reclora_ds.training.checkpoint\n"
        f"print(sorted(m for m in sys.modules if m == {CORNER!r} or m.startswith({CORNER + '.'!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------------------
# run_and_exit
# ---------------------------------------------------------------------------------------------------------


def run_entry_point(body: str, group: bool) -> subprocess.CompletedProcess:
    """A script whose ``main`` runs ``body``, ended by run_and_exit; ``group``: a 1-rank gloo group first.

    An atexit handler prints ``atexit ran``: normal exits and the gloo path both run the handlers."""
    script = textwrap.dedent(
        """
        import atexit
        from reclora_ds import distributed as D

        atexit.register(lambda: print("atexit ran", flush=True))

        def main():
            if {group}:
                D.init_distributed("gloo", single_process_group=True)
                D.barrier()
        {body}

        D.run_and_exit(main)
        """
    ).format(group=group, body=textwrap.indent(textwrap.dedent(body), "    "))
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=clean_env(), timeout=120
    )


@pytest.mark.parametrize("group", [False, True], ids=["no group", "gloo group"])
def test_run_and_exit_prints_the_traceback_and_exits_1_on_an_exception(group):
    proc = run_entry_point("raise ValueError('broken input on purpose')", group)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr
    assert "ValueError: broken input on purpose" in proc.stderr
    assert "atexit ran" in proc.stdout
    assert "terminate called" not in proc.stderr


@pytest.mark.parametrize("group", [False, True], ids=["no group", "gloo group"])
@pytest.mark.parametrize(
    ("body", "code"),
    [("return 0", 0), ("return None", 0), ("return 3", 3), ("raise SystemExit(2)", 2)],
)
def test_run_and_exit_exits_with_mains_code(group, body, code):
    proc = run_entry_point(body, group)
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr and "atexit ran" in proc.stdout


def test_exit_path_depends_on_the_backend(monkeypatch):
    from reclora_ds import distributed as D

    monkeypatch.setattr(D, "_group_backend", None)
    assert not D.uses_gloo()  # no group: a normal exit
    monkeypatch.setattr(D, "_group_backend", "nccl")
    assert not D.uses_gloo()
    monkeypatch.setattr(D, "_group_backend", "gloo")
    assert D.uses_gloo()
