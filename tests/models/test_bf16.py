"""A frozen LLM in bfloat16 under a float32 adapter (stage 2's CPU setting where the CPU has native bf16)
against the same model all in float32: the same predictions and adapter gradients within stated tolerances.

Both adapter precisions are checked (``PLoRAConfig.compute_dtype``): ``activations`` (the default: the bank's
GEMMs in bfloat16 on bf16 copies of the float32 parameters, no conversion of the activations) and ``params``
(the activations cast to float32 for the bank's GEMMs and back).

Tolerances: bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 0.2 %), so the answer logits of a
2-layer model move by about 1e-3 and p(yes) by less than ``P_YES_ATOL``; the order of the samples by p(yes),
which is all AUC reads, is the same. The adapter's gradient (float32 tensors, bf16 activations through the
frozen layers) points the same way (cosine > ``GRAD_COSINE``) and has the same size (relative error of the
whole gradient vector < ``GRAD_RTOL``).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from reclora_ds.data.prompts import PromptEncoder, prompt_body
from reclora_ds.llm_loader import cpu_bf16_flags, native_bf16, resolve_dtype
from reclora_ds.models.plora import PLoRALinear
from tests.models.test_rec_llm import make_batch, plora_model, views, word_tokenizer

P_YES_ATOL = 0.005  # measured: 1.8e-4 (activations), 3.6e-4 (params)
ANSWER_LOGIT_ATOL = 0.02
GRAD_COSINE = 0.99  # measured: 0.99998 (activations), 0.99999 (params)
GRAD_RTOL = 0.03  # measured: 0.0099 (activations), 0.0089 (params)


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer([prompt_body("ml-1m", v) for v in views()])


def bf16_backbone(model: torch.nn.Module, compute_dtype: str = "activations") -> torch.nn.Module:
    """A copy whose frozen LLM weights are bfloat16 and whose PLoRA banks and gates stay float32 (as
    ``load_causal_lm(dtype="bfloat16")`` followed by ``inject_plora`` builds it), its banks computing in
    ``compute_dtype``."""
    out = copy.deepcopy(model)
    for name, param in out.llm.named_parameters():
        if "plora_" not in name:
            param.data = param.data.to(torch.bfloat16)
    for module in out.modules():
        if isinstance(module, PLoRALinear):
            module.compute_dtype = compute_dtype
    return out


@pytest.mark.parametrize("compute_dtype", ["activations", "params"])
def test_bf16_backbone_gives_the_float32_predictions_within_tolerance(tokenizer, compute_dtype, monkeypatch):
    encoder = PromptEncoder(tokenizer, "ml-1m")
    fp32 = plora_model(tokenizer)
    bf16 = bf16_backbone(fp32, compute_dtype)
    assert {p.dtype for n, p in bf16.named_parameters() if "plora_" in n} == {torch.float32}
    assert bf16.llm.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    batch = make_batch(encoder, [0, 1, 2, 3, 4], with_answer=False)
    with torch.no_grad():
        want = fp32(batch)
        seen = set()  # dtypes of (x, A, B) that the bank's GEMMs got
        mix = PLoRALinear._mix_products
        monkeypatch.setattr(
            PLoRALinear, "_mix_products",
            lambda self, x, alpha, a, b: seen.add((x.dtype, alpha.dtype, a.dtype, b.dtype)) or mix(self, x, alpha, a, b),
        )  # fmt: skip
        got = bf16(batch)
        monkeypatch.undo()
    compute = torch.bfloat16 if compute_dtype == "activations" else torch.float32
    assert seen == {(compute,) * 4}
    print(f"{compute_dtype}: max |p_yes bf16 - fp32|:", float((got.p_yes - want.p_yes).abs().max()))
    torch.testing.assert_close(got.p_yes, want.p_yes, atol=P_YES_ATOL, rtol=0)
    torch.testing.assert_close(got.answer_logits, want.answer_logits, atol=ANSWER_LOGIT_ATOL, rtol=0)
    assert torch.equal(got.p_yes.argsort(), want.p_yes.argsort())  # AUC sees the same order

    train = make_batch(encoder, [0, 1, 2, 3, 4], with_answer=True)
    grads = []
    for model in (fp32, bf16):
        model.train()
        with model.routing(train):
            model(train).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.trainable_parameters().values()]))
    assert {p.grad.dtype for p in bf16.trainable_parameters().values()} == {torch.float32}
    cosine = F.cosine_similarity(grads[0], grads[1], dim=0)
    relative = (grads[1] - grads[0]).norm() / grads[0].norm()
    print(
        f"{compute_dtype}: adapter gradient cosine bf16 vs fp32 {float(cosine):.6f}, relative error {float(relative):.4f}"
    )
    assert cosine > GRAD_COSINE
    assert relative < GRAD_RTOL


def test_native_bf16_detection_and_auto_dtype(monkeypatch):
    assert cpu_bf16_flags("processor : 0\nflags : fpu avx512f avx512_bf16 amx_tile\n") == ("avx512_bf16",)
    assert cpu_bf16_flags("flags : fpu amx_bf16 amx_tile\n") == ("amx_bf16",)
    assert cpu_bf16_flags("flags : fpu avx2\n") == ()
    cpu = torch.device("cpu")
    # auto on a CPU: float32 unless the caller asks for native bf16 and the CPU has it
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", cpu, auto_cpu_bf16=True) == (
        torch.bfloat16 if native_bf16("cpu") else torch.float32
    )
    assert resolve_dtype("float32", cpu, auto_cpu_bf16=True) == torch.float32
