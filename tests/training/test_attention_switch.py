"""Stage 2 trains with one attention kernel and scores with another (``train_attn_implementation``).

Reference: the same tiny Llama run with the kernel it was built with (transformers' own ``sdpa``); a spy on
transformers' ``eager_attention_forward`` shows which kernel a forward really ran.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers.models.llama import modeling_llama

from reclora_ds.training.plora_config import PLoRATrainConfig
from reclora_ds.training.plora_recipe import set_attention, train_attention
from tests.tiny_llm import tiny_llama


@pytest.fixture
def eager_calls(monkeypatch):
    calls = []
    original = modeling_llama.eager_attention_forward

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(modeling_llama, "eager_attention_forward", spy)
    return calls


def tiny_peft_llama() -> torch.nn.Module:
    llama = tiny_llama(vocab_size=100, hidden=64)
    assert llama.config._attn_implementation == "sdpa"  # how transformers builds it: the reference kernel
    return get_peft_model(llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()


def test_switching_kernels_changes_the_kernel_not_the_result(eager_calls):
    model = tiny_peft_llama()
    ids = torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding, as the prompts are padded
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
        assert not eager_calls
        set_attention(model, "eager")
        eager = model(input_ids=ids, attention_mask=mask).logits
        assert len(eager_calls) == 2  # one per layer
        set_attention(model, "sdpa")
        back = model(input_ids=ids, attention_mask=mask).logits
    assert len(eager_calls) == 2
    real = mask.bool()
    torch.testing.assert_close(eager[real], reference[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(back, reference, rtol=0, atol=0)


def test_gradients_agree_between_kernels():
    model = tiny_peft_llama()
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(2))
    grads = {}
    for kernel in ("sdpa", "eager"):
        set_attention(model, kernel)
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        grads[kernel] = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    for a, b in zip(grads["sdpa"], grads["eager"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _cfg(**kw) -> PLoRATrainConfig:
    return PLoRATrainConfig(data_dir="d", output_dir="o", mode="lora", **kw)


@pytest.mark.parametrize(
    ("setting", "scoring", "device", "expected"),
    [
        ("auto", "sdpa", "cpu", "eager_fused"),
        ("auto", "sdpa", "cuda", "sdpa"),
        ("auto", "eager", "cuda", "eager"),
        ("sdpa", "sdpa", "cpu", "sdpa"),
        ("eager", "sdpa", "cuda", "eager"),
    ],
)
def test_train_attention_resolution(setting, scoring, device, expected):
    cfg = _cfg(train_attn_implementation=setting, attn_implementation=scoring)
    assert train_attention(cfg, torch.device(device)) == expected


def test_unknown_kernel_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="train_attn_implementation"):
        _cfg(train_attn_implementation="flash")
