"""Process-group setup and collective helpers; the only module that reads the launcher's environment.

Launchers (``torchrun``, ``deepspeed``, ``srun`` with exported variables, see machine-facts) describe a
process by ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` (plus ``MASTER_ADDR``/``MASTER_PORT`` for the
rendezvous). Every other module asks :func:`dist_info` or the process group, so a plain ``python script.py``
runs as rank 0 of 1 without any environment and without a process group.

Backends: ``nccl`` when CUDA is available, ``gloo`` otherwise (CPU tests use 2-process gloo groups).

**A dead rank ends the job** (:func:`start_peer_watch`, started by :func:`init_distributed` in every
multi-rank group). ``torchrun`` and the DeepSpeed launcher stop the other ranks when one dies, but ranks
started one by one (``srun`` exporting ``RANK``, a hand-written launcher) have nobody watching: a rank
killed with ``-9`` leaves the others blocked in their next collective, a gloo one until its timeout (30
minutes by default) and DeepSpeed's shared-memory all-reduce (stage 1 on CPU) forever, spinning. So every
rank learns the PIDs of the ranks on its own node when the group is made, and a daemon thread checks every
:data:`PEER_WATCH_INTERVAL_S` that they still live. A peer that is gone without having ended normally (it
leaves a flag file in :func:`peer_flag_dir` that only a normal end removes) makes this rank print
``error: rank R (pid P) on this node died ...`` and exit 1 at once. Ranks that leave normally (exit status
0 through :func:`exit_process`, or a normal interpreter exit) remove their flag first and are not
mourned; :func:`destroy` stops the watch of the rank that calls it.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import errno
import functools
import logging
import os
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Variables a launcher sets; without RANK + MASTER_ADDR + MASTER_PORT no rendezvous is possible.
RANK_ENV, LOCAL_RANK_ENV, WORLD_SIZE_ENV = "RANK", "LOCAL_RANK", "WORLD_SIZE"
MASTER_ADDR_ENV, MASTER_PORT_ENV = "MASTER_ADDR", "MASTER_PORT"

# Processes on this node: torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE.
LOCAL_WORLD_SIZE_ENVS = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE")

T = TypeVar("T")

USER_ERROR_EXIT = 2  # "error: <file/key>: <reason>": a mistake or condition the user can fix, not a bug
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

_group_backend: str | None = None  # the backend of the process group this process set up (see exit_process)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    Attributes:
        rank: global rank, 0 .. world_size - 1.
        local_rank: rank on this node; picks the CUDA device.
        world_size: number of processes in the job.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size or self.local_rank < 0:
            raise ValueError(f"inconsistent distributed info {self}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value != "" else default
    except ValueError as e:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from e


def dist_info() -> DistInfo:
    """This process's rank, local rank and world size.

    From the initialised process group when there is one (rank and world size), otherwise from the
    environment; absent variables give rank 0 / local rank 0 / world size 1 (a plain single process).
    """
    local_rank = _env_int(LOCAL_RANK_ENV, 0)
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), local_rank, dist.get_world_size())
    return DistInfo(_env_int(RANK_ENV, 0), local_rank, _env_int(WORLD_SIZE_ENV, 1))


def local_world_size() -> int | None:
    """How many processes of the job run on this node, as the launcher says; None when it did not say."""
    for name in LOCAL_WORLD_SIZE_ENVS:
        if os.environ.get(name, "") != "":
            return _env_int(name, 0)
    return None


def rendezvous_address() -> tuple[str, str]:
    """The launcher's ``(MASTER_ADDR, MASTER_PORT)``; empty strings where it set none."""
    return os.environ.get(MASTER_ADDR_ENV, ""), os.environ.get(MASTER_PORT_ENV, "")


def launched() -> bool:
    """True when a launcher (torchrun, deepspeed, srun with exports) set up a rendezvous for this process."""
    return all(k in os.environ for k in (RANK_ENV, WORLD_SIZE_ENV, MASTER_ADDR_ENV, MASTER_PORT_ENV))


