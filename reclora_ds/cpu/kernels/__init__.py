"""C++ CPU implementations of :mod:`reclora_ds.models.ops`' functions, built once by
``torch.utils.cpp_extension``.

The functions and their math are in :mod:`reclora_ds.models.ops`; this module computes the same functions
in fewer passes over memory: the CRM's two for float32 CPU tensors, the LLM's attention for bf16 ones:

- ``gather_dot`` reads each gathered table row once and writes only [B, L], where the PyTorch form writes a
  [B, L, E] temporary (several times a core's L2 at the default sizes) and reads it back. It has no
  backward: the op keeps its PyTorch form where autograd needs a gradient (the search runs under
  ``no_grad``).
- ``attention_pool`` runs its forward and its backward (:class:`_AttentionPool`) each in one pass over the
  [B, L, H] activations, instead of one op per step.
- ``rms_norm`` (the backbone's RMSNorm under ``norm_implementation=fused``, :mod:`reclora_ds.models.norms`)
  normalises a row in one pass with transformers' roundings, where ``LlamaRMSNorm`` runs six ops with
  float32 copies; the backward (:class:`_RMSNorm`) likewise, for a frozen weight. bf16, AVX512-BF16.
- ``decoder_attention`` (the backbone's attention under ``attn_implementation=eager_fused``) computes a
  (batch, key head)'s scores, softmax and weighted values in the core's caches with AVX512-BF16 dot products,
  rounding as eager attention's bf16 ops do, and skips the keys a query row cannot see (the causal future):
  for scoring no [B, H, T, T] tensor is written; for training the forward keeps the bf16 probabilities and
  the backward (:class:`_DecoderAttention`) computes the query, key and value gradients the same way. bf16,
  head width a multiple of 64, a CPU with AVX512-BF16. That is its ``dot`` form; its ``matmul`` form
  (:func:`decoder_attention_matmul`) runs the same function's products as batched bf16 matrix
  multiplications (``torch.matmul``: oneDNN, which computes them on AMX tiles where the CPU has them) over
  every key, and only the softmax and its backward as the C++ row passes, with the same roundings. Which
  form runs: :func:`enable_attention`'s ``form`` (``auto``: ``matmul`` on a CPU with AMX-BF16, else
  ``dot``). It is registered on its own (:func:`enable_attention`): stage 2 runs its frozen CRM in the
  PyTorch forms.

Results agree with the PyTorch forms to float rounding (the sums run in another order);
``tests/models/test_cpu_kernels.py`` checks values and gradients against float64 references and the
attention against transformers' eager attention. What the CRM's kernels save per training step:
docs/CRM_RESULTS.md section 4; what the attention kernel saves in stage 2: docs/PLORA_BENCH.md.

:func:`load` compiles the C++ source on first use (10-15 s, needs a C++ compiler) into
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) and loads it; later processes load the
cached library, and ranks started together share the build (torch's file lock, guarded against a killed
builder's stale lock by :func:`reclora_ds.cpu.build_lock.guarded_build`). :func:`enable` loads them
and registers them as the ops' implementations (:func:`reclora_ds.models.ops.register`);
:func:`reclora_ds.cpu.enable_cpu_extras` is the recipes' way to call it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from reclora_ds.cpu.build_lock import guarded_build
from reclora_ds.models import ops

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.cpp")
LIBRARY = "reclora_ds_cpu_kernels"  # the extension's name and its torch.ops namespace
CFLAGS = ("-O3", "-fopenmp-simd", "-fno-trapping-math")  # the last lets GCC vectorise the ReLU masks

_loaded: bool | None = None  # None: not tried in this process


def load(required: bool = False) -> bool:
    """Build (first time) and load the kernels; True when they can be used.

    Tried once per process. A failed build (no compiler, an unsupported platform) logs a warning and
    returns False, or raises a RuntimeError with the cause when ``required``.
    """
    global _loaded
    if _loaded is None:
        start = time.perf_counter()
        try:
            from torch.utils.cpp_extension import load as load_extension

            with guarded_build(LIBRARY):  # a dead process's build lock is cleared, a wait is reported
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


def accepts(*tensors: torch.Tensor) -> bool:
    """True when the kernels can take these arguments: every tensor on the CPU, the floating ones float32."""
    return all(
        t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point()) for t in tensors
    )


def gather_dot(table: torch.Tensor, ids: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """:func:`reclora_ds.models.ops.gather_dot` through the kernel (no gradient). Ids outside the table raise."""
    return getattr(torch.ops, LIBRARY).gather_dot(table, ids, query)


def attention_pool(
    pre: torch.Tensor,
    target_term: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    mask: torch.Tensor,
    behaviours: torch.Tensor,
) -> torch.Tensor:
    """:func:`reclora_ds.models.ops.attention_pool` through the kernel, forward and backward."""
    return _AttentionPool.apply(pre, target_term, weight, bias, mask, behaviours)


def decoder_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    _dropout: float = 0.0,
) -> torch.Tensor:
    """:func:`reclora_ds.models.ops.decoder_attention` through the kernel, forward and backward
    (:class:`_DecoderAttention`); without a gradient to compute, the forward alone keeps no probabilities.
    No attention dropout (:func:`accepts_decoder_attention` leaves a nonzero one to the PyTorch form)."""
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return _DecoderAttention.apply(query, key, value, mask, scaling)
    return getattr(torch.ops, LIBRARY).decoder_attention(query, key, value, mask, scaling)


def decoder_attention_matmul(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    _dropout: float = 0.0,
) -> torch.Tensor:
    """:func:`reclora_ds.models.ops.decoder_attention`'s ``matmul`` form, forward and backward
    (:class:`_DecoderAttentionMatmul`): the products as bf16 matrix multiplications, the softmax as the
    kernel's row pass (:func:`_matmul_attention_forward`). No attention dropout."""
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return _DecoderAttentionMatmul.apply(query, key, value, mask, scaling)
    return _matmul_attention_forward(query, key, value, mask, scaling)[0]


