"""Inner loops as plain functions: their PyTorch forms, and a seam for faster implementations.

Shape legend:
    B    batch (samples)
    L    history positions (SIM's search window, or the behaviours the attention reads)
    V    rows of an embedding table
    E    embedding width
    H    hidden width of the attention MLP; in ``decoder_attention``, query heads
    D    width of a behaviour
    Hk   key / value heads of ``decoder_attention`` (H a multiple of Hk)
    Tq   query positions; Tk key positions
    d    width of an attention head

``gather_dot(table, ids, query)`` [B, L], SIM's soft-search scores of the L-long window
(:meth:`reclora_ds.models.sim.SIM.search_scores`):

.. math::

    \\mathrm{out}[b, l] = \\langle T[\\mathrm{ids}[b, l]],\\ q_b \\rangle
        = \\sum_e T[\\mathrm{ids}[b, l], e]\\, q[b, e]

``attention_pool(pre, u, w, c, mask, h)`` [B, D], DIN's activation unit from its first layer's two parts
on (:class:`reclora_ds.models.crm.TargetAttention` with one hidden layer and no active dropout):

.. math::

    s_{bj} = m_{bj}\\,\\big(w \\cdot \\mathrm{ReLU}(\\mathrm{pre}_{bj} + u_b) + c\\big), \\qquad
    \\mathrm{out}_b = \\sum_j s_{bj}\\, h_{bj}

``decoder_attention(query, key, value, mask, scaling, dropout)`` [B, Tq, H, d], the LLM's attention as transformers'
eager attention computes it (query head h reads key / value head ``h // (H / Hk)``; M the additive mask:
0 where a query may see a key, the dtype's lowest value where it may not):

.. math::

    \\mathrm{out}_{b,i,h} = \\sum_j \\mathrm{softmax}_j\\big(s\\, q_{bhi} \\cdot k_{b,h',j}
        + M_{b,i,j}\\big)\\, v_{b,h',j}

``rms_norm(x, weight, eps)`` [..., D], the LLM's RMSNorm as transformers' ``LlamaRMSNorm`` computes it
(in float32, the normalised value rounded back to x's dtype before the weight multiplies it):

.. math::

    \\mathrm{out}_{i} = w \\odot \\mathrm{round}\\big(x_i\\, /\\, \\sqrt{\\tfrac{1}{D} \\textstyle\\sum_j x_{ij}^2
        + \\epsilon}\\big)

The models call :func:`gather_dot` and :func:`attention_pool` (and the backbone, through
:mod:`reclora_ds.models.attention` and :mod:`reclora_ds.models.norms`, :func:`decoder_attention` and
:func:`rms_norm`), which compute the PyTorch forms below on any
device, with autograd. Another implementation of the same function can be registered for an op
(:func:`register`); the op then hands it the arguments it :attr:`~Implementation.accepts`, and keeps the
PyTorch form for the others. Nothing here knows which implementations exist: a recipe that wants one
registers it (:func:`reclora_ds.cpu.enable_cpu_extras` registers C++ kernels for float32 CPU tensors), so
the models stay free of platform code and the GPU path never sees it.

Example:
    >>> table, ids, query = torch.eye(3), torch.tensor([[0, 2]]), torch.tensor([[1.0, 2.0, 3.0]])
    >>> gather_dot(table, ids, query)
    tensor([[1., 3.]])
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

OP_NAMES = ("gather_dot", "attention_pool", "decoder_attention", "rms_norm")


@dataclass(frozen=True)
class Implementation:
    """Another implementation of one op: the same function, computed differently.

    Attributes:
        fn: takes the op's arguments, in the op's order, and returns what the op returns.
        accepts: True when ``fn`` can compute the op on these arguments (called with the op's arguments).
        differentiable: False when ``fn`` has no backward: the op then keeps its PyTorch form whenever
            autograd needs a gradient of the result.
    """

    fn: Callable[..., torch.Tensor]
    accepts: Callable[..., bool]
    differentiable: bool = True


_implementations: dict[str, Implementation] = {}


def register(name: str, implementation: Implementation | None) -> None:
    """Use ``implementation`` for op ``name`` from now on, in this process; ``None`` puts the PyTorch form
    back."""
    if name not in OP_NAMES:
        raise ValueError(f"unknown op {name!r}; the ops are {OP_NAMES}")
    if implementation is None:
        _implementations.pop(name, None)
    else:
        _implementations[name] = implementation


def registered() -> dict[str, Implementation]:
    """The implementations in use, by op name (a copy; ops missing from it run their PyTorch forms)."""
    return dict(_implementations)


@contextlib.contextmanager
def implementations(mapping: Mapping[str, Implementation]) -> Iterator[None]:
    """Exactly ``mapping``'s implementations inside the block (``{}``: the PyTorch forms everywhere), the
    previous ones after it (tests and benchmarks compare the two)."""
    saved = registered()
    try:
        _implementations.clear()
        for name, implementation in mapping.items():
            register(name, implementation)
        yield
    finally:
        _implementations.clear()
        _implementations.update(saved)


def _chosen(
    name: str, args: tuple[torch.Tensor, ...], differentiated: tuple[torch.Tensor, ...]
) -> Implementation | None:
    """The implementation registered for ``name`` when it can compute the op on ``args``, else None.
    ``differentiated``: the arguments a gradient may flow to."""
    implementation = _implementations.get(name)
    if implementation is None:
        return None
    if (
        not implementation.differentiable
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in differentiated)
    ):
        return None  # autograd needs a gradient that this implementation cannot give
    return implementation if implementation.accepts(*args) else None


def _run(name: str, args: tuple, differentiated: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Op ``name`` on ``args``: the registered implementation where it takes them (:func:`_chosen`), else its
    PyTorch form."""
    implementation = _chosen(name, args, differentiated)
    return (implementation.fn if implementation is not None else PYTORCH_FORMS[name])(*args)


def gather_dot(table: torch.Tensor, ids: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """``<table[ids[b, l]], query[b]>``: table [V, E], ids [B, L] int64, query [B, E] -> [B, L].

    PyTorch form: the rows gathered by ``embedding`` ([B, L, E]), then ``vecdot`` with the query;
    differentiable in ``table`` and ``query``. Ids outside ``[0, V)`` raise.
    """
    return _run("gather_dot", (table, ids, query), (table, query))


def gather_dot_pytorch(table: torch.Tensor, ids: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """:func:`gather_dot`'s PyTorch form, whatever is registered."""
    rows = F.embedding(ids, table)  # [B, L, E]
    return torch.linalg.vecdot(rows, query.unsqueeze(1))  # [B, L]


def attention_pool(
    pre: torch.Tensor,
    target_term: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    mask: torch.Tensor,
    behaviours: torch.Tensor,
) -> torch.Tensor:
    """DIN's activation unit from its first layer on: ``sum_j m_j (w . ReLU(pre_j + u) + c) h_j``.

    pre [B, L, H] and target_term u [B, H] (the first layer's per-behaviour and per-target parts; their
    sum is the layer's output), weight [H] and bias [1] (the H -> 1 output layer), mask [B, L] bool,
    behaviours [B, L, D] -> [B, D]. Differentiable in everything but the mask; a masked position
    contributes an exact 0.
    """
    args = (pre, target_term, weight, bias, mask, behaviours)
    return _run("attention_pool", args, (pre, target_term, weight, bias, behaviours))


def attention_pool_pytorch(
    pre: torch.Tensor,
    target_term: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    mask: torch.Tensor,
    behaviours: torch.Tensor,
) -> torch.Tensor:
    """:func:`attention_pool`'s PyTorch form, whatever is registered."""
    hidden = torch.relu(pre + target_term.unsqueeze(1))  # [B, L, H]
    scores = F.linear(hidden, weight.unsqueeze(0), bias).squeeze(-1)  # [B, L, 1] -> [B, L]
    scores = torch.where(mask, scores, torch.zeros_like(scores))  # an exact 0 on masked positions
    return torch.einsum("bl,bld->bd", scores, behaviours)  # [B, D]


def decoder_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Softmax attention of a decoder layer: query [B, H, Tq, d], key and value [B, Hk, Tk, d], mask
    [B or 1, 1, Tq, Tk] additive or None, scaling (the scores' factor), dropout (the probability of
    zeroing an attention probability; transformers passes 0 outside training) -> [B, Tq, H, d].

    PyTorch form: transformers' eager attention, op for op (scores in the activations' dtype, softmax in
    float32, probabilities back in the activations' dtype, then their dropout); differentiable in query,
    key and value.
    """
    args = (query, key, value, mask, scaling, dropout)
    return _run("decoder_attention", args, (query, key, value))


def decoder_attention_pytorch(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """:func:`decoder_attention`'s PyTorch form, whatever is registered."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)  # [B, H, Tk, d]: query head h reads key head h // groups
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # [B, H, Tq, Tk]
    if mask is not None:
        scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout:
        probs = F.dropout(probs, p=dropout, training=True)
    return torch.matmul(probs, value).transpose(1, 2).contiguous()  # [B, Tq, H, d]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Root-mean-square normalisation of the last dim: x [..., D], weight [D] -> [..., D].

    PyTorch form: transformers' ``LlamaRMSNorm.forward``, op for op (the mean of squares and the
    normalisation in float32, the result rounded to x's dtype, then the weight); differentiable in x and
    weight.
    """
    args = (x, weight, eps)
    return _run("rms_norm", args, (x, weight))


def rms_norm_pytorch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`rms_norm`'s PyTorch form, whatever is registered."""
    input_dtype = x.dtype
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(input_dtype)


PYTORCH_FORMS = {
    "gather_dot": gather_dot_pytorch,
    "attention_pool": attention_pool_pytorch,
    "decoder_attention": decoder_attention_pytorch,
    "rms_norm": rms_norm_pytorch,
}
"""Each op's PyTorch form, by op name."""
