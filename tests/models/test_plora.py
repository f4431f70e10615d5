"""PLoRA gate, bank, injection and routing, checked against independent references.

References: a hand-written LoRA for one-hot gates, peft's own LoRA for N_m=1, an einsum that builds the
per-sample delta W, the base model for a zero-initialised B, and non-checkpointed gradients.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

from reclora_ds.models.inject import (
    SHARED_GATE_NAME,
    inject_plora,
    plora_parameters,
    plora_state_dict,
    route_gate_inputs,
)
from reclora_ds.models.plora import PLoRAConfig, PLoRAGate, PLoRALinear
from tests.tiny_llm import tiny_llama

CRM_DIM = 8
VOCAB = 100
NUM_LAYERS = 2


def _tiny_llama() -> nn.Module:
    return tiny_llama(
        vocab_size=VOCAB, layers=NUM_LAYERS, kv_heads=4, max_positions=64, tie_word_embeddings=False
    )


def _input_ids(batch: int = 2, tokens: int = 6) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(1))


def _crm_state(batch: int = 2, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, CRM_DIM, generator=torch.Generator().manual_seed(seed))


def _randomise_banks(model: nn.Module, seed: int = 3) -> None:
    """Non-zero B (and fresh A) so the adapters change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, PLoRALinear):
                module.plora_A.copy_(0.3 * torch.randn(module.plora_A.shape, generator=generator))
                module.plora_B.copy_(0.3 * torch.randn(module.plora_B.shape, generator=generator))


def _plora_layer(
    mixing: str = "products", num_experts: int = 3, rank: int = 2, d_in: int = 7, d_out: int = 11
):
    torch.manual_seed(0)
    config = PLoRAConfig(num_experts=num_experts, rank=rank, crm_dim=CRM_DIM, mixing=mixing)
    layer = PLoRALinear(nn.Linear(d_in, d_out), config)
    _randomise_banks(layer)
    return layer


def _one_hot(batch: int, num_experts: int, expert: int) -> torch.Tensor:
    alpha = torch.zeros(batch, num_experts)
    alpha[:, expert] = 1.0
    return alpha


def _llama_logits(model: nn.Module, crm_state: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), route_gate_inputs(model, crm_state):
        return model(input_ids=input_ids).logits


# --- bank initialisation and single-layer math -----------------------------------------------------------


def test_bank_init_is_per_expert_kaiming_a_and_zero_b():
    d_in = 64
    layer = PLoRALinear(nn.Linear(d_in, 16), PLoRAConfig(num_experts=4, rank=8, crm_dim=CRM_DIM))
    assert layer.plora_A.shape == (4, 8, d_in) and layer.plora_B.shape == (4, 16, 8)
    assert torch.count_nonzero(layer.plora_B) == 0
    # Kaiming-uniform, a=sqrt(5), fan_in = d_in: U(-1/sqrt(d_in), 1/sqrt(d_in)) for every expert.
    bound = 1 / math.sqrt(d_in)
    per_expert_max = layer.plora_A.abs().amax(dim=(1, 2))
    assert torch.all(per_expert_max <= bound)
    # 512 draws per expert: the max is close to the bound, far above the whole-tensor bound 1/sqrt(r*d_in).
    assert torch.all(per_expert_max > 0.9 * bound)


@pytest.mark.parametrize("mixing", ["products", "factors"])
def test_one_hot_gate_equals_hand_written_lora(mixing):
    layer = _plora_layer(mixing)
    x = torch.randn(2, 5, 7)
    for expert in range(layer.num_experts):
        A_k, B_k = layer.plora_A[expert], layer.plora_B[expert]
        expected = x @ layer.base_layer.weight.T + layer.base_layer.bias + (x @ A_k.T @ B_k.T) * (16.0 / 2)
        torch.testing.assert_close(layer(x, alpha=_one_hot(2, 3, expert)), expected)


def test_mixings_agree_for_one_hot_and_differ_otherwise():
    products, factors = _plora_layer("products"), _plora_layer("factors")
    torch.testing.assert_close(products.plora_B, factors.plora_B)
    x = torch.randn(2, 5, 7)
    one_hot = _one_hot(2, 3, 1)
    torch.testing.assert_close(products(x, alpha=one_hot), factors(x, alpha=one_hot))
    mixed = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    assert not torch.allclose(products(x, alpha=mixed), factors(x, alpha=mixed), atol=1e-3)