def _matmul_attention_forward(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """query [B, H, Tq, d], key / value [B, Hk, Tk, d], mask [B or 1, 1, Tq, Tk] or None -> (out [B, Tq, H,
    d], the query as [B, Hk, G Tq, d], the probabilities P [B, H, Tq, Tk]), G = H / Hk the query heads per
    key head, whose rows are stacked so that one matrix product per (batch, key head) serves them all:

    S = bf16(Q K^T) (as eager's matmul rounds it), P = bf16(softmax_fp32(bf16(bf16(S s) + M))) (the row
    pass), O = bf16(P V)."""
    batch, heads, tq, width = query.shape
    kv_heads, tk = key.shape[1], key.shape[2]
    rows = heads // kv_heads * tq
    grouped = query.reshape(batch, kv_heads, rows, width)
    scores = torch.matmul(grouped, key.transpose(2, 3))  # [B, Hk, G Tq, Tk]
    probs = getattr(torch.ops, LIBRARY).attention_probs(scores.view(batch, heads, tq, tk), mask, scaling)
    out = torch.matmul(probs.view(batch, kv_heads, rows, tk), value)  # [B, Hk, G Tq, d]
    return out.view(batch, heads, tq, width).transpose(1, 2).contiguous(), grouped, probs


def decoder_attention_supported() -> bool:
    """True when the kernels are loaded and this CPU has AVX512-BF16 (the attention kernel's dot products)."""
    return loaded() and bool(getattr(torch.ops, LIBRARY).decoder_attention_supported())


def accepts_decoder_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    _scaling: float,
    dropout: float = 0.0,
) -> bool:
    """True when the attention kernel's ``dot`` form can take these arguments: bf16 CPU tensors, head width
    a multiple of 64, query heads a multiple of key heads, a [B or 1, 1, Tq, Tk] mask (or none), no
    attention dropout, and a CPU that has AVX512-BF16."""
    return query.shape[-1] % 64 == 0 and accepts_decoder_attention_matmul(
        query, key, value, mask, _scaling, dropout
    )


