"""Convert a GGUF causal LM into a Hugging Face folder: dense float32 safetensors, tokenizer, manifest.

The weights are dequantized (not the original bf16 release of a quantized model): bit-for-bit what the
GGUF itself computes. The folder is built beside its target and renamed into place.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from reclora_ds.backbone.checksums import MANIFEST_FILENAME, file_sha256, write_manifest
from reclora_ds.backbone.errors import BackboneError

logger = logging.getLogger(__name__)

_TRANSFORMERS_WITH_DTYPE_KWARG = "4.56"  # `torch_dtype=` was renamed `dtype=` (and deprecated) here


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