class _RecordOutputShapes(TorchFunctionMode):
    """Records the shape of every tensor a torch function returns."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.shapes.append(tuple(value.shape))
        return out


BF16_RTOL = 0.02  # of the largest |value|: a few bf16 roundings (2^-9 each) of the operands and results


def _max_relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want.detach()).abs().max() / want.detach().abs().max())


@pytest.mark.parametrize("mixing", ["products", "factors"])
@pytest.mark.parametrize("compute_dtype", ["activations", "params"])
def test_bf16_input_with_float32_bank_matches_float64_reference(mixing, compute_dtype):
    """A bf16 base layer and bf16 activations under a float32 bank (stage 2's CPU setting): the output and
    the float32 parameter gradients against the per-sample delta W math in float64, within ``BF16_RTOL``;
    ``params`` adds exactly ``(Delta_fp32 * s).to(bf16)`` to the base output."""
    d_in, d_out = 24, 20
    layer = _plora_layer(mixing, num_experts=4, rank=3, d_in=d_in, d_out=d_out)
    layer.compute_dtype = compute_dtype
    layer.base_layer.to(torch.bfloat16)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 5, d_in, generator=g).to(torch.bfloat16)
    alpha = torch.softmax(torch.randn(3, 4, generator=g), dim=-1)
    out = layer(x, alpha=alpha)
    assert out.dtype == torch.bfloat16
    # reference in float64 on the same (bf16) base weights and inputs
    A, B = layer.plora_A.double().detach().requires_grad_(), layer.plora_B.double().detach().requires_grad_()
    a64 = alpha.double()
    if mixing == "products":
        delta_w = torch.einsum("bn,nri,nor->bio", a64, A, B)
    else:
        delta_w = torch.einsum("bn,nri->bri", a64, A).transpose(1, 2) @ torch.einsum("bn,nor->bro", a64, B)
    base = nn.functional.linear(x.double(), layer.base_layer.weight.double(), layer.base_layer.bias.double())
    want = base + torch.einsum("bti,bio->bto", x.double(), delta_w) * layer.scale
    assert _max_relative_error(out, want) < BF16_RTOL
    if compute_dtype == "params":
        delta = layer._mix_products if mixing == "products" else layer._mix_factors
        exact = layer.base_layer(x) + (
            delta(x.float(), alpha, layer.plora_A, layer.plora_B).reshape(out.shape) * layer.scale
        ).to(torch.bfloat16)
        assert torch.equal(out, exact)
    weights = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (out.double() * weights).sum().backward()
    (want * weights).sum().backward()
    for param, reference in ((layer.plora_A, A), (layer.plora_B, B)):
        assert param.grad.dtype == torch.float32  # float32 master weights get float32 gradients
        assert _max_relative_error(param.grad, reference.grad) < BF16_RTOL


@pytest.mark.parametrize("mixing", ["products", "factors"])
def test_mixing_matches_per_sample_delta_w_without_building_it(mixing):
    d_in, d_out, scale = 7, 11, 16.0 / 2
    layer = _plora_layer(mixing, d_in=d_in, d_out=d_out)
    x = torch.randn(2, 3, d_in)
    alpha = torch.softmax(torch.randn(2, 3), dim=-1)
    # Reference: build every sample's delta W [d_in, d_out] explicitly.
    A, B = layer.plora_A, layer.plora_B  # [N, r, d_in], [N, d_out, r]
    if mixing == "products":
        delta_w = torch.einsum("bn,nri,nor->bio", alpha, A, B)
    else:
        delta_w = torch.einsum("bn,nri->bri", alpha, A).transpose(1, 2) @ torch.einsum(
            "bn,nor->bro", alpha, B
        )
    expected = layer.base_layer(x) + torch.einsum("bti,bio->bto", x, delta_w) * scale
    with _RecordOutputShapes() as recorder:
        out = layer(x, alpha=alpha)
    torch.testing.assert_close(out, expected)
    assert recorder.shapes, "the recorder saw no torch calls"
    assert not [s for s in recorder.shapes if d_in in s and d_out in s], recorder.shapes


def test_layer_rejects_missing_or_misshaped_gate_weights():
    layer = _plora_layer()
    with pytest.raises(RuntimeError, match="route_gate_inputs"):
        layer(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="num_experts=3"):
        layer(torch.randn(2, 5, 7), alpha=torch.full((2, 4), 0.25))


def test_lora_dropout_touches_only_the_adapter_path():
    torch.manual_seed(0)
    layer = PLoRALinear(nn.Linear(7, 11), PLoRAConfig(num_experts=2, rank=2, crm_dim=CRM_DIM, dropout=0.5))
    layer.train()
    x = torch.randn(2, 5, 7)
    # B = 0: the adapter adds nothing, so dropout on the adapter input must leave the output exactly base.
    assert torch.equal(layer(x, alpha=_one_hot(2, 2, 0)), layer.base_layer(x))


# --- the gate --------------------------------------------------------------------------------------------


def test_gate_rows_are_distributions_and_crm_state_is_detached():
    torch.manual_seed(0)
    gate = PLoRAGate(CRM_DIM, 5, hidden_dim=6, dropout=0.0)
    crm_state = torch.randn(4, CRM_DIM, requires_grad=True)
    alpha = gate(crm_state)
    assert alpha.shape == (4, 5) and torch.all(alpha >= 0)
    torch.testing.assert_close(alpha.sum(dim=-1), torch.ones(4))
    (alpha * torch.randn(4, 5)).sum().backward()
    assert crm_state.grad is None
    assert gate.proj_in.weight.grad is not None


def test_gate_init_zero_bias():
    gate = PLoRAGate(CRM_DIM, 5)
    assert torch.count_nonzero(gate.proj_in.bias) == 0 and torch.count_nonzero(gate.proj_out.bias) == 0


def test_higher_temperature_gives_higher_entropy():
    torch.manual_seed(0)
    sharp = PLoRAGate(CRM_DIM, 6, temperature=1.0).eval()
    smooth = PLoRAGate(CRM_DIM, 6, temperature=5.0).eval()
    smooth.load_state_dict(sharp.state_dict())
    crm_state = torch.randn(8, CRM_DIM)

    def entropy(p: torch.Tensor) -> torch.Tensor:
        return -(p * p.log()).sum(dim=-1)

    assert torch.all(entropy(smooth(crm_state)) > entropy(sharp(crm_state)))


def test_gate_rejects_non_positive_temperature():
    with pytest.raises(ValueError, match="temperature"):
        PLoRAGate(CRM_DIM, 4, temperature=0.0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_experts", 0),
        ("rank", -1),
        ("alpha", 0.0),
        ("dropout", 1.0),
        ("gate_hidden", 0),
        ("gate_dropout", -0.1),
        ("temperature", 0.0),
        ("mixing", "sum"),
        ("target_modules", "q_proj"),
        ("target_modules", ()),
        ("crm_dim", 0),
        ("compute_dtype", "bfloat16"),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"PLoRAConfig.{field}"):
        PLoRAConfig(**{field: value})


def test_config_defaults_are_the_papers():
    config = PLoRAConfig(target_modules=["q_proj", "v_proj"])
    assert config.target_modules == ("q_proj", "v_proj")
    assert (config.num_experts, config.rank, config.scale, config.gate_hidden) == (16, 8, 2.0, 60)
    assert config.mixing == "products" and not config.shared_gate and config.crm_dim == 256
    assert config.compute_dtype == "activations"  # not the paper's: a precision choice, same math in float32


# --- injection on a tiny Llama ---------------------------------------------------------------------------


def test_injection_reports_q_and_v_of_every_layer_and_freezes_the_rest():
    model = _tiny_llama()
    names = inject_plora(model, PLoRAConfig(crm_dim=CRM_DIM))
    assert names == [
        f"model.layers.{i}.self_attn.{proj}" for i in range(NUM_LAYERS) for proj in ("q_proj", "v_proj")
    ]
    for name in names:
        assert isinstance(model.get_submodule(name), PLoRALinear)
    assert not any(module.training for module in model.modules()), "injection must keep eval mode"
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(plora_parameters(model))
    assert all(".plora_" in name for name in trainable)
    assert set(plora_state_dict(model)) == trainable
    with pytest.raises(ValueError, match="already has PLoRA layers"):
        inject_plora(model, PLoRAConfig(crm_dim=CRM_DIM))


def test_injection_raises_listing_names_when_nothing_matches():
    model = _tiny_llama()
    with pytest.raises(ValueError, match=r"query_key_value.*q_proj"):
        inject_plora(model, PLoRAConfig(crm_dim=CRM_DIM, target_modules=("query_key_value",)))


def test_trainable_parameter_count_matches_the_paper_for_vicuna_7b():
    """Paper §3.2 / facts: about 68.2M trainable parameters for Vicuna-7B, q+v, r=8, N_m=16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        vocab_size=32000,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
        inject_plora(model, PLoRAConfig())
    total = sum(p.numel() for p in plora_parameters(model).values())
    assert round(total / 1e6, 1) == 68.2


def test_zero_initialised_b_leaves_llama_logits_unchanged():
    base = _tiny_llama()
    input_ids = _input_ids()
    with torch.no_grad():
        expected = base(input_ids=input_ids).logits
    inject_plora(base, PLoRAConfig(crm_dim=CRM_DIM, num_experts=4))
    assert torch.equal(_llama_logits(base, _crm_state(), input_ids), expected)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_single_expert_equals_peft_lora():
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    base = _tiny_llama()
    input_ids = _input_ids()
    with torch.no_grad():
        base_logits = base(input_ids=input_ids).logits
    peft_model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
    ).eval()
    generator = torch.Generator().manual_seed(4)
    plora_model = base
    inject_plora(plora_model, PLoRAConfig(num_experts=1, crm_dim=CRM_DIM))
    with torch.no_grad():
        for name, layer in plora_model.named_modules():
            if isinstance(layer, PLoRALinear):
                lora = peft_model.base_model.model.get_submodule(name)
                assert isinstance(lora, LoraLayer)
                lora_A, lora_B = lora.lora_A["default"].weight, lora.lora_B["default"].weight
                lora_B.copy_(0.3 * torch.randn(lora_B.shape, generator=generator))
                layer.plora_A[0].copy_(lora_A)
                layer.plora_B[0].copy_(lora_B)
    with torch.no_grad():
        expected = peft_model(input_ids=input_ids).logits
    assert not torch.allclose(expected, base_logits, atol=1e-3), "the LoRA should change the logits"
    torch.testing.assert_close(_llama_logits(plora_model, _crm_state(), input_ids), expected)