def accepts_decoder_attention_matmul(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    _scaling: float,
    dropout: float = 0.0,
) -> bool:
    """True when the ``matmul`` form can take these arguments: :func:`accepts_decoder_attention`'s, any
    head width."""
    if dropout:
        return False
    tensors = (query, key, value) if mask is None else (query, key, value, mask)
    if any(t.device.type != "cpu" or t.dtype != torch.bfloat16 or t.dim() != 4 for t in tensors):
        return False
    batch, heads, queries, width = query.shape
    shape_ok = (
        key.shape == value.shape
        and key.shape[0] == batch
        and key.shape[3] == width
        and heads % key.shape[1] == 0
    )
    if mask is not None:
        shape_ok = shape_ok and mask.shape[0] in (1, batch) and mask.shape[1:] == (1, queries, key.shape[2])
    return shape_ok and _cpu_has_bf16_kernels()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`reclora_ds.models.ops.rms_norm` through the kernel, forward and backward (:class:`_RMSNorm`; the
    weight frozen, see :func:`accepts_rms_norm`); without a gradient to compute, the forward keeps nothing."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _RMSNorm.apply(x, weight, eps)
    return getattr(torch.ops, LIBRARY).rms_norm(x, weight, eps)


def accepts_rms_norm(x: torch.Tensor, weight: torch.Tensor, _eps: float) -> bool:
    """True when the RMSNorm kernel can take these arguments: bf16 CPU tensors, a [D] weight that needs no
    gradient (a frozen backbone's), x [..., D], and a CPU that has AVX512-BF16."""
    return (
        x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and weight.dim() == 1
        and x.dim() >= 1
        and x.shape[-1] == weight.shape[0]
        and not (torch.is_grad_enabled() and weight.requires_grad)
        and _cpu_has_bf16_kernels()
    )


_cpu_has_bf16_dot: bool | None = None


def _cpu_has_bf16_kernels() -> bool:
    """:func:`decoder_attention_supported` (the attention and RMSNorm kernels both need AVX512-BF16), asked
    of the library once it is loaded (False before)."""
    global _cpu_has_bf16_dot
    if _cpu_has_bf16_dot is None:
        if not loaded():
            return False
        _cpu_has_bf16_dot = decoder_attention_supported()
    return _cpu_has_bf16_dot


IMPLEMENTATIONS = {
    "gather_dot": ops.Implementation(gather_dot, accepts, differentiable=False),
    "attention_pool": ops.Implementation(attention_pool, accepts),
}
"""What :func:`enable` registers, by op name: the CRM's ops."""

ATTENTION_FORMS = {
    "dot": {"decoder_attention": ops.Implementation(decoder_attention, accepts_decoder_attention)},
    "matmul": {
        "decoder_attention": ops.Implementation(decoder_attention_matmul, accepts_decoder_attention_matmul)
    },
}
"""What :func:`enable_attention` registers for the LLM's attention (``attn_implementation=eager_fused``), by
form: ``dot`` (the products as AVX512-BF16 dot products in the core's caches, the causal future skipped)
or ``matmul`` (the products as bf16 matrix multiplications over every key, AMX where the CPU has it)."""
ATTENTION_FORM_CHOICES = ("auto", *ATTENTION_FORMS)

NORM_IMPLEMENTATIONS = {
    "rms_norm": ops.Implementation(rms_norm, accepts_rms_norm),
}
"""What :func:`enable_rms_norm` registers: the LLM's RMSNorm (``norm_implementation=fused``)."""


