"""The backbone's RMSNorm layers as one op, so that a platform can compute each in one kernel.

transformers' ``LlamaRMSNorm`` (and the identical ``MistralRMSNorm`` / ``Qwen2RMSNorm``) runs six ops per
call in the forward and more in the backward, each a pass over the [B, T, D] activations, with float32
copies in between. :func:`fuse_rms_norms` swaps those modules of a loaded backbone for :class:`RMSNorm`,
which keeps the same weight (the same ``Parameter``: state dicts, optimizers and checkpoints see no change)
and calls :func:`reclora_ds.models.ops.rms_norm`: the same function, whose PyTorch form is transformers'
forward op for op, so nothing changes where no other implementation is registered (a GPU, a CPU without
the kernels). On a CPU with AVX512-BF16 and bf16 activations the stage-2 recipe and the scoring runner
register :mod:`reclora_ds.cpu.kernels`' kernel (forward and, for frozen weights, backward). Math:
:func:`reclora_ds.models.ops.rms_norm`.

Shape legend: D the model's width; ``...`` the leading dims of the activations ([B, T]).

Example::

    model, tokenizer = load_causal_lm("default", dtype="bfloat16")
    fuse_rms_norms(model)        # 61 layers for SmolLM2-135M (2 per decoder layer and the final norm)
"""

from __future__ import annotations

import torch
from torch import nn

from reclora_ds.models import ops

SAME_AS_LLAMA_RMSNORM = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")
"""transformers classes whose forward is ``LlamaRMSNorm``'s (checked against it by
``tests/models/test_norms.py``); other norms (Gemma's ``1 + w``, OLMo's layer norm) are left alone."""


class RMSNorm(nn.Module):
    """``weight * round(x / sqrt(mean(x^2) + eps))`` over the last dim, through :func:`ops.rms_norm`: x [..., D]
    -> [..., D]. The attribute names are transformers' (``weight``, ``variance_epsilon``)."""

    def __init__(self, weight: nn.Parameter, eps: float) -> None:
        super().__init__()
        self.weight = weight  # [D]
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(hidden_states, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def fuse_rms_norms(model: nn.Module) -> int:
    """Replace every module of a class in :data:`SAME_AS_LLAMA_RMSNORM` by an :class:`RMSNorm` with the
    same weight and epsilon; returns how many were replaced (0 for a backbone with other norms)."""
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if name and type(module).__name__ in SAME_AS_LLAMA_RMSNORM
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, RMSNorm(module.weight, module.variance_epsilon))
    return len(targets)
