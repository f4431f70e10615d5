"""The project's one file-I/O module: checksums, atomic writes, fingerprints, versioned sidecars.

Every stage writes its outputs through these functions, so the guarantees are stated once:

* **Atomic files.** :func:`write_bytes_atomic` (and the text / JSON / ``.npy`` forms) write a temporary
  sibling with a name unique to the writer (``.<name>.tmp-<pid>-<random>``: two concurrent writers never
  share one), flush and fsync it, then ``os.replace`` it over the destination: a reader sees the old file or
  the new one, never half of one. On an error the temporary file is removed.
* **Atomic folders.** :func:`atomic_dir` yields an empty temporary sibling folder to fill; on success it
  replaces the destination (the old one renamed aside first, then removed); on an error the destination is
  untouched.
* **A full disk** (``ENOSPC``/``EDQUOT``, or a library's own write error while the file system has no room
  left, e.g. the errno-less ``RuntimeError`` of ``torch.save``) inside :func:`atomic_file` or
  :func:`atomic_dir` raises :class:`DiskFullError`, which names the destination and the space left and
  says that the previous content is unchanged; the temporary is removed first, so its space is given back.
  :func:`reclora_ds.distributed.run_and_exit` prints it as ``error: ...`` (exit 2), without a traceback.
* **Checksums.** :func:`sha256_file` (and :func:`md5_file`, for checksums that publishers give in md5)
  hashes the bytes of a file in chunks.
* **Fingerprints.** :func:`files_fingerprint` is the cheap identity of a set of input files (names, sizes,
  modification times), for deciding whether a stage is stale without reading many GB.
* **Versioned sidecars.** :func:`write_sidecar` / :func:`read_sidecar`: a JSON description with
  ``format`` and ``format_version`` keys, checked on read against what the reader understands, with
  required keys named in the error.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

HASH_CHUNK_BYTES = 4 << 20
OLD_SUFFIX = ".old"  # atomic_dir: the previous folder during the swap (see resolve_old)
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded")
LOW_SPACE_BYTES = 1 << 20
"""Below this much free space a library's own write error (one that carries no errno) counts as a full disk."""


class SidecarError(ValueError):
    """A sidecar file is missing, not JSON, of another format or version, or lacks a key (all named)."""


class DiskFullError(OSError):
    """A write through :func:`atomic_file` / :func:`atomic_dir` ran out of space; the destination is unchanged.

    An ``OSError`` with ``errno.ENOSPC``, ``filename`` the destination and ``strerror`` the reason (free
    space, what is left as it was); ``str()`` is ``<destination>: <reason>``, ready to print after ``error:``.
    """

    def __init__(self, path: str | os.PathLike[str], free_bytes: int | None) -> None:
        free = "unknown" if free_bytes is None else f"{free_bytes / 2**20:.1f} MiB"
        reason = (
            f"no space left on the device while writing it ({free} free there); the previous "
            f"{Path(path).name} is unchanged (nothing was replaced): free some space and run again"
        )
        super().__init__(errno.ENOSPC, reason, str(path))  # strerror: the reason, filename: the path

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


def free_bytes(path: str | os.PathLike[str]) -> int | None:
    """Bytes an unprivileged writer can still use on the file system of ``path`` (or its nearest existing
    parent); None when it cannot be asked."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def is_disk_full(exc: BaseException, where: str | os.PathLike[str] | None = None) -> bool:
    """True when ``exc`` (or an exception it was raised from) is ``ENOSPC``/``EDQUOT`` or says so in its text
    (safetensors' ``SafetensorError``); with ``where``, also a write error (not a ValueError, TypeError or
    LookupError) while the file system of ``where`` has less than :data:`LOW_SPACE_BYTES` free:
    ``torch.save`` reports a failed write as a ``RuntimeError`` that names no cause."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return True
        if any(text in str(current) for text in DISK_FULL_TEXTS):  # safetensors: "... (os error 28)"
            return True
        current = current.__cause__ or current.__context__
    if where is not None and not isinstance(exc, (ValueError, TypeError, LookupError)):
        free = free_bytes(where)
        return free is not None and free < LOW_SPACE_BYTES
    return False