def default_backend() -> str:
    """``nccl`` on a CUDA machine, ``gloo`` on CPU."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for single-node rendezvous in tests and 1-process groups)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


WAIT_REPORT_S = 10.0
"""A blocking wait of this module (the rendezvous, a barrier) longer than this is reported, and again at
every such interval: what it waits on, for how long."""


@contextlib.contextmanager
def reporting_wait(what: str, interval_s: float | None = None) -> Iterator[None]:
    """Run the block; while it blocks longer than ``interval_s`` (default :data:`WAIT_REPORT_S`), log a
    warning every ``interval_s`` saying ``waited N s for <what>``. For waits inside C++ (a rendezvous, a
    collective) that would otherwise be silent."""
    interval = WAIT_REPORT_S if interval_s is None else interval_s
    done = threading.Event()
    start = time.monotonic()

    def report() -> None:
        while not done.wait(interval):
            log.warning("waited %.0f s for %s", time.monotonic() - start, what)

    thread = threading.Thread(target=report, name="reclora-wait-report", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()


def init_distributed(
    backend: str | None = None,
    *,
    single_process_group: bool = False,
    timeout_s: float | None = None,
) -> DistInfo:
    """Initialise ``torch.distributed`` if this process is part of a multi-process job; return its place.

    A process group is created when ``WORLD_SIZE > 1`` or when a launcher set the rendezvous variables
    (``torchrun --nproc_per_node 1`` included). A plain ``python`` run gets no group and rank 0 of 1,
    unless ``single_process_group`` asks for a 1-rank group on 127.0.0.1 (DeepSpeed needs a group; without
    one it falls back to MPI). Calling it again once a group exists is a no-op.

    On CUDA the device is set from ``local_rank`` before the group is created.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; ``None`` picks :func:`default_backend`.
        single_process_group: create a 1-rank group even without a launcher.
        timeout_s: collective timeout; ``None`` keeps torch's default.
    """
    info = dist_info()
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    if dist.is_initialized():
        return info
    kwargs: dict[str, Any] = {"backend": backend or default_backend()}
    if timeout_s is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
    if info.world_size > 1 or launched():
        if not launched():
            raise RuntimeError(
                f"WORLD_SIZE={info.world_size} but {MASTER_ADDR_ENV}/{MASTER_PORT_ENV}/{RANK_ENV} are not all "
                "set: start the job with torchrun, deepspeed or srun exporting them"
            )
        addr, port = rendezvous_address()
        with reporting_wait(f"the {info.world_size} ranks to meet at {addr}:{port} (rank {info.rank})"):
            dist.init_process_group(**kwargs)  # env:// rendezvous
    elif single_process_group:
        # DeepSpeed and some libraries read these; set them only when no launcher did.
        os.environ.setdefault(RANK_ENV, "0")
        os.environ.setdefault(LOCAL_RANK_ENV, "0")
        os.environ.setdefault(WORLD_SIZE_ENV, "1")
        os.environ.setdefault(MASTER_ADDR_ENV, "127.0.0.1")
        os.environ.setdefault(MASTER_PORT_ENV, str(free_port()))
        dist.init_process_group(**kwargs, rank=0, world_size=1)
    else:
        return info
    global _group_backend
    _group_backend = str(dist.get_backend())
    info = dist_info()
    if info.world_size > 1:
        start_peer_watch()
    log.info(
        "process group %s: rank %d/%d (local %d)",
        kwargs["backend"],
        info.rank,
        info.world_size,
        info.local_rank,
    )
    return info


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    """True on global rank 0 (and in a plain single process)."""
    return dist_info().rank == 0


def barrier() -> None:
    """Wait for every rank (reported past :data:`WAIT_REPORT_S`); a no-op without a process group."""
    if dist.is_available() and dist.is_initialized():
        with reporting_wait(
            f"the other ranks at a barrier (rank {dist.get_rank()} of {dist.get_world_size()})"
        ):
            dist.barrier()


def destroy(*, synchronize: bool = True) -> None:
    """Tear down the process group if there is one.

    With ``synchronize`` (the default) every rank first waits at a barrier. gloo's worker threads release
    a finished collective's tensors after the caller has moved on; a process that exits right after its
    last collective can reach interpreter finalisation while a worker still holds them, and the worker
    then dies taking the GIL to free them: the process aborts with "terminate called without an active
    exception" (SIGABRT) after its work is done. ``destroy_process_group`` does not stop those threads
    while a library still references the group (transformers' ``from_pretrained`` does). The barrier
    gives them the round trip they need. Pass ``synchronize=False`` where another rank may never get
    here (an error that only this rank saw): a barrier would wait for it until the timeout.
    """
    stop_peer_watch()  # before the barrier: a peer may leave as soon as it is through
    if dist.is_available() and dist.is_initialized():
        if synchronize and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# the peer watch: a rank that dies ends the ranks of its node instead of leaving them blocked
# ----------------------------------------------------------------------------------------------------------

PEER_WATCH_INTERVAL_S = 1.0
PEER_FLAG_ROOT_ENV = "RECLORA_PEER_FLAGS"  # default: <tmp>/reclora_ds_peers
PEER_WATCH_ENV = "RECLORA_PEER_WATCH"  # "0" switches the watch off

_watch_stop = threading.Event()
_watch_thread: threading.Thread | None = None
_own_flag: Path | None = None
_exit_code: int | None = None  # set by exit_process: a flag is removed only on a normal end


@dataclass(frozen=True)
class _Peer:
    rank: int
    host: str
    pid: int
    start: str  # /proc/<pid>/stat start time: a reused PID is another process


def _start_time(pid: int) -> str:
    """The process's start time (clock ticks since boot) from ``/proc``; "" when it is gone or unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return "" if fields[0] in ("Z", "X") else fields[19]  # a zombie has ended already


def peer_flag_dir() -> Path:
    """Where the ranks of this job keep their "still running" flags: one folder per rendezvous address."""
    addr, port = rendezvous_address()
    root = os.environ.get(PEER_FLAG_ROOT_ENV) or os.path.join(tempfile.gettempdir(), "reclora_ds_peers")
    return Path(root) / f"{addr or 'local'}_{port or 'noport'}"


def _remove_own_flag() -> None:
    if _own_flag is not None and _exit_code in (None, 0):
        _own_flag.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            _own_flag.parent.rmdir()  # the last rank to leave removes the folder


def _sweep_dead_flags(root: Path) -> None:
    """Remove the flags of processes that no longer run (left by killed jobs), and emptied job folders."""
    for folder in root.glob("*") if root.is_dir() else ():
        try:
            flags = list(folder.glob("rank*.*"))
        except FileNotFoundError:  # another job's last rank removed its folder after it was listed
            continue
        for flag in flags:
            pid = flag.name.rpartition(".")[2]
            if pid.isdigit() and not _start_time(int(pid)):
                flag.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty


def start_peer_watch() -> None:
    """Watch the ranks of this node (module docstring); a collective, called by :func:`init_distributed`.

    Off with ``RECLORA_PEER_WATCH=0`` (every rank must agree: it is a collective).
    """
    global _watch_thread, _watch_stop, _own_flag
    if os.environ.get(PEER_WATCH_ENV, "1") == "0" or _watch_thread is not None:
        return
    me = _Peer(dist.get_rank(), socket.gethostname(), os.getpid(), _start_time(os.getpid()))
    _sweep_dead_flags(peer_flag_dir().parent)
    _own_flag = peer_flag_dir() / f"rank{me.rank}.{me.pid}"
    for attempt in range(100):  # another rank's sweep may remove the job folder between our mkdir and write
        _own_flag.parent.mkdir(parents=True, exist_ok=True)
        try:
            _own_flag.write_text(f"{me.pid}\n")
            break
        except FileNotFoundError:
            if attempt == 99:
                raise  # not a race any more: the folder cannot be kept (its error names the path)
    atexit.register(_remove_own_flag)
    peers: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(peers, me)
    local = [p for p in peers if p.host == me.host and p.rank != me.rank]
    if not local:
        return
    _watch_stop = threading.Event()  # a fresh one per watch: an old watch's thread only ever sees its own
    _watch_thread = threading.Thread(
        target=_watch, args=(me, local, _watch_stop), name="reclora-peer-watch", daemon=True
    )
    _watch_thread.start()


def stop_peer_watch() -> None:
    """Stop this rank's watch (a rank that is ending; see :func:`destroy`)."""
    global _watch_thread
    _watch_stop.set()
    _watch_thread = None


def _watch(me: _Peer, peers: list[_Peer], stop: threading.Event) -> None:
    flags = peer_flag_dir()
    while not stop.wait(PEER_WATCH_INTERVAL_S):
        for peer in peers:
            if _start_time(peer.pid) == peer.start:
                continue  # alive
            flag = flags / f"rank{peer.rank}.{peer.pid}"
            if not flag.exists():
                peers.remove(peer)  # it ended normally (it removes its flag before it ends)
                break
            if stop.is_set():
                return
            message = (
                f"error: rank {peer.rank} (pid {peer.pid}) on this node died (killed, or crashed before "
                f"reaching a collective); rank {me.rank} ends too instead of waiting for it in a collective"
            )
            print(message, file=sys.stderr, flush=True)
            global _exit_code
            _exit_code = 1  # this rank's flag stays too: the other ranks (if more) see it end abnormally
            os._exit(1)  # the main thread may be blocked in C++ (a collective): only this ends it


def uses_gloo() -> bool:
    """True when this process set up a gloo process group, or one is alive now (its gloo threads may be too)."""
    backends = [_group_backend or ""]
    if dist.is_available() and dist.is_initialized():
        backends.append(str(dist.get_backend()))
    return any("gloo" in backend for backend in backends)


def exit_process(code: int | None) -> NoReturn:
    """End an entry point's process with ``code`` (None: 0); with a gloo group, skip interpreter finalisation.

    Without a gloo group (NCCL, or no group at all) a group still alive is destroyed (no barrier: this may
    be a failing rank's exit) and the process exits normally through ``sys.exit``.

    With gloo: gloo's worker threads free a finished collective's tensors after the caller has moved on.
    When the process group outlives :func:`destroy` (DDP, DeepSpeed and transformers keep references to
    it), those threads are still alive at interpreter finalisation, and one that then needs the GIL to free
    a tensor takes the process down with SIGABRT ("terminate called without an active exception") after
    all its work is done: seen here about once in ten 2-rank runs under load, barrier or not. Upstream:
    https://github.com/pytorch/pytorch/issues/190489 (a gloo worker's decref takes the GIL during
    finalisation; guarding it narrows the window without closing it) and the abandoned
    https://github.com/pytorch/pytorch/pull/179291 (an atexit ``destroy_process_group``). Such a process
    runs its ``atexit`` handlers (profilers, loggers), flushes its streams and leaves with ``os._exit``,
    skipping only the finalisation; every file it wrote is closed by then (writers are closed by the
    recipes, outputs written atomically).
    """
    code = 0 if code is None else code
    global _exit_code
    _exit_code = code  # a failing rank keeps its peer flag: the others see it die and end too
    if not uses_gloo():
        destroy(synchronize=False)
        sys.exit(code)
    atexit._run_exitfuncs()  # what a normal exit runs before finalisation (logging.shutdown included)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def run_and_exit(main: Callable[[], int | None]) -> NoReturn:
    """Run an entry point's ``main`` and end the process with its return value through :func:`exit_process`.

    A ``SystemExit`` from ``main`` (argparse's errors, ``sys.exit``) keeps its code. A full disk
    (``OSError`` with ``ENOSPC``/``EDQUOT``, :class:`reclora_ds.files.DiskFullError` included) prints
    ``error: <message>`` and exits 2, without a traceback. Any other exception
    prints its traceback to stderr and exits 1 (130 for ``KeyboardInterrupt``) through the same path, so
    a failing gloo rank also skips the finalisation that could abort it, and a failing NCCL rank destroys
    its group. Use it as an entry point's last line: ``run_and_exit(main)``.
    """
    try:
        code = main()
    except SystemExit as exc:
        code = _system_exit_code(exc)
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:  # a full disk is no bug: say where, no traceback
            print(f"error: {exc}", file=sys.stderr)
            code = USER_ERROR_EXIT
        else:
            traceback.print_exc()
            code = 1
    except BaseException as exc:
        traceback.print_exc()
        code = 130 if isinstance(exc, KeyboardInterrupt) else 1
    exit_process(code)


def _system_exit_code(exc: SystemExit) -> int:
    """The status ``sys.exit`` gives for ``exc``: an int as it is, None as 0, anything else printed, and 1."""
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    print(exc.code, file=sys.stderr)
    return 1


def main_process_only(fn: Callable[..., T]) -> Callable[..., T | None]:
    """Decorator: run ``fn`` on rank 0 only (file writers, TensorBoard); other ranks get ``None``.

    It does not synchronise: call :func:`barrier` afterwards when other ranks read what rank 0 wrote.

    Example::

        @main_process_only
        def save_config(cfg, path): ...
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T | None:
        return fn(*args, **kwargs) if is_main_process() else None

    return wrapper


def _comm_device(tensor: torch.Tensor) -> torch.device:
    """Device a collective must run on: CUDA for nccl, CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_variable(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate, in rank order, a tensor whose first dimension differs between ranks.

    Every rank passes a tensor with the same number of dimensions, trailing sizes and dtype; the
    lengths along dim 0 may differ (0 included). Each rank pads its part to the longest, the parts and
    their lengths are all-gathered, and the padding is cut off again. Every rank gets the result, on
    the device of its input. Without a process group (or with one rank) the input is returned.

    Shapes: [n_r] -> [sum_r n_r], or [n_r, C] -> [sum_r n_r, C].
    """
    if not is_distributed():
        return tensor
    if tensor.dim() == 0:
        raise ValueError("all_gather_variable needs a tensor with at least one dimension")
    world = dist.get_world_size()
    device = _comm_device(tensor)
    shape = torch.tensor(tensor.shape, dtype=torch.int64, device=device)  # [ndim]
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    shapes_l = [tuple(s.tolist()) for s in shapes]
    if any(s[1:] != shapes_l[0][1:] for s in shapes_l):
        raise ValueError(f"all_gather_variable: trailing shapes differ between ranks: {shapes_l}")
    lengths = [s[0] for s in shapes_l]
    longest = max(lengths)
    if longest == 0:
        return tensor.new_empty((0, *tensor.shape[1:]))
    # gloo has no bool collectives: carry bools as uint8.
    part = tensor.to(device=device, dtype=torch.uint8 if tensor.dtype == torch.bool else tensor.dtype)
    padded = part.new_zeros((longest, *part.shape[1:]))
    padded[: part.shape[0]] = part
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    out = torch.cat([p[:n] for p, n in zip(parts, lengths)])
    return out.to(device=tensor.device, dtype=tensor.dtype)


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s picklable ``obj`` on every rank (the input elsewhere is ignored)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
