"""Fixtures of the fault tests: a small tmpfs (a full disk on demand) and process-tree checks."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def _mount_tmpfs(where: Path, size_bytes: int) -> None:
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(where)],
        check=True,
        capture_output=True,
        text=True,
    )


@pytest.fixture
def small_tmpfs(tmp_path) -> Iterator[Callable[[int], Path]]:
    """``small_tmpfs(size_bytes)`` mounts a tmpfs of that size under ``tmp_path`` and returns its folder;
    every mount is unmounted when the test ends (even a failing one). Skips the test where mounting is not
    permitted (not root, no CAP_SYS_ADMIN in a container)."""
    mounted: list[Path] = []

    def mount(size_bytes: int) -> Path:
        where = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
        where.mkdir()
        try:
            _mount_tmpfs(where, size_bytes)
        except (subprocess.CalledProcessError, FileNotFoundError) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {detail.strip()}")
        mounted.append(where)
        return where

    try:
        yield mount
    finally:
        for where in reversed(mounted):
            subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)


def fill(folder: Path, leave_bytes: int) -> Path:
    """Take all but ``leave_bytes`` of the free space of ``folder``'s file system with one filler file."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    filler = folder / "filler.bin"
    with open(filler, "wb") as stream:
        if free > leave_bytes:
            os.posix_fallocate(stream.fileno(), 0, free - leave_bytes)
    return filler
