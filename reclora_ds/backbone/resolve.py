"""Which Hugging Face model folder a backbone name means, and what such a folder holds."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reclora_ds.backbone.cache import prepare_default_backbone
from reclora_ds.backbone.errors import BackboneError

logger = logging.getLogger(__name__)

DEFAULT_BACKBONE_ALIASES = frozenset({"default", "smollm2-135m-instruct"})
_WEIGHT_FILE_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


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
