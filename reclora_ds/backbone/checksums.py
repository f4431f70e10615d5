"""Checksums: the sha256 of a file (with a progress bar for large ones), and a folder's manifest of them.

A converted backbone folder holds ``reclora_backbone.json``: the sha256 and size of every other file, plus
where the folder came from. :func:`find_manifest_problems` names every file that no longer matches.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from reclora_ds.backbone.errors import BackboneError, ChecksumMismatchError
from reclora_ds.files import sha256_file

MANIFEST_FILENAME = "reclora_backbone.json"
MANIFEST_FORMAT_VERSION = 1
_PROGRESS_MIN_BYTES = 64 << 20  # smaller files are hashed or copied without a progress bar


def file_sha256(path: str | os.PathLike[str], show_progress: bool = True) -> str:
    """Hex sha256 of a file, read in chunks (a progress bar for large files when ``show_progress``)."""
    path = Path(path)
    with byte_progress(path.stat().st_size, f"sha256 {path.name}", show_progress) as bar:
        return sha256_file(path, bar.update)


def verify_file_sha256(path: str | os.PathLike[str], expected_sha256: str) -> None:
    """Raise ``ChecksumMismatchError`` (naming the file, expected and actual sha256) if they differ."""
    actual_sha256 = file_sha256(path)
    if actual_sha256 != expected_sha256:
        raise ChecksumMismatchError(
            f"Checksum mismatch for {path}: expected sha256 {expected_sha256}, got {actual_sha256}"
        )


def byte_progress(total_bytes: int, description: str, enabled: bool = True) -> tqdm:
    """A byte-count tqdm bar, shown only for files large enough to take a noticeable time."""
    return tqdm(
        total=total_bytes,
        desc=description,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        leave=False,
        disable=not enabled or total_bytes < _PROGRESS_MIN_BYTES,
    )


def write_manifest(folder: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``reclora_backbone.json`` in ``folder``: sha256 and size of every other file, plus ``metadata``.

    Args:
        folder: the model folder; every file under it (recursively) is listed.
        metadata: extra top-level entries (e.g. the source GGUF and its checksum).

    Returns:
        The manifest's path. It is written to a temporary file and renamed, so it is never half-written.
    """
    folder = Path(folder)
    manifest = {
        "format_version": MANIFEST_FORMAT_VERSION,
        **(metadata or {}),
        "files": _describe_files(folder),
    }
    manifest_path = folder / MANIFEST_FILENAME
    temporary_path = folder / f".{MANIFEST_FILENAME}.tmp-{uuid.uuid4().hex[:8]}"
    temporary_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(temporary_path, manifest_path)
    return manifest_path


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed manifest of ``folder``; ``BackboneError`` if it is missing or unreadable."""
    manifest_path = Path(folder) / MANIFEST_FILENAME
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise BackboneError(f"{manifest_path} is missing") from None
    except (OSError, ValueError) as error:
        raise BackboneError(f"{manifest_path} cannot be read: {error}") from error
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise BackboneError(f"{manifest_path} has no 'files' table")
    return manifest


def find_manifest_problems(folder: str | os.PathLike[str]) -> list[str]:
    """Everything wrong with ``folder`` against its manifest (missing, resized or altered files).

    Returns:
        Human-readable problems, one per file at fault; empty when every listed file matches.
    """
    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
    except BackboneError as error:
        return [str(error)]
    if manifest.get("format_version") != MANIFEST_FORMAT_VERSION:
        found_version = manifest.get("format_version")
        return [
            f"{folder / MANIFEST_FILENAME} has format_version {found_version!r}, expected {MANIFEST_FORMAT_VERSION}"
        ]
    problems = []
    for relative_path, expected in sorted(manifest["files"].items()):
        problem = _file_problem(folder / relative_path, expected)
        if problem:
            problems.append(problem)
    return problems


def verify_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Check every file of ``folder`` against its manifest; return the manifest or raise ``BackboneError``."""
    problems = find_manifest_problems(folder)
    if problems:
        raise BackboneError(f"Backbone folder {folder} does not match its manifest: " + "; ".join(problems))
    return read_manifest(folder)


def _describe_files(folder: Path) -> dict[str, dict[str, Any]]:
    """``{relative posix path: {"sha256", "size"}}`` for every file under ``folder`` but the manifest."""
    return {
        path.relative_to(folder).as_posix(): {"sha256": file_sha256(path), "size": path.stat().st_size}
        for path in sorted(folder.rglob("*"))
        if path.is_file()
        and not path.name.startswith(f".{MANIFEST_FILENAME}")
        and path.name != MANIFEST_FILENAME
    }


def _file_problem(path: Path, expected: Mapping[str, Any]) -> str | None:
    """Why ``path`` does not match its manifest entry, or ``None`` when it does."""
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != expected.get("size"):
        return f"{path} has {size} bytes, expected {expected.get('size')}"
    actual_sha256 = file_sha256(path)
    if actual_sha256 != expected.get("sha256"):
        return f"{path} has sha256 {actual_sha256}, expected {expected.get('sha256')}"
    return None