def enable(required: bool = False) -> bool:
    """:func:`load` the kernels and register them as the ops' implementations; True when they are in use.

    When they cannot be built the ops keep their PyTorch forms (or a RuntimeError, when ``required``).
    """
    if not load(required):
        return False
    for name, implementation in IMPLEMENTATIONS.items():
        ops.register(name, implementation)
    return True


def enable_attention(required: bool = False, form: str = "auto") -> bool:
    """:func:`load` the kernels and register the attention kernel as ``decoder_attention``'s implementation,
    in ``form`` (:data:`ATTENTION_FORMS`; ``auto``: ``matmul`` on a CPU with AMX-BF16, whose tiles multiply
    bf16 matrices several times faster than the dot products, else ``dot``); True when the kernel will run
    (the library loaded and the CPU has AVX512-BF16, which both forms' row passes use).

    Where it cannot, the op keeps its PyTorch form (eager attention's ops): a logged note, or a
    RuntimeError when ``required``.
    """
    if form not in ATTENTION_FORM_CHOICES:
        raise ValueError(f"form must be one of {ATTENTION_FORM_CHOICES}, got {form!r}")
    if not load(required):
        return False
    if form == "auto":
        form = "matmul" if cpu_has_amx() else "dot"
    return _enable_bf16_kernel(ATTENTION_FORMS[form], "attention", "eager attention's", required)


def cpu_has_amx() -> bool:
    """True when the kernels are loaded, this CPU has AMX-BF16 (CPUID) and the operating system lets the
    process use its tiles (Linux's ``arch_prctl`` permission for XTILEDATA, which oneDNN also asks for before
    it multiplies on them)."""
    return loaded() and bool(getattr(torch.ops, LIBRARY).cpu_has_amx())


def enable_rms_norm(required: bool = False) -> bool:
    """:func:`load` the kernels and register the RMSNorm kernel as ``rms_norm``'s implementation; True when
    the kernel will run (the library loaded and the CPU has AVX512-BF16). Where it cannot, the op keeps its
    PyTorch form (transformers' ops): a logged note, or a RuntimeError when ``required``."""
    return _enable_bf16_kernel(NORM_IMPLEMENTATIONS, "RMSNorm", "transformers' RMSNorm", required)


def _enable_bf16_kernel(
    implementations: dict[str, ops.Implementation], kernel: str, fallback: str, required: bool
) -> bool:
    """Register ``implementations`` (bf16 kernels) where the library loads and the CPU has AVX512-BF16."""
    if not load(required):
        return False
    if not _cpu_has_bf16_kernels():
        if required:
            raise RuntimeError(f"the CPU {kernel} kernel needs AVX512-BF16, which this CPU lacks")
        log.info("this CPU lacks AVX512-BF16: the ops run %s PyTorch ops", fallback)
        return False
    for name, implementation in implementations.items():
        ops.register(name, implementation)
    return True


def rms_norm_enabled() -> bool:
    """True when ``rms_norm`` uses the kernel."""
    return ops.registered().get("rms_norm") is NORM_IMPLEMENTATIONS["rms_norm"]


def attention_form() -> str | None:
    """The form of the kernel ``decoder_attention`` uses (a key of :data:`ATTENTION_FORMS`), None when it
    runs its PyTorch form."""
    current = ops.registered().get("decoder_attention")
    for form, implementations in ATTENTION_FORMS.items():
        if current is implementations["decoder_attention"]:
            return form
    return None


def disable() -> None:
    """Put the ops' PyTorch forms back (the library stays loaded)."""
    for name in IMPLEMENTATIONS:
        ops.register(name, None)


def enabled() -> bool:
    """True when the ops use these kernels."""
    current = ops.registered()
    return all(current.get(name) is implementation for name, implementation in IMPLEMENTATIONS.items())


