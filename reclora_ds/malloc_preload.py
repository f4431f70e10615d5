"""A faster ``malloc`` for a CPU rank: mimalloc or jemalloc preloaded, by re-executing the process once.

A stage-2 training step on a CPU allocates and frees thousands of tensors whose sizes change with every
micro-batch's prompt length. glibc's ``malloc`` serves them with a search of its free lists
(``_int_malloc``) and gives large blocks back to the kernel, so the next step page-faults them in again. An
allocator with size-class pages that keeps its freed memory does neither; what that buys is measured in
docs/PLORA_BENCH.md ("A faster malloc").

``malloc`` is replaced only by a library loaded before the C library's is first used: ``LD_PRELOAD`` at
process start. :func:`ensure_allocator` therefore executes the process's own command line
(``sys.orig_argv``) again, once, with the library preloaded and told to keep freed memory
(:data:`KEEP_FREED`), before any heavy work. ``os.execve`` keeps the process id and its open files, so a
launcher that watches its ranks (deepspeed, torchrun, SLURM) sees the same process. Only a process whose
entry point called :func:`declare_process_entry` is executed again: a command's ``main`` called inside
another program (a test, a notebook) leaves that program as it is.

Choices (``plora.cpu_allocator``):

- ``auto``: mimalloc where the ``cmeel-mimalloc`` wheel is installed (a dependency of this package on
  Linux x86_64 / aarch64), else jemalloc where the system has ``libjemalloc``, else the system's.
- ``mimalloc`` / ``jemalloc``: that one; an error naming the key where it cannot be loaded.
- ``system``: the C library's ``malloc``, as the process started.

An allocator the user preloaded already is kept: ``auto`` and ``system`` report it, an explicit other
choice is an error. Where the user's environment sets the allocator's own option
(``MIMALLOC_PURGE_DELAY``, ``MALLOC_CONF``), theirs is kept. Linux only (macOS has no ``LD_PRELOAD``).
"""

from __future__ import annotations

import ctypes.util
import importlib.metadata
import logging
import os
import platform
import re
import sys
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

ALLOCATORS = ("auto", "mimalloc", "jemalloc", "system")
PRELOADABLE = ("mimalloc", "jemalloc")  # auto's order
KEEP_FREED = {
    "mimalloc": ("MIMALLOC_PURGE_DELAY", "-1"),  # never return freed pages to the OS
    "jemalloc": ("MALLOC_CONF", "dirty_decay_ms:-1,muzzy_decay_ms:-1"),  # the same for jemalloc
}
MAPPED_ALLOCATOR = re.compile(r"/lib(mimalloc|jemalloc|tcmalloc)[._-]")  # a library path in /proc/self/maps
REEXECUTED = "RECLORA_DS_ALLOCATOR_REEXEC"  # set in the re-executed process: never a second time


_process_entry = False  # declare_process_entry() was called: this process's command line is a command's


class AllocatorError(ValueError):
    """A ``cpu_allocator`` choice that cannot be had here; the message names the key and the reason."""


def library_path(name: str) -> str | None:
    """The shared library to preload for ``name`` (mimalloc / jemalloc), or None where it is not installed."""
    if name == "mimalloc":
        try:
            files = importlib.metadata.distribution("cmeel-mimalloc").files or []
        except importlib.metadata.PackageNotFoundError:
            return None
        # the versioned soname (libmimalloc.so.3), not the static archive or the bare development link
        candidates = sorted(
            (f for f in files if f.name.startswith("libmimalloc.so.") and f.name.count(".") == 2),
            key=str,
        )
        for candidate in candidates:
            path = Path(candidate.locate())
            if path.is_file():
                return str(path)
        return None
    if name == "jemalloc":
        return ctypes.util.find_library("jemalloc")  # a soname the dynamic loader resolves, or None
    raise ValueError(f"no library for allocator {name!r}")


