"""``benchmarks/gemm_replay.py``: the products it replays are a real backbone's, counted as torch's FLOP counter
counts that backbone's own forward and backward (frozen weights, gradients to the inputs only)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]


def load_gemm_replay():
    """The benchmark script as a module (loaded once; its dataclass resolves annotations through sys.modules)."""
    if "gemm_replay" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gemm_replay", ROOT / "benchmarks" / "gemm_replay.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["gemm_replay"]


def grouped_llama() -> LlamaForCausalLM:
    """A random Llama with grouped keys (4 query heads, 2 key heads) and an MLP wider than the model."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False, attn_implementation="eager",
    )  # fmt: skip
    return LlamaForCausalLM(config).float().eval().requires_grad_(False)


def layer_flops(model: LlamaForCausalLM, batch: int, tokens: int, train: bool) -> int:
    """FLOPs that FlopCounterMode counts inside the decoder layers of a forward (and backward) on random
    input embeddings (the rotary table's small product sits outside the layers, the LM head is not run)."""
    embeds = torch.randn(batch, tokens, model.config.hidden_size, requires_grad=train)
    with torch.set_grad_enabled(train), FlopCounterMode(display=False) as counter:
        hidden = model.model(inputs_embeds=embeds).last_hidden_state
        if train:
            hidden.sum().backward()
    counts = counter.get_flop_counts()
    layers = [name for name in counts if name.rpartition(".layers.")[2].isdigit()]
    assert len(layers) == model.config.num_hidden_layers, sorted(counts)
    return sum(sum(counts[name].values()) for name in layers)


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_the_replayed_products_are_the_flops_of_the_backbones_own_step(train):
    gemm_replay = load_gemm_replay()
    model = grouped_llama()
    products = gemm_replay.BackboneProducts.of_config(model.config)
    batch, tokens = 2, 10
    assert products.flops(batch, tokens, train) == layer_flops(model, batch, tokens, train)


def test_the_floor_counts_the_layers_linear_weights_and_the_attention_width():
    gemm_replay = load_gemm_replay()
    model = grouped_llama()
    products = gemm_replay.BackboneProducts.of_config(model.config)
    weights = sum(p.numel() for name, p in model.named_parameters() if ".layers." in name and p.dim() == 2)
    assert products.decoder_weights == weights
    tokens = 7.5
    forward = 2 * weights * tokens + 4 * 3 * tokens**2 * 48
    assert products.floor_flops(tokens, False) == pytest.approx(forward)
    assert products.floor_flops(tokens, True) == pytest.approx(2 * forward)


def test_a_replay_times_every_layer_and_refuses_an_empty_batch():
    gemm_replay = load_gemm_replay()
    products = gemm_replay.BackboneProducts.of_config(grouped_llama().config)
    for train in (False, True):
        seconds = gemm_replay.replay_seconds(products, 2, 16, train=train, dtype=torch.float32, repeats=1)
        assert 0 < seconds < 10 and math.isfinite(seconds)
    with pytest.raises(ValueError, match="batch, tokens and repeats must be >= 1"):
        gemm_replay.replay_seconds(products, 0, 16, train=True)
