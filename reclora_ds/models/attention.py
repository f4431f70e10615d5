"""``eager_fused``: the backbone's attention as one op, so that a platform can compute it in one kernel.

transformers picks a decoder layer's attention function by name (``config._attn_implementation``) from its
``AttentionInterface``. :func:`register` adds :data:`EAGER_FUSED` there (and eager's mask format for it):
the same function as transformers' ``eager`` attention, computed by
:func:`reclora_ds.models.ops.decoder_attention` instead of one op per step. Where nothing is registered for
that op (a GPU, a CPU without the kernels) its PyTorch form runs, eager's ops one for one; on a CPU with
AVX512-BF16 and bf16 activations the stage-2 recipe and the scoring runner register
:mod:`reclora_ds.cpu.kernels`' kernel, forward and backward. Shapes and math:
:func:`reclora_ds.models.ops.decoder_attention`.

Example::

    register()                                   # once per process; reclora_ds.llm_loader does it
    model.set_attn_implementation(EAGER_FUSED)    # or load_causal_lm(..., attn_implementation=EAGER_FUSED)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from reclora_ds.models import ops

EAGER_FUSED = "eager_fused"


def eager_fused_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **_kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [B, H, Tq, d], key / value [B, Hk, Tk, d], the
    additive mask [B, 1, Tq, >= Tk], the attention dropout (0 outside training) -> ([B, Tq, H, d], no
    attention weights)."""
    mask = attention_mask[:, :, :, : key.shape[-2]] if attention_mask is not None else None
    return ops.decoder_attention(query, key, value, mask, scaling, dropout), None


def register() -> None:
    """Make :data:`EAGER_FUSED` a name transformers' models accept as their attention implementation."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(EAGER_FUSED, eager_fused_attention)
    AttentionMaskInterface.register(EAGER_FUSED, eager_mask)
