"""The entry points are modules of ``reclora_ds.commands``; ``launch/*.py`` and ``tools/*.py`` only call them.

* every wrapper imports its command's ``main`` and defines nothing (one copy of the code), and every command
  has a wrapper;
* every wrapper still runs as the documented ``python launch/x.py`` / ``python tools/x.py``, from any folder;
* ``reclora-ds <command>`` runs a command of the package.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from reclora_ds import cli

ROOT = Path(__file__).parents[2]
WRAPPERS = sorted((ROOT / "launch").glob("*.py")) + sorted((ROOT / "tools").glob("*.py"))
# tools/prepare_data.py wraps `reclora-ds prepare`, which stays in reclora_ds/cli.py
CLI_WRAPPERS = {"prepare_data": "reclora_ds.cli"}


def wrapped_module(path: Path) -> str:
    return CLI_WRAPPERS.get(path.stem, f"reclora_ds.commands.{path.stem}")


@pytest.mark.parametrize("path", WRAPPERS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_wrapper_only_imports_its_command(path):
    tree = ast.parse(path.read_text())
    definitions = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert not definitions, f"{path}: code belongs in {wrapped_module(path)}, found {definitions}"
    imported = {(n.module, a.name) for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
    assert (wrapped_module(path), "main") in imported, imported


def test_every_command_has_its_wrapper():
    wrapped = {p.stem for p in WRAPPERS if p.stem not in CLI_WRAPPERS}
    assert wrapped == set(cli.command_names())


@pytest.mark.slow
def test_every_wrapper_runs_from_another_folder(tmp_path):
    """``python <wrapper> --help`` from a folder outside the checkout prints its command's help."""

    def run(path: Path) -> subprocess.CompletedProcess:
        argv = [sys.executable, str(path), "--help"]
        return subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(WRAPPERS, pool.map(run, WRAPPERS)))
    for path, proc in results.items():
        assert proc.returncode == 0 and proc.stdout.startswith("usage: "), f"{path}:\n{proc.stderr[-3000:]}"
        if path.stem not in CLI_WRAPPERS:
            module = ROOT / "reclora_ds" / "commands" / path.name
            summary = ast.get_docstring(ast.parse(module.read_text())).splitlines()[0]
            assert " ".join(summary.split()) in " ".join(proc.stdout.split()), (path, proc.stdout)


def test_reclora_ds_runs_a_command_of_the_package(tmp_path, capsys):
    out = tmp_path / "synthetic"
    assert cli.main(["make_synthetic_ml25m", "--out", str(out), "--rows", "3000"]) == 0
    assert "wrote SYNTHETIC ML-25M layout" in capsys.readouterr().out
    assert (out / "ratings.csv").is_file() and (out / "movies.csv").is_file()