class _DecoderAttention(torch.autograd.Function):
    """:func:`decoder_attention` through the kernel; the forward keeps the bf16 probabilities P [B, H, Tq, Tk]
    (as eager attention keeps them for its second matmul), the backward computes, per (batch, key head) in
    the core's caches: ``dP = dO V^T``, ``dS = scale * P (dP - sum_j dP P)`` (eager's softmax backward, from
    the bf16 P where eager uses its float32 copy), ``dQ = dS K``, ``dK = sum_h dS^T Q``, ``dV = sum_h P^T dO``
    (the sums over the query heads that read a key head)."""

    @staticmethod
    def forward(ctx, query, key, value, mask, scaling):  # noqa: ANN001, ANN205 (autograd's)
        out, probs = getattr(torch.ops, LIBRARY).decoder_attention_train(query, key, value, mask, scaling)
        ctx.save_for_backward(query, key, value, mask, probs)
        ctx.scaling = scaling
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        query, key, value, mask, probs = ctx.saved_tensors
        d_query, d_key, d_value = getattr(torch.ops, LIBRARY).decoder_attention_backward(
            grad_out, query, key, value, mask, probs, ctx.scaling
        )
        return d_query, d_key, d_value, None, None


class _DecoderAttentionMatmul(torch.autograd.Function):
    """:func:`decoder_attention_matmul`: the forward keeps the grouped query and the bf16 probabilities; the
    backward runs, per (batch, key head) with the G query heads' rows stacked (Q_g [G Tq, d], dO_g, P_g,
    dS_g [G Tq, Tk]): ``dV = P_g^T dO_g`` and ``dK = dS_g^T Q_g`` (the products sum over the heads that read
    the key head), ``dP = dO_g V^T``, ``dS = bf16(bf16(P (dP - sum_j dP P)) s)`` (the row pass: eager's
    softmax backward from the bf16 P, as the ``dot`` form), ``dQ = dS_g K``."""

    @staticmethod
    def forward(ctx, query, key, value, mask, scaling):  # noqa: ANN001, ANN205 (autograd's)
        out, grouped, probs = _matmul_attention_forward(query, key, value, mask, scaling)
        ctx.save_for_backward(grouped, key, value, mask, probs)
        ctx.scaling = scaling
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        grouped, key, value, mask, probs = ctx.saved_tensors
        batch, kv_heads, rows, width = grouped.shape
        heads, tq, tk = probs.shape[1], probs.shape[2], probs.shape[3]
        grad = grad_out.transpose(1, 2).reshape(batch, kv_heads, rows, width)  # dO_g
        probs_g = probs.view(batch, kv_heads, rows, tk)
        d_value = torch.matmul(probs_g.transpose(2, 3), grad)  # [B, Hk, Tk, d]
        d_probs = torch.matmul(grad, value.transpose(2, 3)).view(batch, heads, tq, tk)
        d_scores = getattr(torch.ops, LIBRARY).attention_probs_backward(d_probs, probs, mask, ctx.scaling)
        d_scores = d_scores.view(batch, kv_heads, rows, tk)
        d_query = torch.matmul(d_scores, key).view(batch, heads, tq, width)
        d_key = torch.matmul(d_scores.transpose(2, 3), grouped)  # [B, Hk, Tk, d]
        return d_query, d_key, d_value, None, None


class _RMSNorm(torch.autograd.Function):
    """:func:`rms_norm` through the kernel; the forward keeps each row's ``r = 1 / sqrt(mean x^2 + eps)``
    (float32), the backward follows autograd's chain through transformers' ops for a frozen weight:
    ``g = bf16(grad w)``, ``dx = bf16(g r - x r^3 / D sum_j g_j x_j)``."""

    @staticmethod
    def forward(ctx, x, weight, eps):  # noqa: ANN001, ANN205 (autograd's)
        out, r = getattr(torch.ops, LIBRARY).rms_norm_train(x, weight, eps)
        ctx.save_for_backward(x, weight, r)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        x, weight, r = ctx.saved_tensors
        return getattr(torch.ops, LIBRARY).rms_norm_backward(grad_out, x, weight, r), None, None


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