def md5_file(path: str | os.PathLike[str]) -> str:
    """Hex md5 of the file's bytes (only for checking a publisher's md5, never as this project's own checksum)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as stream:
        while chunk := stream.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike[str], on_chunk: Callable[[int], object] | None = None) -> str:
    """Hex sha256 of the file's bytes; ``on_chunk(n_bytes)`` after each chunk (e.g. a progress bar)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
            if on_chunk is not None:
                on_chunk(len(chunk))
    return digest.hexdigest()


def temporary_sibling(path: str | os.PathLike[str]) -> Path:
    """A hidden name beside ``path`` unique to this writer: ``.<name>.tmp-<pid>-<8 hex>``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def remove_stale_temporaries(path: str | os.PathLike[str]) -> None:
    """Remove the temporary siblings of ``path`` (files or folders) whose writer process no longer runs."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        try:
            pid = int(stale.name[len(path.name) + 6 :].split("-")[0])
            os.kill(pid, 0)  # raises when no such process
            continue
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError):
            continue  # not ours, or a live process of another user
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling to write; on success it is fsynced and renamed over ``path``.

    On an error ``path`` is untouched and the temporary removed; a full disk raises :class:`DiskFullError`.
    """
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        with open(tmp, "rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except Exception as exc:
        full = is_disk_full(exc, path.parent)  # asked before the temporary gives its space back
        tmp.unlink(missing_ok=True)
        if full and not (isinstance(exc, DiskFullError) and exc.filename == str(path)):
            # name the destination, not a hidden temporary file written inside it
            raise DiskFullError(path, free_bytes(path.parent)) from exc
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | os.PathLike[str], payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def save_npy_atomic(path: str | os.PathLike[str], array: np.ndarray) -> str:
    """``np.save`` through a temporary sibling; returns the sha256 of the bytes written."""
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as stream:
            np.save(stream, array)
        digest = sha256_file(tmp)
    return digest


def _fsync_tree(path: Path) -> None:
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Write a folder atomically: yields an empty temporary sibling to fill; on success it replaces ``path``.

    The old folder is renamed aside (``<name>.old``), the new one renamed into place, and the old one
    deleted. A process killed at any point leaves either the old or the new complete folder (under its
    own name or as ``<name>.old``; :func:`resolve_old` finds it); the temporary folder of a killed writer
    is removed by the next call. On an exception the temporary folder is removed and ``path`` is untouched;
    a full disk raises :class:`DiskFullError`.
    """
    path = Path(path)
    remove_stale_temporaries(path)  # left by a killed writer
    tmp = temporary_sibling(path)
    old = path.with_name(path.name + OLD_SUFFIX)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException as exc:
        full = isinstance(exc, Exception) and is_disk_full(exc, path.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        if full and not (isinstance(exc, DiskFullError) and exc.filename == str(path)):
            # name the destination, not a hidden temporary file written inside it
            raise DiskFullError(path, free_bytes(path.parent)) from exc
        raise
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)  # the atomic step
    shutil.rmtree(old, ignore_errors=True)


def resolve_old(path: str | os.PathLike[str]) -> Path:
    """``path``, or its ``<name>.old`` left by an :func:`atomic_dir` swap that a kill interrupted."""
    path = Path(path)
    old = path.with_name(path.name + OLD_SUFFIX)
    return old if not path.exists() and old.exists() else path


