"""No silent waits on a JIT build: a stale torch-extension build lock is found, reported and cleared.

``torch.utils.cpp_extension.load`` builds an extension once into ``TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions/py<ver>_<cpu|cu..>/<name>``) and serialises processes with a *file baton*: the
first creates ``<build dir>/lock`` (``O_CREAT | O_EXCL``) and deletes it when done; every other process polls
for the file every 0.1 s, forever, without a word. Every load takes the baton, even one that only loads the
cached library. A process killed with ``-9`` while it holds the baton (during a 10 s - 2 min build) leaves
the file behind, and every later run then waits on it forever at 0% CPU.

This toolkit loads two extensions on the CPU: its own kernels (:mod:`reclora_ds.cpu.kernels`, stage 1)
and DeepSpeed's shared-memory all-reduce ``deepspeed_shm_comm`` (:mod:`reclora_ds.cpu.shm_allreduce`,
stage 1's DDP hook; stage 2's ``deepspeed.initialize`` loads it too, see
:func:`reclora_ds.cpu.enable_cpu_extras` ``prebuild_deepspeed_comm``). Each load runs inside
:func:`guarded_build`:

1. **Owner lock.** The process takes an exclusive ``flock`` on ``<build dir>/reclora_ds_build.owner`` and
   writes its PID there. The kernel drops a ``flock`` when its holder dies, however it dies, so this lock
   is never stale: processes of this toolkit take turns, and one that waits logs, every
   :data:`WAIT_REPORT_S` seconds, the PID it waits for and the folder.
2. **Stale baton.** Holding the owner lock, no process of this toolkit is inside a load of this extension,
   so a ``lock`` file there was left by a dead one, or belongs to a build that is not ours (another
   program on the same cache). A build at work runs ``ninja`` and the compiler in the build folder (so does
   the compiler of a killed run, which finishes on its own); so
   the baton is **stale** when no process has its working directory in the build folder and the file is
   older than :data:`STALE_LOCK_AGE_S`. A stale baton is deleted with a warning that names it; a live one is
   waited for, with the same periodic message.

``TORCH_EXTENSIONS_DIR`` is read as torch reads it (:func:`build_directory`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

BATON_FILE = "lock"  # torch.utils.cpp_extension's FileBaton in the build folder
OWNER_FILE = "reclora_ds_build.owner"
STALE_LOCK_AGE_S = 5.0
"""A baton younger than this is never taken for stale: a build that is not ours may be between its steps."""
WAIT_REPORT_S = 5.0
"""A wait longer than this is reported (what it waits on), and again every such interval."""
POLL_S = 0.2
PROC = Path("/proc")


def build_directory(name: str) -> Path:
    """The folder where ``torch.utils.cpp_extension.load(name=...)`` builds (created if missing)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, False))


def processes_working_in(folder: Path) -> list[int]:
    """PIDs of the processes whose working directory is ``folder`` or below (a build's ninja and compilers).

    Processes whose ``/proc/<pid>/cwd`` cannot be read (another user's) are not seen.
    """
    folder = folder.resolve()
    found = []
    for entry in PROC.iterdir() if PROC.is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        if cwd == folder or folder in cwd.parents:
            found.append(int(entry.name))
    return found


def baton_is_stale(folder: Path, now: float | None = None) -> bool:
    """True when ``folder/lock`` exists, is older than :data:`STALE_LOCK_AGE_S` and no process works in
    ``folder``. Only meaningful while holding the owner lock (module docstring, step 2)."""
    baton = folder / BATON_FILE
    try:
        age = (time.time() if now is None else now) - baton.stat().st_mtime
    except FileNotFoundError:
        return False
    return age > STALE_LOCK_AGE_S and not processes_working_in(folder)


def _owner_pid(owner: Path) -> str:
    with contextlib.suppress(OSError):
        text = owner.read_text().strip()
        if text:
            return text
    return "unknown"


class _Reporter:
    """Logs ``message()`` once a wait passes ``WAIT_REPORT_S`` seconds, then every ``WAIT_REPORT_S``."""

    def __init__(self, message: Callable[[float], str]) -> None:
        self.start = time.monotonic()
        self.next = self.start + WAIT_REPORT_S
        self.message = message

    def tick(self) -> None:
        now = time.monotonic()
        if now >= self.next:
            log.warning(self.message(now - self.start))
            self.next = now + WAIT_REPORT_S


@contextlib.contextmanager
def guarded_build(name: str, folder: Path | None = None) -> Iterator[Path]:
    """Run a ``torch.utils.cpp_extension`` load of extension ``name`` inside: no silent or endless wait on a
    dead process's build lock (module docstring). Yields the build folder.

    Example::

        with guarded_build("reclora_ds_cpu_kernels"):
            torch.utils.cpp_extension.load(name="reclora_ds_cpu_kernels", sources=[...])
    """
    folder = build_directory(name) if folder is None else folder
    folder.mkdir(parents=True, exist_ok=True)
    owner = folder / OWNER_FILE
    fd = os.open(owner, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        reporter = _Reporter(
            lambda waited: (
                f"waited {waited:.0f} s for process {_owner_pid(owner)} to finish building or "
                f"loading the extension {name!r} in {folder} (it holds {owner})"
            )
        )
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                reporter.tick()
                time.sleep(POLL_S)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _clear_or_wait_for_baton(name, folder)
        yield folder
    finally:
        os.close(fd)  # releases the flock


def _clear_or_wait_for_baton(name: str, folder: Path) -> None:
    baton = folder / BATON_FILE
    reporter = _Reporter(
        lambda waited: (
            f"waited {waited:.0f} s on {baton}, the build lock of the extension {name!r}: a build "
            f"is at work there (processes {processes_working_in(folder)}: another program's, or the compiler "
            "of a killed run finishing); once nothing works there and the file is "
            f"{STALE_LOCK_AGE_S:g} s old, it is deleted"
        )
    )
    while baton.exists():
        if baton_is_stale(folder):
            with contextlib.suppress(FileNotFoundError):
                baton.unlink()
            log.warning(
                "removed the stale build lock %s of the extension %r: the process that held it is gone "
                "(killed during a build or load; nothing works in %s); it is built or loaded again now",
                baton,
                name,
                folder,
            )
            return
        reporter.tick()
        time.sleep(POLL_S)
