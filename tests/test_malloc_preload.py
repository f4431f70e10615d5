"""reclora_ds.malloc_preload: which malloc a process runs, and re-running a command with one preloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from reclora_ds import malloc_preload
from reclora_ds.malloc_preload import (
    ensure_allocator,
    library_path,
    loaded_allocator,
    preload_environment,
)
from tests.launch import ROOT

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="LD_PRELOAD and /proc/self/maps are Linux's")
MIMALLOC = library_path("mimalloc") if sys.platform == "linux" else None
needs_mimalloc = pytest.mark.skipif(MIMALLOC is None, reason="the cmeel-mimalloc wheel is not installed")

# Prints one JSON line per pass through ensure_allocator: before it (a re-executed process prints again) and
# after it; the command line's extra arguments must survive the re-execution.
PROBE = textwrap.dedent(
    """
    import json, os, sys
    from reclora_ds.malloc_preload import declare_process_entry, ensure_allocator, loaded_allocator
    declare_process_entry()
    print(json.dumps({"at": "before", "pid": os.getpid(), "malloc": loaded_allocator()}), flush=True)
    got = ensure_allocator(sys.argv[1], "plora.cpu_allocator")
    with open("/proc/self/maps") as maps:  # the independent look: is the library mapped at all?
        mapped = any("/libmimalloc.so" in line for line in maps)
    print(json.dumps({"at": "after", "pid": os.getpid(), "argv": sys.argv[1:], "got": got, "mapped": mapped,
                      "malloc": loaded_allocator(), "purge": os.environ.get("MIMALLOC_PURGE_DELAY")}))
    """
)


def probe(tmp_path, choice: str, **env: str) -> list[dict]:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", malloc_preload.REEXECUTED)}
    run = subprocess.run(
        [sys.executable, "-u", str(script), choice, "--an-argument", "with space"],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in run.stdout.splitlines()]


def test_loaded_allocator_reads_the_mapped_libraries():
    system = "7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
    assert loaded_allocator(system) == "system"
    assert (
        loaded_allocator(system + "7f02-7f03 r-xp 0 08:01 2 /venv/cmeel.prefix/lib/libmimalloc.so.3\n")
        == "mimalloc"
    )
    assert loaded_allocator(system + "7f02-7f03 r-xp 0 08:01 2 /usr/lib/libjemalloc.so.2\n") == "jemalloc"
    assert (
        loaded_allocator(system + "7f02-7f03 r-xp 0 08:01 2 /usr/lib/libtcmalloc_minimal.so.4\n")
        == "tcmalloc"
    )


def test_preload_environment_puts_the_library_first_and_keeps_the_users_options():
    env = preload_environment("mimalloc", "/x/libmimalloc.so.3", {"LD_PRELOAD": "/y/libfoo.so", "A": "1"})
    assert env == {"LD_PRELOAD": "/x/libmimalloc.so.3 /y/libfoo.so", "A": "1", "MIMALLOC_PURGE_DELAY": "-1"}
    mine = preload_environment("jemalloc", "libjemalloc.so.2", {"MALLOC_CONF": "narenas:1"})
    assert mine == {"LD_PRELOAD": "libjemalloc.so.2", "MALLOC_CONF": "narenas:1"}


@linux_only
@needs_mimalloc
@pytest.mark.parametrize("choice", ["mimalloc", "auto"])
def test_a_command_runs_itself_again_with_mimalloc_preloaded(tmp_path, choice):
    lines = probe(tmp_path, choice)
    assert [line["at"] for line in lines] == ["before", "before", "after"]  # one re-execution, then on
    assert [line["malloc"] for line in lines] == ["system", "mimalloc", "mimalloc"]
    assert len({line["pid"] for line in lines}) == 1  # os.execve: the launcher's process, still
    assert lines[-1]["argv"] == [choice, "--an-argument", "with space"]
    assert lines[-1]["got"] == "mimalloc" and lines[-1]["mapped"] and lines[-1]["purge"] == "-1"


@linux_only
@needs_mimalloc
def test_the_users_own_mimalloc_option_is_kept(tmp_path):
    assert probe(tmp_path, "mimalloc", MIMALLOC_PURGE_DELAY="10")[-1]["purge"] == "10"


@linux_only
def test_system_leaves_the_process_as_it_started(tmp_path):
    lines = probe(tmp_path, "system")
    assert [(line["at"], line["malloc"]) for line in lines] == [("before", "system"), ("after", "system")]
    assert lines[-1]["got"] == "system" and not lines[-1]["mapped"]


@linux_only
@needs_mimalloc
def test_an_allocator_the_user_preloaded_is_reported_or_refused_by_name(tmp_path):
    lines = probe(tmp_path, "auto", LD_PRELOAD=MIMALLOC)
    assert [(line["at"], line.get("got")) for line in lines] == [
        ("before", None),
        ("after", "mimalloc"),
    ]
    script = tmp_path / "probe.py"
    env = {**os.environ, "LD_PRELOAD": MIMALLOC}
    run = subprocess.run(
        [sys.executable, str(script), "jemalloc"], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode != 0
    assert "plora.cpu_allocator=jemalloc: this process already runs mimalloc" in run.stderr


def no_exec(*args):
    raise AssertionError(f"os.execve called: {args}")


def test_an_explicit_choice_that_cannot_be_had_names_the_key(monkeypatch):
    monkeypatch.setattr(malloc_preload.os, "execve", no_exec)
    monkeypatch.setattr(malloc_preload, "loaded_allocator", lambda: "system")
    monkeypatch.setattr(malloc_preload.platform, "system", lambda: "Linux")
    monkeypatch.setattr(malloc_preload, "library_path", lambda name: None)
    with pytest.raises(ValueError, match=r"plora.cpu_allocator=jemalloc: no libjemalloc on this system"):
        ensure_allocator("jemalloc", "plora.cpu_allocator")
    with pytest.raises(
        ValueError, match=r"plora.cpu_allocator=mimalloc: the cmeel-mimalloc wheel is not installed"
    ):
        ensure_allocator("mimalloc", "plora.cpu_allocator")
    assert ensure_allocator("auto", "plora.cpu_allocator") == "system"  # auto: the system's, said in the log
    with pytest.raises(ValueError, match=r"plora.cpu_allocator must be one of"):
        ensure_allocator("tcmalloc", "plora.cpu_allocator")
    monkeypatch.setattr(malloc_preload.platform, "system", lambda: "Darwin")
    with pytest.raises(
        ValueError, match=r"plora.cpu_allocator=mimalloc: preloading an allocator needs Linux"
    ):
        ensure_allocator("mimalloc", "plora.cpu_allocator")


def test_a_library_the_loader_refused_is_not_tried_twice(monkeypatch):
    """The re-executed process still runs the system's malloc (the loader ignored LD_PRELOAD): an explicit
    choice fails with the reason, auto goes on with the system's; neither executes a third time."""
    monkeypatch.setattr(malloc_preload.os, "execve", no_exec)
    monkeypatch.setattr(malloc_preload, "loaded_allocator", lambda: "system")
    monkeypatch.setattr(malloc_preload.platform, "system", lambda: "Linux")
    monkeypatch.setattr(malloc_preload, "library_path", lambda name: "/gone/libmimalloc.so.3")
    monkeypatch.setattr(malloc_preload, "_process_entry", True)
    monkeypatch.setenv(malloc_preload.REEXECUTED, "1")
    with pytest.raises(ValueError, match=r"plora.cpu_allocator=mimalloc: the dynamic loader did not preload"):
        ensure_allocator("mimalloc", "plora.cpu_allocator")
    assert ensure_allocator("auto", "plora.cpu_allocator") == "system"


