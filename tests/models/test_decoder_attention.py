"""The backbone's attention as one op (``attn_implementation=eager_fused``): its PyTorch form against
transformers' eager attention (bit for bit), the C++ kernel in both its forms (``dot``, ``matmul``;
forward and backward) against eager attention and a float64 reference, and a tiny Llama scoring and
training with it; which form runs, and the errors of an explicit ``plora.cpu_attention_form``.

The kernel tests need a CPU with AVX512-BF16 (this project's machines have it) and are skipped elsewhere.
"""

from __future__ import annotations

import platform
import re

import pytest
import torch
from transformers.models.llama.modeling_llama import eager_attention_forward

from reclora_ds.config import user_error_types
from reclora_ds.cpu import enable_cpu_extras
from reclora_ds.cpu import kernels as cpu_kernels
from reclora_ds.llm_loader import cpu_bf16_flags
from reclora_ds.models import ops
from reclora_ds.models.attention import EAGER_FUSED, eager_fused_attention, register
from reclora_ds.training.plora_config import CPU_ATTENTION_FORMS, PLoRATrainConfig
from reclora_ds.training.plora_recipe import (
    AttentionFormError,
    check_attention_form,
    enable_backbone_kernels,
    set_attention,
)
from tests.tiny_llm import tiny_llama

BF16_EPS = 2.0**-8  # bf16's spacing at 1: one rounding of a value near 1


class _Layer:
    """What transformers' eager attention reads from its module."""

    def __init__(self, groups: int) -> None:
        self.num_key_value_groups = groups
        self.training = False


