"""C++ CPU kernels for the CRM's memory-bound steps, built once by ``torch.utils.cpp_extension``.

``gather_dot(table, ids, query)`` [B, L], SIM's soft-search scores of the L-long window
(:meth:`reclora_ds.models.sim.SIM.search_scores`):

.. math::

    \\mathrm{out}[b, l] = \\langle T[\\mathrm{ids}[b, l]],\\ q_b \\rangle = \\sum_e T[\\mathrm{ids}[b, l], e]\\, q[b, e]

The PyTorch form gathers the rows first: a [B, L, E] temporary (4 MB for one rank's batch at the default
sizes, four times a core's L2 on the benchmark machine) written by ``index_select`` and read back by the
product. The kernel reads each row once and writes only [B, L]. It has no backward: :func:`gather_dot`
uses it only when no gradient is needed (the search runs under ``no_grad``).

``attention_pool(pre, u, w, c, mask, h)`` [B, D], DIN's activation unit from its first layer's two parts
on (:class:`reclora_ds.models.crm.TargetAttention` with one hidden layer and no active dropout):

.. math::

    s_{bj} = m_{bj}\\,\\big(w \\cdot \\mathrm{ReLU}(\\mathrm{pre}_{bj} + u_b) + c\\big), \\qquad
    \\mathrm{out}_b = \\sum_j s_{bj}\\, h_{bj}

forward and backward each in one pass over the [B, L, H] activations instead of one op per step.

Both run when the kernels are loaded and the tensors are float32 on the CPU; otherwise PyTorch ops compute
the same functions. Results agree to float rounding (the sums run in another order);
``tests/models/test_cpu_kernels.py`` checks values and gradients against float64 references. Together they
take about 1.3 ms off a 128-sample SIM training step of 10.6 ms (``benchmarks/bench_crm_forms.py``,
"no C++ kernels").

:func:`load` compiles the C++ source on first use (about 10-15 s, needs a C++ compiler) into
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) and loads it; later processes load the
cached library. Ranks started together share the build (torch's file lock). Models never build anything:
they use the kernel once a recipe, tool or benchmark has called :func:`load`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.cpp")
LIBRARY = "reclora_ds_cpu_kernels"  # the extension's name and its torch.ops namespace
CFLAGS = ("-O3", "-fopenmp-simd", "-fno-trapping-math")  # the last lets GCC vectorise the ReLU masks

_loaded: bool | None = None  # None: not tried in this process


def load(required: bool = False) -> bool:
    """Build (first time) and load the kernels; True when they can be used.

    Tried once per process. A failed build (no compiler, an unsupported platform) logs a warning and
    leaves the PyTorch forms in use, or raises a RuntimeError with the cause when ``required``.
    """
    global _loaded
    if _loaded is None:
        start = time.perf_counter()
        try:
            from torch.utils.cpp_extension import load as load_extension

            load_extension(
                name=LIBRARY,
                sources=[str(SOURCE)],
                extra_cflags=list(CFLAGS),
                is_python_module=False,
                verbose=False,
            )
            _loaded = True
            log.info("reclora_ds CPU kernels loaded in %.1f s", time.perf_counter() - start)
        except Exception as exc:  # a build failure of any kind: the PyTorch forms do the job
            _loaded = False
            log.warning(
                "reclora_ds CPU kernels unavailable (%s: %s); using the PyTorch forms",
                type(exc).__name__,
                str(exc)[-500:],
            )
            if required:
                raise RuntimeError(f"reclora_ds CPU kernels could not be built: {exc}") from exc
    if required and not _loaded:
        raise RuntimeError("reclora_ds CPU kernels could not be built (see the earlier warning)")
    return _loaded


def loaded() -> bool:
    """True when :func:`load` has loaded the kernels in this process."""
    return bool(_loaded)


def _usable(*tensors: torch.Tensor) -> bool:
    return bool(_loaded) and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def gather_dot(table: torch.Tensor, ids: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """``<table[ids[b, l]], query[b]>``: table [V, E], ids [B, L] int64, query [B, E] -> [B, L].

    The C++ kernel when it is loaded, no gradient is needed and the tensors are float32 on the CPU; else
    the same sum through ``index_select`` and ``vecdot`` (differentiable). Ids outside ``[0, V)`` raise.
    """
    needs_grad = torch.is_grad_enabled() and (table.requires_grad or query.requires_grad)
    if not needs_grad and _usable(table, query):
        return getattr(torch.ops, LIBRARY).gather_dot(table, ids, query)
    rows = torch.nn.functional.embedding(ids, table)  # [B, L, E]
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
    behaviours [B, L, D] -> [B, D]. Differentiable in everything but the mask.

    The C++ kernel (forward and backward, one pass over the [B, L, H] activations each way) when it is
    loaded and the tensors are float32 on the CPU; else the same function through PyTorch ops.
    """
    if _usable(pre, target_term, weight, bias, behaviours):
        return _AttentionPool.apply(pre, target_term, weight, bias, mask, behaviours)
    hidden = torch.relu(pre + target_term.unsqueeze(1))  # [B, L, H]
    scores = torch.nn.functional.linear(hidden, weight.unsqueeze(0), bias).squeeze(-1)  # [B, L]
    scores = torch.where(mask, scores, torch.zeros_like(scores))  # an exact 0 on masked positions
    return torch.einsum("bl,bld->bd", scores, behaviours)


class _AttentionPool(torch.autograd.Function):
    """:func:`attention_pool` through the kernel; the backward recomputes ``x = pre + u`` and its ReLU.

    With ``g_s = <g_out, h_j>`` on a kept position: ``g_pre_j = g_s w * [x_j > 0]``, ``g_u = sum_j g_pre_j``,
    ``g_w = sum g_s ReLU(x_j)``, ``g_c = sum g_s``, ``g_h_j = s_j g_out``; masked positions get 0.
    """

    @staticmethod
    def forward(ctx, pre, target_term, weight, bias, mask, behaviours):  # noqa: ANN001, ANN205 (autograd's)
        out, scores = getattr(torch.ops, LIBRARY).attention_pool(
            pre, target_term, weight, bias, mask, behaviours
        )
        ctx.save_for_backward(pre, target_term, weight, mask, behaviours, scores)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_out):  # noqa: ANN001, ANN205
        pre, target_term, weight, mask, behaviours, scores = ctx.saved_tensors
        g_pre, g_u, g_w, g_c, g_h = getattr(torch.ops, LIBRARY).attention_pool_backward(
            g_out, pre, target_term, weight, mask, behaviours, scores
        )
        return g_pre, g_u, g_w, g_c, None, g_h
