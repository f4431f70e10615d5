"""The backbone's RMSNorm as one op (``norm_implementation=fused``): its PyTorch form against transformers'
RMSNorm classes (bit for bit), the swap of a loaded Llama's norms, the C++ kernel (forward and backward)
against transformers' ops and a float64 reference, and a tiny Llama scoring and training with it.

The kernel tests need a CPU with AVX512-BF16 (this project's machines have it) and are skipped elsewhere.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from reclora_ds.cpu import enable_cpu_extras
from reclora_ds.cpu import kernels as cpu_kernels
from reclora_ds.models import ops
from reclora_ds.models.norms import SAME_AS_LLAMA_RMSNORM, RMSNorm, fuse_rms_norms
from reclora_ds.training.plora_config import PLoRATrainConfig
from tests.tiny_llm import tiny_llama

BF16_EPS = 2.0**-8  # bf16's spacing at 1: one rounding of a value near 1


def _norm_class(name: str) -> type:
    model = name.removesuffix("RMSNorm").lower()
    return getattr(importlib.import_module(f"transformers.models.{model}.modeling_{model}"), name)


def _norm(width: int, dtype: torch.dtype, seed: int = 0) -> LlamaRMSNorm:
    norm = LlamaRMSNorm(width, eps=1e-5)
    norm.weight.data = 1 + 0.3 * torch.randn(width, generator=torch.Generator().manual_seed(seed))
    return norm.to(dtype).requires_grad_(False)


def _activations(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    """Rows of different scales (as a residual stream has), one of them all zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.rand((*shape[:-1], 1), generator=g).mul(8)
    x.view(-1, shape[-1])[0] = 0
    return x.to(dtype)


@pytest.fixture
def kernel():
    if not cpu_kernels.load(required=True) or not cpu_kernels.decoder_attention_supported():
        pytest.skip("this CPU lacks AVX512-BF16")
    with ops.implementations(cpu_kernels.NORM_IMPLEMENTATIONS):
        yield


@pytest.mark.parametrize("name", SAME_AS_LLAMA_RMSNORM)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pytorch_form_is_each_listed_transformers_norm(name, dtype):
    norm = _norm_class(name)(48, eps=1e-6).to(dtype)
    norm.weight.data.normal_(1, 0.3, generator=torch.Generator().manual_seed(2))
    x = _activations((3, 7, 48), dtype).requires_grad_()
    with ops.implementations({}):
        got = RMSNorm(norm.weight, norm.variance_epsilon)(x)
    want = norm(x)
    assert torch.equal(got, want)
    g = torch.randn_like(x)
    assert torch.equal(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0])


def test_fusing_a_llama_keeps_its_weights_state_dict_and_outputs():
    llama = tiny_llama(vocab_size=100, hidden=64, heads=4, kv_heads=2, layers=3).to(torch.bfloat16)
    ids = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(0))
    weights = {name: p for name, p in llama.named_parameters() if name.endswith("norm.weight")}
    keys = list(llama.state_dict())
    with torch.no_grad():
        before = llama(input_ids=ids).logits
    assert fuse_rms_norms(llama) == 2 * 3 + 1  # two per decoder layer and the final norm
    assert not any(isinstance(m, LlamaRMSNorm) for m in llama.modules())
    fused = dict(llama.named_parameters())
    assert all(fused[name] is p for name, p in weights.items())  # the same Parameter objects
    assert list(llama.state_dict()) == keys
    with torch.no_grad(), ops.implementations({}):
        assert torch.equal(llama(input_ids=ids).logits, before)
    assert fuse_rms_norms(llama) == 0  # nothing left to swap


@pytest.mark.parametrize("shape", [(2, 37, 576), (5, 64), (1, 1, 128)])
def test_kernel_equals_transformers_to_bf16_rounding(kernel, shape):
    norm = _norm(shape[-1], torch.bfloat16)
    x = _activations(shape, torch.bfloat16)
    with torch.no_grad():
        got = ops.rms_norm(x, norm.weight, 1e-5)
        want = norm(x)
    exact = norm.weight.double() * x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)
    # the same roundings; only the order of the sum of squares differs: at most one bf16 rounding apart
    assert (got.double() - want.double()).abs().max() <= BF16_EPS * want.double().abs().max()
    assert (got != want).float().mean() < 0.01
    assert (got.double() - exact).abs().max() <= 2 * BF16_EPS * exact.abs().max()


