"""The installed package is the product: a wheel of the working tree runs the pipeline outside the checkout.

Fast tests: how a relative config path finds the shipped configs (``reclora_ds/package_data.py``): the
working directory's file first, then the packaged copy it names (logged), never another file.

Slow test: build the wheel of a copy of the working tree, check what it holds (the DeepSpeed JSONs and the
launch YAMLs as package data, byte for byte the repository's files; the command modules), install it into a
fresh venv that sees this environment's third-party packages but not its editable ``reclora_ds``, and run
that venv's ``reclora-ds pipeline`` on the tiny pipeline config from a folder outside the repository: every
stage runs the installed modules and ends with ``report.md``.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

from reclora_ds import package_data
from reclora_ds.package_data import find_ds_config, resolve_launch_config
from tests.launch import clean_env
from tests.pipeline.tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]
# What a copy of the working tree leaves out: version control, environments, build and run outputs, caches.
NOT_SOURCE = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "runs", "outputs", ".*cache")


# ----------------------------------------------------------------------------------------------------------
# Relative config paths
# ----------------------------------------------------------------------------------------------------------


def test_the_package_folders_are_the_repository_folders():
    """One copy of each file: in a checkout the package's folders are the top-level ones."""
    assert package_data.DS_CONFIGS.resolve() == (ROOT / "ds_configs").resolve()
    assert package_data.LAUNCH_CONFIGS.resolve() == (ROOT / "launch" / "configs").resolve()
    assert sorted(p.name for p in package_data.DS_CONFIGS.glob("*.json"))
    assert (package_data.LAUNCH_CONFIGS / "quickstart.yaml").is_file()


