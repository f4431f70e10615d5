"""No silent waits on a JIT build (reclora_ds.cpu.build_lock): a build lock left by a process killed during
a torch-extension build is cleared with a message, a live one is waited for with a message, and the real
loads (the CPU kernels, DeepSpeed's shm comm op) go through with a planted stale lock instead of waiting
forever."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reclora_ds.cpu import build_lock
from tests.launch import clean_env


@pytest.fixture
def fast(monkeypatch):
    """Short thresholds, so the waits of these tests take a second, not minutes."""
    monkeypatch.setattr(build_lock, "STALE_LOCK_AGE_S", 0.5)
    monkeypatch.setattr(build_lock, "WAIT_REPORT_S", 0.3)
    monkeypatch.setattr(build_lock, "POLL_S", 0.05)


def plant(folder: Path, age_s: float) -> Path:
    """A baton file as torch's FileBaton leaves it, ``age_s`` seconds old."""
    folder.mkdir(parents=True, exist_ok=True)
    baton = folder / build_lock.BATON_FILE
    baton.touch()
    then = time.time() - age_s
    os.utime(baton, (then, then))
    return baton


def test_a_dead_builders_lock_is_removed_with_a_message(tmp_path, caplog):
    baton = plant(tmp_path / "ext", age_s=60)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING), build_lock.guarded_build("ext", tmp_path / "ext") as folder:
        assert not baton.exists()  # cleared before the load would take the baton
    assert time.monotonic() - start < 2
    assert folder == tmp_path / "ext"
    assert f"removed the stale build lock {baton}" in caplog.text
    assert (folder / build_lock.OWNER_FILE).read_text().strip() == str(os.getpid())


def test_a_young_lock_is_waited_for_then_cleared(tmp_path, caplog, fast):
    """Younger than STALE_LOCK_AGE_S, the baton may belong to a build between its steps: it is waited for
    (reported past WAIT_REPORT_S), then cleared once old enough with nobody working in the folder."""
    baton = plant(tmp_path / "ext", age_s=-0.5)  # 1 s until it is stale
    with caplog.at_level(logging.WARNING), build_lock.guarded_build("ext", tmp_path / "ext"):
        assert not baton.exists()
    assert f"s on {baton}, the build lock of the extension 'ext'" in caplog.text
    assert "removed the stale build lock" in caplog.text


def test_a_live_foreign_build_is_waited_for_and_its_lock_left_to_it(tmp_path, caplog, fast):
    """A process at work in the build folder (as ninja is) holds the baton: reported, never deleted; it
    removes its own baton when done."""
    folder = tmp_path / "ext"
    baton = plant(folder, age_s=60)
    builder = subprocess.Popen(["sh", "-c", "sleep 1.5; rm lock"], cwd=folder)
    try:
        with caplog.at_level(logging.WARNING), build_lock.guarded_build("ext", folder):
            assert not baton.exists()  # we got through only once the builder removed its baton
    finally:
        builder.wait()
    assert f"(processes [{builder.pid}" in caplog.text
    assert "removed the stale build lock" not in caplog.text
    assert not baton.exists()


def test_another_reclora_process_holding_the_owner_lock_is_reported(tmp_path, caplog, fast):
    folder = tmp_path / "ext"
    folder.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(folder / build_lock.OWNER_FILE)!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.write(fd, f'{os.getpid()}\\n'.encode())\n"
            "print('held', flush=True)\n"
            "time.sleep(1.5)\n"
        )],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with caplog.at_level(logging.WARNING), build_lock.guarded_build("ext", folder):
            assert holder.poll() is not None
    finally:
        holder.wait()
    assert f"for process {holder.pid} to finish building or loading the extension 'ext'" in caplog.text


def test_the_owner_lock_dies_with_its_process(tmp_path, fast):
    """A holder killed with -9 releases the owner flock at once (the kernel does): no stale owner lock."""
    folder = tmp_path / "ext"
    folder.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import fcntl, os, time\n"
            f"fd = os.open({str(folder / build_lock.OWNER_FILE)!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('held', flush=True)\n"
            "time.sleep(600)\n"
        )],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    start = time.monotonic()
    with build_lock.guarded_build("ext", folder):
        pass
    assert time.monotonic() - start < 1


def _copy_cached_build(name: str, root: Path) -> None:
    """Copy this machine's cached build of ``name`` (if any) into the test's extensions root, so the load
    below is a cached load rather than a full compile (a missing cache just means a slower test)."""
    from torch.utils.cpp_extension import _get_build_directory

    cached = Path(_get_build_directory(name, False))
    if (cached / f"{name}.so").is_file():
        shutil.copytree(
            cached, root / name, dirs_exist_ok=True, ignore=shutil.ignore_patterns("lock", "*.owner")
        )


LOADS = {
    "reclora_ds_cpu_kernels": "from reclora_ds.cpu import kernels; assert kernels.load(required=True)",
    "deepspeed_shm_comm": (
        "from reclora_ds.cpu import enable_cpu_extras, shm_allreduce; enable_cpu_extras(prebuild_deepspeed_comm=True); "
        "import deepspeed.ops.op_builder.builder as b; assert 'deepspeed_shm_comm' in b.OpBuilder._loaded_ops"
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LOADS))
def test_real_loads_go_through_a_planted_stale_lock(tmp_path, name):
    """The real load path (stage 1's kernels; DeepSpeed's shm op as stage 2 preloads it before
    ``deepspeed.initialize``) with a stale ``lock`` planted in its build folder: torch alone would poll
    for it forever; here the run clears it, says so, and loads."""
    root = tmp_path / "torch_extensions"
    _copy_cached_build(name, root)
    baton = plant(root / name, age_s=600)
    run = subprocess.run(
        [sys.executable, "-c", f"import logging; logging.basicConfig(); {LOADS[name]}"],
        env=clean_env(TORCH_EXTENSIONS_DIR=str(root)),
        capture_output=True,
        text=True,
        timeout=400,  # a cold cache compiles (up to a few minutes on 2 busy cores); a hang would never end
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"removed the stale build lock {baton}" in run.stderr
    assert not baton.exists()


def test_a_long_wait_in_a_collective_says_what_it_waits_on(caplog):
    """reclora_ds.distributed.reporting_wait (around the rendezvous and every barrier): silent for a short
    block, then one message per interval naming what is waited on."""
    from reclora_ds.distributed import reporting_wait

    with caplog.at_level(logging.WARNING), reporting_wait("a quick thing", interval_s=0.5):
        time.sleep(0.05)
    assert "a quick thing" not in caplog.text
    with caplog.at_level(logging.WARNING), reporting_wait("the other ranks at a barrier", interval_s=0.1):
        time.sleep(0.45)
    messages = [r.getMessage() for r in caplog.records if "the other ranks at a barrier" in r.getMessage()]
    assert 2 <= len(messages) <= 5 and all(m.startswith("waited ") for m in messages)
    time.sleep(0.3)  # the reporter stopped with the block
    assert len([r for r in caplog.records if "barrier" in r.getMessage()]) == len(messages)