def files_fingerprint(folder: str | os.PathLike[str], paths: Sequence[str | os.PathLike[str]]) -> str:
    """sha256 over the relative names, sizes and modification times of ``paths`` under ``folder``.

    Metadata, not contents: instant on raw data of many GB (a stage that needs the contents' identity
    records :func:`sha256_file` of what it read). Replacing or editing a file changes its size or mtime.
    """
    folder = Path(folder)
    listing = sorted(
        f"{Path(p).relative_to(folder)}:{Path(p).stat().st_size}:{Path(p).stat().st_mtime_ns}" for p in paths
    )
    return hashlib.sha256("\n".join(listing).encode()).hexdigest()


def write_sidecar(path: str | os.PathLike[str], kind: str, version: int, payload: dict[str, Any]) -> None:
    """Write ``{"format": kind, "format_version": version, **payload}`` atomically as JSON."""
    write_json_atomic(path, {"format": kind, "format_version": version, **payload})


def read_sidecar(
    path: str | os.PathLike[str], kind: str, version: int, required: Sequence[str] = ()
) -> dict[str, Any]:
    """A sidecar written by :func:`write_sidecar`, checked: format, version, required keys."""
    path = Path(path)
    if not path.is_file():
        raise SidecarError(f"{path}: missing")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SidecarError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != kind:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise SidecarError(f"{path}: format {found!r}, expected {kind!r}")
    if data.get("format_version") != version:
        raise SidecarError(
            f"{path}: format_version {data.get('format_version')!r}, this reclora_ds reads {version} "
            "(written by another version: write it again)"
        )
    missing = [key for key in required if key not in data]
    if missing:
        raise SidecarError(f"{path}: lacks the key(s) {missing}")
    return data


def link_or_copy(source: Path, target: Path) -> None:
    """``target`` gets ``source``'s content: a hard link (no copy; this toolkit's writers never modify a file
    in place, they replace it) or, across file systems, a copy; through a temporary name, so ``target`` is
    never half a file."""
    tmp = temporary_sibling(target)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copy2(source, tmp)
    os.replace(tmp, target)


def listing(folder: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes": size, "sha256": hex}}`` of the files ``names`` (relative paths) under ``folder``."""
    return {
        name: {"bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
        for name in sorted(names)
    }


def listing_problems(
    folder: Path,
    listed: dict[str, dict[str, Any]],
    sidecar: str,
    *,
    also_allowed: Iterable[str] = (),
    verify_sha256: Iterable[str] = (),
    optional_dirs: Iterable[str] = (),
) -> list[str]:
    """Differences between ``folder`` and the files its ``sidecar`` lists (empty list: it matches).

    Checked: every listed file exists with the listed size; the sha256 of the files in ``verify_sha256``;
    no other entry at the top of the folder except ``sidecar``, ``also_allowed`` and hidden temporaries;
    in a listed subfolder (a name of ``listed`` containing ``/``) no unlisted file. A folder of
    ``optional_dirs`` may be absent as a whole (e.g. the shard cache, deletable), never in part.
    """
    problems = []
    optional = set(optional_dirs)
    absent_dirs = {d for d in optional if not (folder / d).exists()}
    for name, info in listed.items():
        top = name.split("/")[0]
        if top in absent_dirs:
            continue
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is listed in {sidecar} but missing")
        elif path.stat().st_size != info.get("bytes"):
            problems.append(f"{name} has {path.stat().st_size} bytes, {sidecar} lists {info.get('bytes')}")
        elif name in set(verify_sha256) and sha256_file(path) != info.get("sha256"):
            problems.append(f"{name} has another sha256 than {sidecar} lists (changed after it was written)")
    tops = {name.split("/")[0] for name in listed}
    allowed = tops | {sidecar, *also_allowed}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue  # a writer's temporary (removed by the next write)
        if entry.name not in allowed:
            problems.append(f"{entry.name} is in the folder but not listed in {sidecar} (from another run?)")
        elif entry.is_dir():
            for file in sorted(p for p in entry.rglob("*") if p.is_file()):
                rel = file.relative_to(folder).as_posix()
                if rel not in listed and not file.name.startswith("."):
                    problems.append(f"{rel} is in the folder but not listed in {sidecar} (from another run?)")
    return problems