def test_a_ds_config_in_the_working_directory_comes_first(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ds_configs").mkdir()
    (tmp_path / "ds_configs" / "zero2_fp32.json").write_text("{}")
    with caplog.at_level(logging.INFO, logger="reclora_ds.package_data"):
        assert find_ds_config("ds_configs/zero2_fp32.json") == Path("ds_configs/zero2_fp32.json")
    assert "packaged" not in caplog.text
    assert str((tmp_path / "ds_configs" / "zero2_fp32.json").resolve()) in caplog.text


@pytest.mark.parametrize("given", ["ds_configs/zero2_fp32.json", "zero2_fp32.json"])
def test_a_missing_ds_config_is_the_packaged_copy_it_names_and_logged(given, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="reclora_ds.package_data"):
        found = find_ds_config(given)
    assert found == package_data.DS_CONFIGS / "zero2_fp32.json"
    assert f"using the packaged copy {found}" in caplog.text


@pytest.mark.parametrize("given", ["configs/zero2_fp32.json", "ds_configs/no_such.json"])
def test_another_missing_ds_config_is_an_error_not_a_packaged_file(given, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="zero2_bf16.json"):  # the message lists the shipped ones
        find_ds_config(given)


def test_a_launch_config_path_that_exists_is_used(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart.yaml").write_text("pipeline: {}\n")
    assert resolve_launch_config("quickstart.yaml") == "quickstart.yaml"
    assert resolve_launch_config(None) is None


@pytest.mark.parametrize("given", ["quickstart.yaml", "launch/configs/quickstart.yaml"])
def test_a_shipped_launch_config_is_found_by_its_name(given, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="reclora_ds.package_data"):
        found = resolve_launch_config(given)
    assert found == package_data.LAUNCH_CONFIGS / "quickstart.yaml"
    assert f"config {given}: not in {tmp_path}, using the packaged copy {found}" in caplog.text


@pytest.mark.parametrize("given", ["other/quickstart.yaml", "no_such.yaml"])
def test_another_missing_launch_config_stays_missing(given, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_launch_config(given) == given  # the config loader reports it


# ----------------------------------------------------------------------------------------------------------
# The wheel, installed into a fresh venv, runs the pipeline outside the checkout
# ----------------------------------------------------------------------------------------------------------


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{argv}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def build_wheel(tmp_path: Path) -> Path:
    """The wheel of a copy of the working tree (no stale ``build/``; the repository stays untouched)."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    dist = tmp_path / "dist"
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), "."],
        cwd=src,
    )  # fmt: skip
    (wheel,) = dist.glob("reclora_ds-*.whl")
    return wheel


def check_wheel_contents(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for folder, packaged in (("ds_configs", "ds_configs"), ("launch/configs", "launch_configs")):
            files = sorted((ROOT / folder).iterdir())
            assert files
            for path in files:  # a copy of each repository file, not a link
                assert zf.read(f"reclora_ds/{packaged}/{path.name}") == path.read_bytes(), path
        for module in (ROOT / "reclora_ds" / "commands").glob("*.py"):
            assert f"reclora_ds/commands/{module.name}" in names
    assert not [n for n in names if n.split("/")[0] in ("launch", "tools", "ds_configs", "tests")], names


def fresh_venv(tmp_path: Path) -> tuple[Path, Path]:
    """A new venv whose sys.path ends with this environment's site-packages as plain paths (a ``.pth``
    line): its third-party packages are importable, the ``.pth`` files there (the editable ``reclora_ds``
    finder) are not processed. Returns (python, site-packages)."""
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    site = Path(
        run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip()
    )
    ours = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (site / "reclora_test_deps.pth").write_text("".join(f"{p}\n" for p in ours))
    return python, site


@pytest.mark.slow
@pytest.mark.distributed
def test_the_wheel_runs_the_pipeline_outside_the_checkout(tmp_path, ml1m_dir, plora_assets):
    start = time.perf_counter()
    wheel = build_wheel(tmp_path)
    check_wheel_contents(wheel)
    python, site = fresh_venv(tmp_path)
    env = {k: v for k, v in clean_env().items() if k != "PYTHONPATH"}
    env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
    # pip is this environment's (through the .pth); --ignore-installed: the editable reclora-ds of the same
    # version is visible there, and must neither count as installed nor be touched
    run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
        env=env,
    )

    elsewhere = tmp_path / "elsewhere"  # outside the repository: `python -m` puts the working directory first
    elsewhere.mkdir()
    where = run([str(python), "-c", "import reclora_ds; print(reclora_ds.__file__)"], cwd=elsewhere, env=env)
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout
    probe = "from reclora_ds.package_data import resolve_launch_config as r; print(r('quickstart.yaml'))"
    shipped = run([str(python), "-c", probe], cwd=elsewhere, env=env)
    assert Path(shipped.stdout.strip()) == site / "reclora_ds" / "launch_configs" / "quickstart.yaml"

    config = tiny_config(tmp_path, ml1m_dir, plora_assets["backbone"], "installed")
    reclora_ds = str(python.parent / "reclora-ds")
    # one stage-2 mode is enough here: tests/pipeline runs both
    argv = [reclora_ds, "pipeline", "--config", str(config), "pipeline.modes=[plora]"]
    proc = run(argv, cwd=elsewhere, env=env, timeout=900)
    run_dir = tmp_path / "runs" / "installed"
    assert (run_dir / "report.md").is_file(), proc.stdout[-4000:]
    assert f"report: {run_dir / 'report.md'}" in proc.stdout
    logs = {p.stem: p.read_text() for p in (run_dir / "_pipeline").glob("*.log")}
    for stage, log in logs.items():  # a file the package reads at run time is missing from the wheel
        assert "No such file or directory" not in log, f"{stage}:\n{log[-3000:]}"
    # stage 2 ran the installed module and found the tiny config's `ds_configs/zero2_fp32.json` in the wheel
    assert "--module reclora_ds.commands.train_plora" in logs["plora"], logs["plora"][-3000:]
    assert (
        f"using the packaged copy {site / 'reclora_ds' / 'ds_configs' / 'zero2_fp32.json'}" in logs["plora"]
    )
    print(f"wheel built, installed and pipeline run in {time.perf_counter() - start:.0f} s")