def _inputs(batch, heads, kv_heads, length, width, dtype, seed=0, pads=(5, 0, 11)):
    """Random q, k, v and transformers' additive causal + left-padding mask (pads[b] padded positions)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, heads, width, generator=g).to(dtype).transpose(1, 2)  # a strided view
    k = torch.randn(batch, kv_heads, length, width, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, length, width, generator=g).to(dtype)
    visible = torch.ones(length, length, dtype=torch.bool).tril()[None, None].repeat(batch, 1, 1, 1)
    for b in range(batch):
        visible[b, :, :, : pads[b % len(pads)]] = False
    mask = torch.zeros(batch, 1, length, length, dtype=dtype).masked_fill(~visible, torch.finfo(dtype).min)
    return q, k, v, mask


def _eager(q, k, v, mask, scaling):
    return eager_attention_forward(_Layer(q.shape[1] // k.shape[1]), q, k, v, mask, scaling)[0]


def _skip_without_bf16_kernels() -> None:
    if not cpu_kernels.load(required=True) or not cpu_kernels.decoder_attention_supported():
        pytest.skip("this CPU lacks AVX512-BF16")


@pytest.fixture(params=sorted(cpu_kernels.ATTENTION_FORMS))
def kernel(request):
    """The attention kernel registered, in each form."""
    _skip_without_bf16_kernels()
    with ops.implementations(cpu_kernels.ATTENTION_FORMS[request.param]):
        yield request.param


@pytest.fixture
def dot_kernel():
    """The ``dot`` form registered (the tests of its own limits)."""
    _skip_without_bf16_kernels()
    with ops.implementations(cpu_kernels.ATTENTION_FORMS["dot"]):
        yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [True, False])
def test_pytorch_form_is_transformers_eager_attention(dtype, masked):
    q, k, v, mask = _inputs(3, 6, 2, 19, 16, dtype)
    mask = mask if masked else None
    with ops.implementations({}):
        got = ops.decoder_attention(q, k, v, mask, 0.3)
    assert torch.equal(got, _eager(q, k, v, mask, 0.3))


@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "length", "width", "mask_batch"),
    [
        (3, 9, 3, 37, 64, 3),  # SmolLM2's heads, a length no block size divides
        (2, 4, 4, 130, 128, 2),  # no grouping, Llama-7B's head width, more than two key blocks
        (1, 2, 1, 5, 64, 1),  # fewer query rows than a block
        (3, 4, 2, 70, 64, 1),  # one mask for the whole batch
    ],
)
def test_kernel_equals_eager_attention_to_bf16_rounding(
    kernel, batch, heads, kv_heads, length, width, mask_batch
):
    q, k, v, mask = _inputs(batch, heads, kv_heads, length, width, torch.bfloat16, seed=length)
    mask = mask[:mask_batch]
    scaling = width**-0.5
    got = ops.decoder_attention(q, k, v, mask, scaling)
    eager = _eager(q, k, v, mask, scaling)
    exact = _eager(q.double(), k.double(), v.double(), mask.double(), scaling)
    assert got.dtype == torch.bfloat16 and got.shape == (batch, length, heads, width)
    # padded query rows see no key at all: eager spreads them evenly over every key, and so does the kernel
    torch.testing.assert_close(got.float(), eager.float(), rtol=2 * BF16_EPS, atol=2 * BF16_EPS)
    assert (got != eager).float().mean() < 0.01  # the same roundings as eager's ops: nearly every value equal
    assert (got.double() - exact).abs().max() <= (eager.double() - exact).abs().max() + BF16_EPS


def test_kernel_without_a_mask_attends_to_every_key(kernel):
    q, k, v, _ = _inputs(2, 4, 2, 33, 64, torch.bfloat16)
    got = ops.decoder_attention(q, k, v, None, 0.125)
    torch.testing.assert_close(
        got.float(), _eager(q, k, v, None, 0.125).float(), rtol=2 * BF16_EPS, atol=2 * BF16_EPS
    )


@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "length", "width"),
    [(2, 9, 3, 45, 64), (2, 4, 4, 70, 128), (1, 2, 1, 5, 64)],
)
def test_kernel_gradients_are_as_close_to_float64_as_eager_ones(
    kernel, batch, heads, kv_heads, length, width
):
    """The kernel's backward against eager's (both bf16) and a float64 reference, padded rows included."""
    q, k, v, mask = _inputs(batch, heads, kv_heads, length, width, torch.bfloat16, seed=length)
    grad = torch.randn(batch, length, heads, width, generator=torch.Generator().manual_seed(1)).bfloat16()
    scaling = width**-0.5

    def gradients(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        fn(*leaves, mask.to(dtype), scaling).backward(grad.to(dtype))
        return [t.grad.double() for t in leaves]

    kernel_grads = gradients(ops.decoder_attention, torch.bfloat16)
    eager_grads = gradients(_eager, torch.bfloat16)
    exact = gradients(_eager, torch.float64)
    for name, got, eager, want in zip("qkv", kernel_grads, eager_grads, exact, strict=True):
        bound = (eager - want).abs().max() + 2 * BF16_EPS * want.abs().max()
        assert (got - want).abs().max() <= bound, f"gradient of {name}"


def test_without_the_kernel_gradients_are_eager_ones():
    q, k, v, mask = _inputs(2, 4, 2, 21, 64, torch.bfloat16)
    grads = {}
    for name, fn in (("op", ops.decoder_attention), ("eager", _eager)):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        with ops.implementations({}):
            fn(*leaves, mask, 0.125).float().square().sum().backward()
        grads[name] = [t.grad for t in leaves]
    for got, want in zip(grads["op"], grads["eager"], strict=True):
        assert torch.equal(got, want)


def test_kernel_backward_rejects_a_gradient_of_another_shape(dot_kernel):
    q, k, v, mask = _inputs(1, 2, 1, 8, 64, torch.bfloat16)
    library = getattr(torch.ops, cpu_kernels.LIBRARY)
    _, probs = library.decoder_attention_train(q, k, v, mask, 0.125)
    with pytest.raises(RuntimeError, match="decoder_attention_backward: grad"):
        library.decoder_attention_backward(torch.zeros(1, 8, 2, 32).bfloat16(), q, k, v, mask, probs, 0.125)


def test_kernel_takes_only_what_it_computes(dot_kernel):
    q, k, v, mask = _inputs(2, 4, 2, 9, 64, torch.bfloat16)
    accepts = cpu_kernels.accepts_decoder_attention
    assert accepts(q, k, v, mask, 0.1) and accepts(q, k, v, None, 0.1)
    assert not accepts(q.float(), k.float(), v.float(), mask.float(), 0.1)  # float32: eager's ops
    assert not accepts(q[..., :32], k[..., :32], v[..., :32], mask, 0.1)  # head width not a multiple of 64
    assert not accepts(q, k, v, mask.expand(2, 4, 9, 9), 0.1)  # a per-head mask
    with pytest.raises(RuntimeError, match="decoder_attention: shapes"):
        cpu_kernels.decoder_attention(q[..., :32], k[..., :32], v[..., :32], mask, 0.1)


def test_matmul_form_takes_any_head_width_and_equals_eager_there():
    """The ``matmul`` form's products have no block width: a head width of 32 runs it (the ``dot`` form
    leaves it to eager's ops), forward and backward, within eager's bf16 error of float64."""
    _skip_without_bf16_kernels()
    q, k, v, mask = _inputs(2, 6, 2, 23, 32, torch.bfloat16, seed=5)
    assert cpu_kernels.accepts_decoder_attention_matmul(q, k, v, mask, 0.2)
    assert not cpu_kernels.accepts_decoder_attention(q, k, v, mask, 0.2)
    assert not cpu_kernels.accepts_decoder_attention_matmul(q, k, v, mask, 0.2, 0.1)  # dropout: eager's ops
    grad = torch.randn(2, 23, 6, 32, generator=torch.Generator().manual_seed(6)).bfloat16()

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, mask.to(dtype), 0.2)
        out.backward(grad.to(dtype))
        return [out.double()] + [t.grad.double() for t in leaves]

    got = run(cpu_kernels.decoder_attention_matmul, torch.bfloat16)
    eager = run(_eager, torch.bfloat16)
    exact = run(_eager, torch.float64)
    for name, g, e, want in zip(("out", "dq", "dk", "dv"), got, eager, exact, strict=True):
        assert (g - want).abs().max() <= (e - want).abs().max() + 2 * BF16_EPS * want.abs().max(), name


def test_row_passes_reject_mismatched_shapes():
    _skip_without_bf16_kernels()
    library = getattr(torch.ops, cpu_kernels.LIBRARY)
    scores = torch.zeros(2, 3, 5, 5, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="attention_probs: mask"):
        library.attention_probs(scores, torch.zeros(2, 1, 5, 4, dtype=torch.bfloat16), 0.1)
    with pytest.raises(RuntimeError, match="attention_probs_backward: probs"):
        library.attention_probs_backward(scores, scores[:, :2], None, 0.1)


@pytest.mark.parametrize(("amx", "expected"), [(True, "matmul"), (False, "dot")])
def test_auto_form_is_matmul_exactly_where_the_cpu_has_amx(monkeypatch, amx, expected):
    _skip_without_bf16_kernels()
    monkeypatch.setattr(cpu_kernels, "cpu_has_amx", lambda: amx)
    with ops.implementations({}):
        extras = enable_cpu_extras(attention=True)
        assert extras.attention and extras.attention_form == expected == cpu_kernels.attention_form()
        explicit = "dot" if expected == "matmul" else "matmul"
        assert enable_cpu_extras(attention=True, attention_form=explicit).attention_form == explicit
        # a run whose attention is not eager_fused uses no form, whatever this process registered before
        cfg = PLoRATrainConfig(data_dir="d", output_dir="o")
        assert enable_backbone_kernels(cfg, ("sdpa",)) is None
        assert enable_backbone_kernels(cfg, ("sdpa", EAGER_FUSED)) == expected


def test_an_explicit_form_the_run_cannot_use_is_an_error_naming_the_key(monkeypatch):
    cfg = PLoRATrainConfig(data_dir="d", output_dir="o", cpu_attention_form="matmul")
    cpu = torch.device("cpu")
    check_attention_form(cfg, cpu, (EAGER_FUSED, "sdpa"))  # the kernel runs: nothing to say
    with pytest.raises(AttentionFormError, match=r"plora.cpu_attention_form=matmul: .* attention is sdpa"):
        check_attention_form(cfg, cpu, ("sdpa", "sdpa"))
    with pytest.raises(AttentionFormError, match="plora.cpu_attention_form=matmul: a cuda run"):
        check_attention_form(cfg, torch.device("cuda"), (EAGER_FUSED,))
    auto = PLoRATrainConfig(data_dir="d", output_dir="o")
    check_attention_form(auto, torch.device("cuda"), ("sdpa",))  # auto never fails
    assert AttentionFormError in user_error_types()
    with pytest.raises(ValueError, match="cpu_attention_form must be one of"):
        PLoRATrainConfig(data_dir="d", output_dir="o", cpu_attention_form="amx")
    assert CPU_ATTENTION_FORMS == cpu_kernels.ATTENTION_FORM_CHOICES  # the config's choices are the kernel's
    # a CPU without AVX512-BF16: auto keeps eager's ops, an explicit form fails naming the key
    cpu_kernels.load(required=True)
    monkeypatch.setattr(cpu_kernels, "_cpu_has_bf16_dot", False)
    with ops.implementations({}):
        assert enable_backbone_kernels(auto, (EAGER_FUSED,)) is None
        with pytest.raises(AttentionFormError, match="plora.cpu_attention_form=matmul: .*AVX512-BF16"):
            enable_backbone_kernels(cfg, (EAGER_FUSED,))


def test_enable_cpu_extras_registers_only_the_attention_kernel():
    if not cpu_kernels.load(required=True) or not cpu_kernels.decoder_attention_supported():
        pytest.skip("this CPU lacks AVX512-BF16")
    with ops.implementations({}):
        extras = enable_cpu_extras(kernels=False, attention=True)
        assert extras.attention and not extras.kernels
        assert set(ops.registered()) == {"decoder_attention"}


def test_a_cpu_without_bf16_dot_products_keeps_eager_ops(monkeypatch, caplog):
    """Where the CPU lacks AVX512-BF16 nothing is registered (a logged note) and the op runs eager's ops;
    ``required`` makes that an error."""
    cpu_kernels.load(required=True)
    monkeypatch.setattr(cpu_kernels, "_cpu_has_bf16_dot", False)
    q, k, v, mask = _inputs(2, 4, 2, 9, 64, torch.bfloat16)
    with ops.implementations({}), caplog.at_level("INFO", logger=cpu_kernels.__name__):
        assert not enable_cpu_extras(attention=True).attention
        assert "AVX512-BF16" in caplog.text and ops.registered() == {}
        assert torch.equal(ops.decoder_attention(q, k, v, mask, 0.125), _eager(q, k, v, mask, 0.125))
        with pytest.raises(RuntimeError, match="AVX512-BF16"):
            cpu_kernels.enable_attention(required=True)


def test_a_llama_scores_with_eager_fused_as_with_eager(kernel):
    register()
    llama = tiny_llama(vocab_size=100, hidden=256, heads=4, kv_heads=2).to(torch.bfloat16)
    ids = torch.randint(0, 100, (3, 29), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # left padding, as the prompts are padded
    logits = {}
    with torch.no_grad():
        for name in ("eager", EAGER_FUSED):
            set_attention(llama, name)
            logits[name] = llama(input_ids=ids, attention_mask=mask).logits.float()
        with ops.implementations({}):
            plain = llama(input_ids=ids, attention_mask=mask).logits.float()
    assert torch.equal(plain, logits["eager"])  # without the kernel: eager's ops exactly
    real = mask.bool()
    spread = logits["eager"][real].std()
    assert (logits[EAGER_FUSED][real] - logits["eager"][real]).abs().max() < 0.05 * spread


def test_a_llama_trains_with_eager_fused_as_with_eager(kernel):
    """One bf16 training step's loss and gradients, eager against eager_fused, both against float32 eager."""
    register()
    llama = tiny_llama(vocab_size=100, hidden=256, heads=4, kv_heads=2)
    ids = torch.randint(0, 100, (2, 33), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0

    def step(model, name):
        set_attention(model, name)
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        return torch.cat([p.grad.double().flatten() for p in model.parameters()])

    exact = step(llama, "eager")
    llama = llama.to(torch.bfloat16)
    eager, fused = step(llama, "eager"), step(llama, EAGER_FUSED)
    eager_error = (eager - exact).norm() / exact.norm()
    assert (fused - exact).norm() / exact.norm() <= 1.5 * eager_error + 1e-3


def test_attention_dropout_runs_eager_ops_with_the_kernel_registered(kernel):
    """A backbone with attention dropout trains through eager's ops (the kernel has no dropout): the same
    dropped probabilities as transformers' eager attention from the same random state."""
    q, k, v, mask = _inputs(2, 4, 2, 11, 64, torch.bfloat16)
    layer = _Layer(2)
    layer.training = True
    torch.manual_seed(7)
    got, _ = eager_fused_attention(layer, q, k, v, mask, 0.125, dropout=0.3)
    torch.manual_seed(7)
    want, _ = eager_attention_forward(layer, q, k, v, mask, 0.125, dropout=0.3)
    assert torch.equal(got, want)
    assert not cpu_kernels.accepts_decoder_attention(q, k, v, mask, 0.125, 0.3)


def test_config_accepts_eager_fused_and_names_the_key_of_a_bad_kernel():
    cfg = PLoRATrainConfig(data_dir="d", output_dir="o", attn_implementation=EAGER_FUSED)
    assert cfg.attn_implementation == EAGER_FUSED
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        PLoRATrainConfig(data_dir="d", output_dir="o", attn_implementation="fused")


def test_cpu_has_amx_agrees_with_the_flags_linux_lists():
    """``auto``'s question (CPUID and the OS's permission for the tiles) against /proc/cpuinfo's ``amx_bf16``
    and the kernel version that grants the permission (Linux 5.16)."""
    _skip_without_bf16_kernels()
    if platform.system() != "Linux":
        pytest.skip("reads /proc/cpuinfo")
    release = tuple(int(part) for part in re.findall(r"\d+", platform.release())[:2])
    listed = "amx_bf16" in cpu_bf16_flags()
    assert cpu_kernels.cpu_has_amx() == (listed and release >= (5, 16))