@pytest.mark.parametrize("mixing", ["products", "factors"])
def test_one_sample_gate_input_never_changes_another_sample(mixing):
    model = _tiny_llama()
    inject_plora(model, PLoRAConfig(crm_dim=CRM_DIM, num_experts=4, mixing=mixing))
    _randomise_banks(model)
    input_ids, crm_state = _input_ids(), _crm_state()
    logits = _llama_logits(model, crm_state, input_ids)
    perturbed = crm_state.clone()
    perturbed[1] += 5 * torch.randn(CRM_DIM)
    logits_perturbed = _llama_logits(model, perturbed, input_ids)
    torch.testing.assert_close(logits_perturbed[0], logits[0], rtol=0, atol=0)
    assert not torch.allclose(logits_perturbed[1], logits[1])


@pytest.mark.parametrize("shared_gate", [False, True])
def test_only_adapter_and_gate_parameters_get_gradients(shared_gate):
    model = _tiny_llama()
    inject_plora(model, PLoRAConfig(crm_dim=CRM_DIM, num_experts=4, shared_gate=shared_gate))
    _randomise_banks(model)
    model.train()
    input_ids = _input_ids()
    with route_gate_inputs(model, _crm_state()):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
    adapter = plora_parameters(model)
    gate_names = [name for name in adapter if "plora_gate" in name]
    if shared_gate:
        assert gate_names and all(name.startswith(f"{SHARED_GATE_NAME}.") for name in gate_names)
    else:
        assert len({name.split(".plora_gate")[0] for name in gate_names}) == 2 * NUM_LAYERS
    for name, param in model.named_parameters():
        if name in adapter:
            assert param.requires_grad and param.grad is not None, name
            assert torch.count_nonzero(param.grad) > 0, name
        else:
            assert not param.requires_grad and param.grad is None, name