@pytest.mark.parametrize("shape", [(2, 37, 576), (3, 64)])
def test_kernel_gradient_is_as_close_to_float64_as_transformers_one(kernel, shape):
    norm = _norm(shape[-1], torch.bfloat16, seed=3)
    x = _activations(shape, torch.bfloat16, seed=4)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(5)).bfloat16()

    def gradient(fn, dtype):
        leaf = x.detach().to(dtype).requires_grad_()
        fn(leaf).backward(grad.to(dtype))
        return leaf.grad.double()

    got = gradient(lambda t: ops.rms_norm(t, norm.weight, 1e-5), torch.bfloat16)
    eager = gradient(norm, torch.bfloat16)
    exact_norm = _norm(shape[-1], torch.float64, seed=3)
    exact = gradient(exact_norm, torch.float64)
    rows = shape[-1]

    def row_error(t):  # each row's largest error over its largest value (rows differ in scale by 1e4)
        scale = exact.reshape(-1, rows).abs().amax(-1)
        return (t - exact).reshape(-1, rows).abs().amax(-1) / scale

    assert (row_error(got) <= row_error(eager) + 2 * BF16_EPS).all()
    assert torch.isfinite(got).all()  # the zero row: r = 1 / sqrt(eps), finite


def test_kernel_takes_only_what_it_computes(kernel):
    norm = _norm(64, torch.bfloat16)
    x = _activations((2, 5, 64), torch.bfloat16)
    accepts = cpu_kernels.accepts_rms_norm
    assert accepts(x, norm.weight, 1e-5)
    assert not accepts(x.float(), norm.weight.float(), 1e-5)  # float32: transformers' ops
    assert not accepts(x[..., :32], norm.weight, 1e-5)  # widths disagree
    trainable = norm.weight.detach().clone().requires_grad_()
    assert not accepts(x, trainable, 1e-5)  # a weight to train: the kernel has no gradient for it
    with torch.no_grad():
        assert accepts(x, trainable, 1e-5)
    with pytest.raises(RuntimeError, match="rms_norm: expects bf16"):
        cpu_kernels.rms_norm(x, norm.weight.float(), 1e-5)


def test_a_trainable_weight_gets_transformers_gradient_with_the_kernel_registered(kernel):
    norm = _norm(64, torch.bfloat16).requires_grad_()
    x = _activations((2, 5, 64), torch.bfloat16).requires_grad_()
    grad = torch.randn(2, 5, 64).bfloat16()
    got = torch.autograd.grad(ops.rms_norm(x, norm.weight, 1e-5), (x, norm.weight), grad)
    want = torch.autograd.grad(norm(x), (x, norm.weight), grad)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_enable_cpu_extras_registers_only_the_norm_kernel():
    if not cpu_kernels.load(required=True) or not cpu_kernels.decoder_attention_supported():
        pytest.skip("this CPU lacks AVX512-BF16")
    with ops.implementations({}):
        extras = enable_cpu_extras(rms_norm=True)
        assert extras.rms_norm and not extras.attention
        assert set(ops.registered()) == {"rms_norm"}


def test_a_cpu_without_avx512_bf16_keeps_transformers_ops(monkeypatch, caplog):
    cpu_kernels.load(required=True)
    monkeypatch.setattr(cpu_kernels, "_cpu_has_bf16_dot", False)
    with ops.implementations({}), caplog.at_level("INFO", logger=cpu_kernels.__name__):
        assert not enable_cpu_extras(rms_norm=True).rms_norm
        assert "AVX512-BF16" in caplog.text and ops.registered() == {}
        with pytest.raises(RuntimeError, match="AVX512-BF16"):
            cpu_kernels.enable_rms_norm(required=True)


def test_a_fused_llama_scores_and_trains_as_transformers_one(kernel):
    """bf16 logits, and one training step's gradients of the backbone's frozen-norm step, with the kernel
    against transformers' norms; both against float32."""
    llama = tiny_llama(vocab_size=100, hidden=128, heads=2, kv_heads=1, layers=2)
    ids = torch.randint(0, 100, (2, 23), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0

    def run(model):
        for name, p in model.named_parameters():
            p.requires_grad_("norm" not in name)  # the norms frozen, as a backbone's are in stage 2
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        out.loss.backward()
        grads = torch.cat([p.grad.double().flatten() for p in model.parameters() if p.grad is not None])
        return out.logits.detach().float(), grads

    exact_logits, exact = run(llama)
    plain_logits, plain = run(llama.to(torch.bfloat16))
    assert fuse_rms_norms(llama) == 5
    fused_logits, fused = run(llama)
    real = mask.bool()
    spread = exact_logits[real].std()
    plain_error = (plain_logits[real] - exact_logits[real]).abs().max()
    assert (fused_logits[real] - exact_logits[real]).abs().max() <= 1.5 * plain_error + 0.01 * spread
    plain_error = (plain - exact).norm() / exact.norm()
    assert (fused - exact).norm() / exact.norm() <= 1.5 * plain_error + 1e-3


def test_config_names_the_key_of_a_bad_norm_implementation():
    assert PLoRATrainConfig(data_dir="d", output_dir="o").norm_implementation == "fused"
    with pytest.raises(ValueError, match="norm_implementation must be one of"):
        PLoRATrainConfig(data_dir="d", output_dir="o", norm_implementation="kernel")
