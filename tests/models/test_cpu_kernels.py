"""The C++ CPU kernels (reclora_ds.cpu.kernels) and the ops they implement (reclora_ds.models.ops), each
against a float64 reference written with PyTorch ops, with the kernels on and off.

The kernels are built here as the recipe builds them (``load(required=True)``: this project's machines have a
compiler, so a failed build fails the tests). Model-level checks with the kernels on and off, against the
hand-written per-sample loops, are in ``test_crm.py`` (its ``kernels`` fixture).
"""

from __future__ import annotations

import logging

import pytest
import torch

from reclora_ds.cpu import enable_cpu_extras
from reclora_ds.cpu import kernels as cpu_kernels
from reclora_ds.models import ops


@pytest.fixture
def kernels():
    """The raw torch.ops of the kernels; the ops use them inside the test, their previous forms after it."""
    cpu_kernels.load(required=True)
    with ops.implementations(cpu_kernels.IMPLEMENTATIONS):
        yield getattr(torch.ops, cpu_kernels.LIBRARY)


def gather_dot_reference(table, ids, query):
    return (table.double()[ids] * query.double()[:, None, :]).sum(-1)  # [B, L]


def attention_pool_reference(pre, target_term, weight, bias, mask, behaviours):
    """sum_j m_j (w . ReLU(pre_j + u) + c) h_j, the formula of TargetAttention with one hidden layer."""
    scores = torch.relu(pre + target_term[:, None, :]) @ weight + bias  # [B, L]
    return ((scores * mask)[..., None] * behaviours).sum(1)  # [B, D]


@pytest.mark.parametrize("width", [32, 7])  # a multiple of the vector width, and not
def test_gather_dot_equals_reference(kernels, width):
    g = torch.Generator().manual_seed(0)
    table = torch.randn(50, width, generator=g)
    ids = torch.randint(0, 50, (6, 37), generator=g)
    ids[:, :5] = 0  # PAD rows, as the loader leaves them
    query = torch.randn(6, width, generator=g)
    out = kernels.gather_dot(table, ids, query)
    assert out.shape == (6, 37) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), gather_dot_reference(table, ids, query), rtol=1e-5, atol=1e-5)
    # The op takes the kernel under no_grad and gives the same values; its PyTorch form agrees to rounding.
    with torch.no_grad():
        torch.testing.assert_close(ops.gather_dot(table, ids, query), out, rtol=0, atol=0)
        with ops.implementations({}):
            plain = ops.gather_dot(table, ids, query)
    torch.testing.assert_close(plain.double(), gather_dot_reference(table, ids, query), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [-1, 50])
def test_gather_dot_rejects_ids_outside_the_table(kernels, bad):
    ids = torch.zeros(2, 3, dtype=torch.long)
    ids[1, 2] = bad
    with pytest.raises(RuntimeError, match=rf"id {bad} is outside the table's 50 rows"):
        kernels.gather_dot(torch.randn(50, 4), ids, torch.randn(2, 4))


def test_gather_dot_is_differentiable_when_autograd_needs_it(kernels):
    g = torch.Generator().manual_seed(1)
    table = torch.randn(20, 8, generator=g, requires_grad=True)
    query = torch.randn(3, 8, generator=g, requires_grad=True)
    ids = torch.randint(0, 20, (3, 11), generator=g)
    out = ops.gather_dot(table, ids, query)  # grad enabled: the PyTorch form, whatever is registered
    assert out.requires_grad
    weights = torch.randn(3, 11, generator=g)
    (out * weights).sum().backward()
    ref_table, ref_query = table.detach().double().requires_grad_(), query.detach().double().requires_grad_()
    (gather_dot_reference(ref_table, ids, ref_query) * weights.double()).sum().backward()
    torch.testing.assert_close(table.grad.double(), ref_table.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(query.grad.double(), ref_query.grad, rtol=1e-5, atol=1e-5)


def attention_inputs(seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(5, 13, 16, generator=g)
    target_term = torch.randn(5, 16, generator=g)
    pre[0, 0, :4] = -target_term[0, :4]  # ReLU's kink: no gradient there, as in PyTorch
    mask = torch.rand(5, 13, generator=g) > 0.3
    mask[2] = False  # a sample with no history at all
    mask[3] = True
    return (
        pre,
        target_term,
        torch.randn(16, generator=g),
        torch.randn(1, generator=g),
        mask,
        torch.randn(5, 13, 8, generator=g),
    )


def test_attention_pool_forward_and_backward_equal_reference(kernels):
    inputs = [t.requires_grad_(t.dtype != torch.bool) for t in attention_inputs()]
    pre, target_term, weight, bias, mask, behaviours = inputs
    out = ops.attention_pool(*inputs)
    assert out.grad_fn is not None and "AttentionPool" in type(out.grad_fn).__name__  # the kernel ran
    g_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    differentiable = [pre, target_term, weight, bias, behaviours]
    grads = torch.autograd.grad(out, differentiable, g_out)

    ref_inputs = [t.detach().double().requires_grad_() for t in differentiable]
    ref = attention_pool_reference(*ref_inputs[:4], mask, ref_inputs[4])
    ref_grads = torch.autograd.grad(ref, ref_inputs, g_out.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[2], torch.zeros(8))  # nothing kept: an exact 0
    names = ("pre", "target_term", "weight", "bias", "behaviours")
    for name, got, want in zip(names, grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=f"gradient of {name}")
    assert torch.equal(grads[0][~mask], torch.zeros_like(grads[0][~mask]))  # masked positions: no gradient
    assert torch.equal(grads[4][~mask], torch.zeros_like(grads[4][~mask]))


def test_attention_pool_pytorch_form_equals_reference():
    """The op's own PyTorch form (no implementation registered): values and gradients in float64."""
    inputs = [t.requires_grad_(t.dtype != torch.bool) for t in attention_inputs(5)]
    pre, target_term, weight, bias, mask, behaviours = inputs
    with ops.implementations({}):
        out = ops.attention_pool(*inputs)
    assert "AttentionPool" not in type(out.grad_fn).__name__
    differentiable = [pre, target_term, weight, bias, behaviours]
    g_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(6))
    grads = torch.autograd.grad(out, differentiable, g_out)
    ref_inputs = [t.detach().double().requires_grad_() for t in differentiable]
    ref = attention_pool_reference(*ref_inputs[:4], mask, ref_inputs[4])
    ref_grads = torch.autograd.grad(ref, ref_inputs, g_out.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[2], torch.zeros(8))  # nothing kept: an exact 0
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_attention_pool_without_kernels_is_the_same_function(kernels):
    inputs = attention_inputs(4)
    with torch.no_grad():
        fast = ops.attention_pool(*inputs)
        with ops.implementations({}):
            plain = ops.attention_pool(*inputs)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)