# --- routing ---------------------------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(width, width)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.q_proj(x))


class _Stack(nn.Module):
    """Tiny model whose blocks may run under torch.utils.checkpoint (non-reentrant)."""

    def __init__(self, width: int = 6, depth: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block(width) for _ in range(depth))
        self.checkpointed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointed else block(x)
        return x


def _stack_with_plora() -> _Stack:
    torch.manual_seed(0)
    model = _Stack()
    # Dropout on both the gate and the adapter: checkpoint recomputation must reproduce both.
    inject_plora(
        model, PLoRAConfig(num_experts=3, rank=2, crm_dim=CRM_DIM, dropout=0.2, target_modules=("q_proj",))
    )
    _randomise_banks(model)
    return model.train()


def _count_calls(layer: nn.Module) -> list[int]:
    calls = [0]
    layer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_calling_outside_the_routing_context_raises():
    model = _stack_with_plora()
    x = torch.randn(2, 4, 6)
    with route_gate_inputs(model, _crm_state()):
        model(x)
    with pytest.raises(RuntimeError, match="route_gate_inputs"):
        model(x)


def test_checkpointed_gradients_equal_plain_gradients():
    plain, checkpointed = _stack_with_plora(), _stack_with_plora()
    checkpointed.checkpointed = True
    calls = _count_calls(checkpointed.blocks[0].q_proj)
    x, crm_state = torch.randn(2, 4, 6), _crm_state()
    for model in (plain, checkpointed):
        torch.manual_seed(5)
        with route_gate_inputs(model, crm_state):
            model(x).square().sum().backward()
    assert calls[0] == 2, "the checkpointed block was not recomputed in backward"
    plain_grads, checkpointed_grads = plora_parameters(plain), plora_parameters(checkpointed)
    assert plain_grads.keys() == checkpointed_grads.keys()
    for name, param in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name].grad, param.grad, msg=name)