def loaded_allocator(maps: str | None = None) -> str:
    """The ``malloc`` this process runs: ``mimalloc``, ``jemalloc``, ``tcmalloc`` or ``system``.

    Read from the libraries mapped into the process (``/proc/self/maps``, or ``maps`` given); one of those
    libraries is only mapped here when it was preloaded or linked, and then it serves ``malloc``.
    """
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return "system"
    found = MAPPED_ALLOCATOR.search(maps)
    return found.group(1) if found else "system"


def preload_environment(name: str, library: str, env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with ``library`` first in ``LD_PRELOAD`` and ``name``'s keep-freed option unless already set."""
    out = dict(env)
    out["LD_PRELOAD"] = " ".join(p for p in (library, env.get("LD_PRELOAD", "")) if p)
    option, value = KEEP_FREED[name]
    out.setdefault(option, value)
    return out


def declare_process_entry() -> None:
    """Say that this process's command line runs a command (an entry point's ``__main__`` calls this), so
    :func:`ensure_allocator` may execute it again. A command's ``main`` called inside another program (a
    test, a notebook) never re-executes that program."""
    global _process_entry
    _process_entry = True


def _unavailable(name: str) -> str:
    if name == "mimalloc":
        return "the cmeel-mimalloc wheel is not installed (pip install cmeel-mimalloc)"
    return "no libjemalloc on this system (Debian: apt-get install libjemalloc2)"


def ensure_allocator(choice: str, key: str, cuda: bool = False) -> str:
    """Run this process under ``choice`` (module docstring); return the allocator it runs.

    ``cuda``: the process computes on a GPU, where ``auto`` keeps the system's ``malloc`` (the host's
    allocations are not where a GPU step's time goes); an explicit choice still applies.

    May not return: where a library has to be preloaded, the process's command line is executed again
    with it (the same pid), and the new process reaches this call again and returns. Call it from a
    command, before heavy work; it re-executes only a process whose entry point called
    :func:`declare_process_entry` (elsewhere ``auto`` keeps the running ``malloc``, an explicit choice is
    an error).

    Raises:
        AllocatorError: naming ``key``, where an explicit choice cannot be had (not Linux, not installed,
            another allocator preloaded by the user, or the loader refused the library).
    """
    if choice not in ALLOCATORS:
        raise AllocatorError(f"{key} must be one of {ALLOCATORS}, got {choice!r}")
    running = loaded_allocator()
    if choice == "system" or running == choice or (choice == "auto" and cuda):
        return running
    if running != "system":  # preloaded by the user
        if choice == "auto":
            return running
        raise AllocatorError(
            f"{key}={choice}: this process already runs {running} "
            f"(LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r}); set {key}=auto or drop it from LD_PRELOAD"
        )
    if platform.system() != "Linux":
        if choice == "auto":
            return "system"
        raise AllocatorError(f"{key}={choice}: preloading an allocator needs Linux (LD_PRELOAD)")
    wanted = [choice] if choice != "auto" else list(PRELOADABLE)
    # the first one installed; the later ones are not looked up (jemalloc's lookup runs ldconfig)
    found = next(((name, library) for name in wanted if (library := library_path(name))), None)
    if found is None:
        if choice != "auto":
            raise AllocatorError(f"{key}={choice}: {_unavailable(choice)}")
        log.info("malloc: the system's (%s)", "; ".join(_unavailable(n) for n in PRELOADABLE))
        return "system"
    name, library = found
    if not _process_entry:
        reason = "this command runs inside another program (no entry point declared it), which is not re-run"
        if choice != "auto":
            raise AllocatorError(f"{key}={choice}: {reason}")
        log.info("malloc: %s: %s", running, reason)
        return running
    if os.environ.get(REEXECUTED):
        reason = f"the dynamic loader did not preload {library} (LD_PRELOAD={os.environ.get('LD_PRELOAD')!r})"
        if choice != "auto":
            raise AllocatorError(f"{key}={choice}: {reason}")
        log.warning("malloc: the system's: %s", reason)
        return "system"
    env = preload_environment(name, library, os.environ)
    env[REEXECUTED] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    raise AssertionError("unreachable: os.execve returned")  # pragma: no cover