def test_kernels_take_only_float32_cpu_tensors(kernels):
    """Other dtypes keep the PyTorch form (float64 here), so the ops compute them exactly as without kernels."""
    inputs = [t.double() if t.is_floating_point() else t for t in attention_inputs(7)]
    with torch.no_grad():
        out = ops.attention_pool(*inputs)
        with ops.implementations({}):
            plain = ops.attention_pool(*inputs)
    assert out.dtype == torch.float64 and torch.equal(out, plain)


def test_attention_pool_rejects_disagreeing_shapes(kernels):
    pre, target_term, weight, bias, mask, behaviours = attention_inputs()
    with pytest.raises(RuntimeError, match="disagree"):
        kernels.attention_pool(pre, target_term, weight, bias, mask, behaviours[:, :5])
    with pytest.raises(RuntimeError, match="disagree"):
        kernels.attention_pool(pre, target_term[:, :3], weight, bias, mask, behaviours)
    with pytest.raises(RuntimeError, match="bool mask"):
        kernels.attention_pool(pre, target_term, weight, bias, mask.float(), behaviours)


def test_a_failed_build_falls_back_or_raises(monkeypatch, caplog):
    import torch.utils.cpp_extension

    def no_compiler(**kwargs):
        raise OSError("g++: command not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.setattr(cpu_kernels, "_loaded", None)  # this process's state is restored after the test
    with ops.implementations({}):
        with caplog.at_level(logging.WARNING, logger="reclora_ds.cpu.kernels"):
            assert enable_cpu_extras(kernels=True).kernels is False
        assert "g++: command not found" in caplog.text and "PyTorch forms" in caplog.text
        assert not cpu_kernels.loaded() and ops.registered() == {}
        with pytest.raises(RuntimeError, match="could not be built"):
            cpu_kernels.enable(required=True)
        # The ops still work, through PyTorch.
        table, ids, query = torch.randn(9, 4), torch.randint(0, 9, (2, 5)), torch.randn(2, 4)
        with torch.no_grad():
            torch.testing.assert_close(
                ops.gather_dot(table, ids, query).double(), gather_dot_reference(table, ids, query)
            )


def test_enable_cpu_extras_switches_the_kernels_on_and_off():
    cpu_kernels.load(required=True)
    with ops.implementations({}):
        assert enable_cpu_extras(kernels=True).kernels and cpu_kernels.enabled()
        assert set(ops.registered()) == set(cpu_kernels.IMPLEMENTATIONS)
        assert enable_cpu_extras().kernels  # None: left as it is
        assert not enable_cpu_extras(kernels=False).kernels and ops.registered() == {}


@pytest.mark.parametrize("model_name", ["sim", "din"])
def test_model_step_with_kernels_equals_pytorch_forms(kernels, model_name):
    """A whole forward and backward of the default-shaped CRM (one attention layer, no dropout): the same
    logits, states and parameter gradients with and without the kernels."""
    from reclora_ds.models.crm import CRMConfig, FeatureSpec
    from reclora_ds.models.registry import build_crm
    from tests.models.test_crm import ML25M_META, make_batch, randomise_embeddings

    torch.manual_seed(0)
    config = CRMConfig(
        embedding_dim=8, attention_hidden=16, tower=(32, 32), top_k=5, item_merge="sum", short_term_length=4
    )  # make_batch gives a recent window of 4
    model = randomise_embeddings(build_crm(model_name, config, FeatureSpec.from_metadata(ML25M_META))).train()
    batch = make_batch(ML25M_META, batch=16, length=12, seed=5)
    # distinct items per history, so no two behaviours tie in the search whatever the summation order
    batch["hist_item"] = torch.stack([torch.randperm(38)[:12] + 2 for _ in range(16)]) * batch["hist_mask"]

    def step() -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        out = model(batch)
        torch.nn.functional.binary_cross_entropy_with_logits(out.logit, batch["label"]).backward()
        return (
            out.logit.detach(),
            out.hidden.detach(),
            {n: p.grad.clone() for n, p in model.named_parameters()},
        )

    fast = step()
    with ops.implementations({}):
        plain = step()
    torch.testing.assert_close(fast[0], plain[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast[1], plain[1], rtol=1e-5, atol=1e-6)
    for name, grad in plain[2].items():
        torch.testing.assert_close(fast[2][name], grad, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")