def test_each_forward_gets_fresh_gate_weights_within_one_context():
    """Gradient accumulation: two forward/backward passes in one block (gates run again each forward)."""
    model = _stack_with_plora()
    model.checkpointed = True
    crm_state = _crm_state()
    with route_gate_inputs(model, crm_state):
        for _ in range(2):
            model(torch.randn(2, 4, 6)).sum().backward()
    gate = model.blocks[0].q_proj.plora_gate
    assert gate.proj_in.weight.grad is not None


def test_checkpointed_backward_after_the_context_raises():
    model = _stack_with_plora()
    model.checkpointed = True
    with route_gate_inputs(model, _crm_state()):
        loss = model(torch.randn(2, 4, 6)).sum()
    with pytest.raises(RuntimeError, match="backward"):
        loss.backward()


def _enable_activation_checkpointing(model: nn.Module) -> None:
    """transformers >= 5.x names it ``activation_checkpointing_enable``; older ones ``gradient_...``."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def test_llama_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for use_checkpointing in (False, True):
        model = _tiny_llama()
        inject_plora(model, PLoRAConfig(crm_dim=CRM_DIM, num_experts=4))
        _randomise_banks(model)
        if use_checkpointing:
            _enable_activation_checkpointing(model)
        model.train()
        calls = _count_calls(model.model.layers[0].self_attn.q_proj)
        input_ids = _input_ids()
        torch.manual_seed(5)
        with route_gate_inputs(model, _crm_state()):
            model(input_ids=input_ids, labels=input_ids).loss.backward()
        assert calls[0] == (2 if use_checkpointing else 1)
        grads.append({name: p.grad for name, p in plora_parameters(model).items()})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_routing_hooks_are_removed_on_exit_even_on_error():
    model = _stack_with_plora()
    layer = model.blocks[0].q_proj
    with pytest.raises(KeyError), route_gate_inputs(model, _crm_state()):
        raise KeyError("boom")
    assert not model._forward_pre_hooks and not layer._forward_pre_hooks