def test_a_command_called_inside_another_program_never_runs_that_program_again(monkeypatch):
    """No entry point declared this process a command's (pytest here): auto keeps the running malloc, an
    explicit choice says why it cannot be had."""
    monkeypatch.setattr(malloc_preload.os, "execve", no_exec)
    monkeypatch.setattr(malloc_preload, "loaded_allocator", lambda: "system")
    monkeypatch.setattr(malloc_preload.platform, "system", lambda: "Linux")
    monkeypatch.setattr(malloc_preload, "library_path", lambda name: "/some/libmimalloc.so.3")
    monkeypatch.setattr(malloc_preload, "_process_entry", False)
    assert ensure_allocator("auto", "plora.cpu_allocator") == "system"
    with pytest.raises(ValueError, match=r"plora.cpu_allocator=mimalloc: this command runs inside another"):
        ensure_allocator("mimalloc", "plora.cpu_allocator")


@linux_only
@needs_mimalloc
def test_the_stage2_command_reports_an_allocator_it_cannot_have_as_a_user_error(tmp_path):
    """Through ``python -m reclora_ds.commands.train_plora``: exit 2 and one ``error:`` line naming the key,
    before any heavy work (no output folder made)."""
    env = {**os.environ, "LD_PRELOAD": MIMALLOC}
    env.pop(malloc_preload.REEXECUTED, None)
    out = tmp_path / "run"
    run = subprocess.run(
        [
            sys.executable, "-m", "reclora_ds.commands.train_plora",
            "--config", "launch/configs/plora_quickstart.yaml", f"output_dir={out}", "cpu_allocator=jemalloc",
        ],
        env=env, capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr[-3000:]
    assert "error: plora.cpu_allocator=jemalloc: this process already runs mimalloc" in run.stderr
    assert "Traceback" not in run.stderr and not out.exists()


def test_auto_on_a_gpu_keeps_the_system_malloc(monkeypatch):
    monkeypatch.setattr(malloc_preload.os, "execve", no_exec)
    monkeypatch.setattr(malloc_preload, "loaded_allocator", lambda: "system")
    assert ensure_allocator("auto", "plora.cpu_allocator", cuda=True) == "system"


def test_auto_looks_up_jemalloc_only_where_mimalloc_is_missing(monkeypatch):
    """jemalloc's lookup runs ldconfig: a rank that has mimalloc does not pay for it at start."""
    asked = []

    def lookup(name):
        asked.append(name)
        return {"mimalloc": "/some/libmimalloc.so.3", "jemalloc": "libjemalloc.so.2"}[name] if has else None

    monkeypatch.setattr(malloc_preload.os, "execve", no_exec)
    monkeypatch.setattr(malloc_preload, "loaded_allocator", lambda: "system")
    monkeypatch.setattr(malloc_preload.platform, "system", lambda: "Linux")
    monkeypatch.setattr(malloc_preload, "library_path", lookup)
    monkeypatch.setattr(malloc_preload, "_process_entry", False)  # in-process: nothing is executed
    has = True
    ensure_allocator("auto", "plora.cpu_allocator")
    assert asked == ["mimalloc"]
    asked.clear()
    has = False
    assert ensure_allocator("auto", "plora.cpu_allocator") == "system"
    assert asked == ["mimalloc", "jemalloc"]
