"""PLoRA adapter files and the per-sample peft LoRA export, checked against independent references.

References: the PLoRA model's own logits (round trip), peft's own ``save_pretrained`` key names, and
``peft.PeftModel.from_pretrained`` on a fresh copy of the backbone computing a personalized PLoRA's logits.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from reclora_ds.models.inject import SHARED_GATE_NAME, inject_plora, route_gate_inputs
from reclora_ds.models.plora import PLoRAConfig, PLoRAGate
from reclora_ds.training.adapter_io import (
    ADAPTER_WEIGHTS_NAME,
    PLORA_CONFIG_NAME,
    AdapterConfigMismatchError,
    AdapterKeyError,
    EffectiveLoRA,
    canonical_name,
    load_plora_adapter,
    module_gate_weights,
    personalized_lora,
    read_plora_adapter_config,
    save_peft_adapter,
    save_plora_adapter,
)
from reclora_ds.training.crm_states import save_crm_states
from tests.tiny_llm import tiny_llama

CRM_DIM = 8
VOCAB = 100
NUM_LAYERS = 2
NUM_EXPERTS = 4
RANK = 2


def _tiny_llama() -> nn.Module:
    return tiny_llama(
        vocab_size=VOCAB, layers=NUM_LAYERS, kv_heads=4, max_positions=64, tie_word_embeddings=False
    )


def _config(**overrides) -> PLoRAConfig:
    fields = {"num_experts": NUM_EXPERTS, "rank": RANK, "crm_dim": CRM_DIM, "temperature": 2.0, **overrides}
    return PLoRAConfig(**fields)


def _randomise(model: nn.Module, seed: int) -> None:
    """Non-zero banks and gates with non-trivial LayerNorm and biases, so every tensor matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "plora_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator) + ("norm.weight" in name))


def _plora_llama(seed: int = 3, **overrides) -> tuple[nn.Module, PLoRAConfig]:
    model = _tiny_llama()
    config = _config(**overrides)
    inject_plora(model, config)
    _randomise(model, seed)
    return model, config


def _input_ids(batch: int = 2, tokens: int = 6) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(1))


def _crm_state(batch: int = 2, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, CRM_DIM, generator=torch.Generator().manual_seed(seed))


def _plora_logits(model: nn.Module, crm_state: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), route_gate_inputs(model, crm_state):
        return model(input_ids=input_ids).logits


class _Holder(nn.Module):
    """A wrapper that registers the wrapped model under a given attribute name (as DeepSpeed / peft do)."""

    def __init__(self, attribute: str, inner: nn.Module) -> None:
        super().__init__()
        self.add_module(attribute, inner)


def _wrapped(model: nn.Module) -> nn.Module:
    """State-dict names ``module.base_model.model.<backbone name>``: DeepSpeed around peft around the LLM."""
    return _Holder("module", _Holder("base_model", _Holder("model", model)))


def _rewrite_weights(adapter_dir: Path, edit) -> None:
    path = adapter_dir / ADAPTER_WEIGHTS_NAME
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


@pytest.fixture
def saved_adapter(tmp_path) -> tuple[nn.Module, PLoRAConfig, Path]:
    model, config = _plora_llama()
    return model, config, save_plora_adapter(model, config, tmp_path / "adapter")


# --- PLoRA adapter: round trip, names, strict checks ------------------------------------------------------


@pytest.mark.parametrize("mixing", ["products", "factors"])
@pytest.mark.parametrize("shared_gate", [False, True])
def test_round_trip_reproduces_logits_exactly(tmp_path, mixing, shared_gate):
    model, config = _plora_llama(mixing=mixing, shared_gate=shared_gate)
    extra = {"base_model_name_or_path": "tiny-llama", "base_model_sha256": "ab" * 32, "step": 7}
    save_plora_adapter(model, config, tmp_path, extra)
    fresh, _ = _plora_llama(seed=99, mixing=mixing, shared_gate=shared_gate)  # other banks and gates
    crm, ids = _crm_state(), _input_ids()
    assert not torch.allclose(_plora_logits(fresh, crm, ids), _plora_logits(model, crm, ids))

    manifest = load_plora_adapter(fresh, tmp_path, config=config)

    assert torch.equal(_plora_logits(fresh, crm, ids), _plora_logits(model, crm, ids))
    assert manifest.config == config
    assert manifest.base_model_name_or_path == "tiny-llama" and manifest.base_model_sha256 == "ab" * 32
    assert manifest.extra["step"] == 7
    assert manifest.replaced_modules == [
        f"model.layers.{i}.self_attn.{p}" for i in range(NUM_LAYERS) for p in ("q_proj", "v_proj")
    ]


def test_saved_keys_are_backbone_names_without_wrapper_prefixes(tmp_path):
    model, config = _plora_llama(shared_gate=True)
    wrapped = _wrapped(model)
    some_key = next(k for k in wrapped.state_dict() if "plora_A" in k)
    assert some_key.startswith("module.base_model.model.model.layers.")  # the wrapper really prefixes

    save_plora_adapter(wrapped, config, tmp_path / "wrapped")
    save_plora_adapter(model, config, tmp_path / "bare")

    with safe_open(str(tmp_path / "wrapped" / ADAPTER_WEIGHTS_NAME), "pt") as f:
        keys = set(f.keys())
    expected = {name for name, _ in model.named_parameters() if "plora_" in name}
    assert keys == expected
    assert "model.layers.0.self_attn.q_proj.plora_A" in keys
    assert f"{SHARED_GATE_NAME}.proj_in.weight" in keys
    assert not any(k.startswith(("module.", "base_model.")) for k in keys)
    assert (tmp_path / "wrapped" / ADAPTER_WEIGHTS_NAME).read_bytes() == (
        tmp_path / "bare" / ADAPTER_WEIGHTS_NAME
    ).read_bytes()
    config_json = json.loads((tmp_path / "wrapped" / PLORA_CONFIG_NAME).read_text())
    assert config_json["replaced_modules"][0] == "model.layers.0.self_attn.q_proj"

    # A wrapped fresh model loads it too (the names are matched after stripping on both sides).
    fresh, _ = _plora_llama(seed=5, shared_gate=True)
    load_plora_adapter(_wrapped(fresh), tmp_path / "wrapped")
    crm, ids = _crm_state(), _input_ids()
    assert torch.equal(_plora_logits(fresh, crm, ids), _plora_logits(model, crm, ids))


def test_canonical_name_strips_wrappers_only_at_the_front_and_checkpoint_components():
    assert (
        canonical_name("module._orig_mod.base_model.model.model.layers.0.q_proj") == "model.layers.0.q_proj"
    )
    assert canonical_name("model.layers.0._checkpoint_wrapped_module.self_attn") == "model.layers.0.self_attn"
    assert canonical_name("model.layers.0.module.proj") == "model.layers.0.module.proj"


def test_missing_key_is_named(saved_adapter):
    _, config, adapter_dir = saved_adapter
    key = "model.layers.1.self_attn.v_proj.plora_gate.proj_out.bias"
    _rewrite_weights(adapter_dir, lambda t: t.pop(key))
    fresh, _ = _plora_llama(seed=5)
    with pytest.raises(AdapterKeyError, match=r"missing keys \(1\)") as info:
        load_plora_adapter(fresh, adapter_dir)
    assert key in str(info.value)


def test_unexpected_key_is_named(saved_adapter):
    _, _, adapter_dir = saved_adapter
    _rewrite_weights(adapter_dir, lambda t: t.update({"model.layers.0.mlp.plora_extra": torch.zeros(3)}))
    fresh, _ = _plora_llama(seed=5)
    with pytest.raises(AdapterKeyError, match=r"unexpected keys \(1\).*model\.layers\.0\.mlp\.plora_extra"):
        load_plora_adapter(fresh, adapter_dir)


def test_shape_mismatch_is_named_with_both_shapes(saved_adapter):
    _, _, adapter_dir = saved_adapter
    key = "model.layers.0.self_attn.q_proj.plora_B"
    _rewrite_weights(adapter_dir, lambda t: t.update({key: torch.zeros(NUM_EXPERTS, 31, RANK)}))
    fresh, _ = _plora_llama(seed=5)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(AdapterKeyError, match=r"shape mismatches \(1\)") as info:
        load_plora_adapter(fresh, adapter_dir)
    assert f"{key}: adapter (4, 31, 2), model (4, 32, 2)" in str(info.value)
    # Nothing was loaded.
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


@pytest.mark.parametrize(
    ("field", "overrides"),
    [
        ("num_experts", {"num_experts": 2}),
        ("rank", {"rank": 4}),
        ("mixing", {"mixing": "factors"}),
        ("alpha", {"alpha": 8.0}),
        ("temperature", {"temperature": 5.0}),
        ("crm_dim", {"crm_dim": 6}),
        ("shared_gate", {"shared_gate": True}),
        ("target_modules", {"target_modules": ("q_proj",)}),
    ],
)
def test_config_mismatch_names_the_field(saved_adapter, field, overrides):
    _, _, adapter_dir = saved_adapter
    other, _ = _plora_llama(seed=5, **overrides)
    with pytest.raises(AdapterConfigMismatchError, match=rf"\n  {field}: "):
        load_plora_adapter(other, adapter_dir)


def test_given_config_is_compared_field_by_field(saved_adapter):
    _, config, adapter_dir = saved_adapter
    fresh, _ = _plora_llama(seed=5)
    with pytest.raises(
        AdapterConfigMismatchError, match=r"gate_dropout: the adapter has 0\.1, the given config 0\.2"
    ):
        load_plora_adapter(fresh, adapter_dir, config=_config(gate_dropout=0.2))
    load_plora_adapter(fresh, adapter_dir, config=config)


def test_compute_dtype_is_a_runtime_choice_neither_saved_nor_compared(saved_adapter):
    model, config, adapter_dir = saved_adapter
    assert "compute_dtype" not in json.loads((adapter_dir / PLORA_CONFIG_NAME).read_text())["plora_config"]
    other = dataclasses.replace(config, compute_dtype="params")
    fresh, _ = _plora_llama(seed=5, compute_dtype="params")
    load_plora_adapter(fresh, adapter_dir, config=other)  # trained one way, loaded for the other: no mismatch
    crm, ids = _crm_state(), _input_ids()
    assert torch.equal(_plora_logits(fresh, crm, ids), _plora_logits(model, crm, ids))  # same math in float32


def test_save_refuses_a_config_that_does_not_describe_the_model(tmp_path):
    model, _ = _plora_llama()
    with pytest.raises(AdapterConfigMismatchError, match="num_experts"):
        save_plora_adapter(model, _config(num_experts=8), tmp_path)
    assert not (tmp_path / PLORA_CONFIG_NAME).exists()


def test_unknown_config_field_and_format_version_are_rejected(saved_adapter):
    _, _, adapter_dir = saved_adapter
    path = adapter_dir / PLORA_CONFIG_NAME
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "plora_config": {**data["plora_config"], "top_k": 2}}))
    with pytest.raises(AdapterConfigMismatchError, match=r"unknown fields \['top_k'\]"):
        read_plora_adapter_config(adapter_dir)
    path.write_text(json.dumps({**data, "format_version": 2}))
    with pytest.raises(AdapterConfigMismatchError, match="version 2"):
        read_plora_adapter_config(adapter_dir)


# --- personalized LoRA -----------------------------------------------------------------------------------


def _peft_logits(base: nn.Module, adapter_dir: Path, input_ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return peft_model(input_ids=input_ids).logits


@pytest.mark.parametrize(("mixing", "expected_rank"), [("products", NUM_EXPERTS * RANK), ("factors", RANK)])
def test_personalized_lora_loaded_by_peft_equals_plora_for_that_sample(tmp_path, mixing, expected_rank):
    base = _tiny_llama()
    fresh_base = copy.deepcopy(base)
    model, config = _tiny_llama(), _config(mixing=mixing)
    inject_plora(model, config)
    _randomise(model, seed=3)
    crm, ids = _crm_state(), _input_ids()
    plora_logits = _plora_logits(model, crm, ids)  # [2, T, V], each row with its own gate weights

    sample = 1
    lora = personalized_lora(model, crm[sample])
    save_peft_adapter(lora, tmp_path / "user", "tiny-llama", config.target_modules)

    adapter_config = json.loads((tmp_path / "user" / "adapter_config.json").read_text())
    assert adapter_config["r"] == expected_rank
    assert adapter_config["lora_alpha"] / adapter_config["r"] == config.scale
    assert adapter_config["peft_type"] == "LORA" and adapter_config["task_type"] == "CAUSAL_LM"
    assert adapter_config["lora_dropout"] == 0.0 and adapter_config["bias"] == "none"
    assert sorted(adapter_config["target_modules"]) == ["q_proj", "v_proj"]
    assert adapter_config["base_model_name_or_path"] == "tiny-llama"

    peft_logits = _peft_logits(fresh_base, tmp_path / "user", ids[sample : sample + 1])
    torch.testing.assert_close(peft_logits[0], plora_logits[sample], atol=1e-5, rtol=0)
    # Not vacuous: the adapter changes the output, and the other sample's PLoRA differs.
    with torch.no_grad():
        base_logits = base(input_ids=ids[sample : sample + 1]).logits[0]
    assert (peft_logits[0] - base_logits).abs().max() > 1e-2
    other = personalized_lora(model, crm[0])
    assert not torch.allclose(
        other["model.layers.0.self_attn.q_proj"].B, lora["model.layers.0.self_attn.q_proj"].B
    )


def test_peft_key_names_and_shapes_are_those_peft_itself_saves(tmp_path):
    """Reference: the file peft writes for a plain LoRA of the same rank on the same targets."""
    from peft import LoraConfig, get_peft_model

    model, config = _plora_llama(mixing="products")
    save_peft_adapter(
        personalized_lora(model, _crm_state()[0]), tmp_path / "ours", None, config.target_modules
    )
    rank = NUM_EXPERTS * RANK
    reference = get_peft_model(
        _tiny_llama(), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"])
    )
    reference.save_pretrained(str(tmp_path / "peft"))

    def shapes(folder: Path) -> dict[str, tuple[int, ...]]:
        with safe_open(str(folder / ADAPTER_WEIGHTS_NAME), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118

    assert shapes(tmp_path / "ours") == shapes(tmp_path / "peft")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in shapes(tmp_path / "ours")


def test_products_export_is_exactly_the_sum_of_expert_products():
    model, _ = _plora_llama(mixing="products")
    crm = _crm_state()[0]
    name = "model.layers.1.self_attn.v_proj"
    layer = model.get_submodule(name)
    alpha = module_gate_weights(model, crm)[name]
    lora = personalized_lora(model, crm)[name]
    expected = torch.einsum("n,nor,nri->oi", alpha, layer.plora_B, layer.plora_A)
    torch.testing.assert_close(lora.B @ lora.A, expected)
    assert lora.scaling == layer.scale and isinstance(lora, EffectiveLoRA)


def test_gate_weights_ignore_gate_dropout_and_keep_the_mode():
    model, _ = _plora_llama(gate_dropout=0.5)
    model.train()
    crm = _crm_state()[0]
    first, second = personalized_lora(model, crm), personalized_lora(model, crm)
    name = "model.layers.0.self_attn.q_proj"
    assert torch.equal(first[name].B, second[name].B)
    assert all(m.training for m in model.modules() if isinstance(m, PLoRAGate))
    model.eval()
    assert torch.equal(personalized_lora(model, crm)[name].B, first[name].B)


def test_personalized_lora_wants_one_sample():
    model, _ = _plora_llama()
    with pytest.raises(ValueError, match="one sample"):
        personalized_lora(model, _crm_state(batch=2))
    assert (
        personalized_lora(model, _crm_state(batch=1)).keys()
        == personalized_lora(model, _crm_state()[0]).keys()
    )


def test_modules_with_other_ranks_get_rank_and_alpha_patterns(tmp_path):
    """peft builds each module with its own rank and scaling from rank_pattern / alpha_pattern."""
    from peft import PeftModel

    generator = torch.Generator().manual_seed(0)
    lora = {}
    for i in range(NUM_LAYERS):
        for proj in ("q_proj", "v_proj"):
            r, scaling = (3, 0.5) if (i, proj) == (1, "q_proj") else (2, 2.0)
            lora[f"model.layers.{i}.self_attn.{proj}"] = (
                torch.randn(r, 32, generator=generator),
                torch.randn(32, r, generator=generator),
                scaling,
            )
    save_peft_adapter(lora, tmp_path)
    peft_model = PeftModel.from_pretrained(_tiny_llama(), str(tmp_path))
    for name, (a, b, scaling) in lora.items():
        module = peft_model.base_model.model.get_submodule(name)
        assert module.r["default"] == a.shape[0] and module.scaling["default"] == scaling
        assert torch.equal(module.lora_A["default"].weight, a) and torch.equal(
            module.lora_B["default"].weight, b
        )


def test_save_peft_adapter_checks_shapes_and_targets(tmp_path):
    a, b = torch.zeros(2, 32), torch.zeros(32, 2)
    with pytest.raises(ValueError, match="need A"):
        save_peft_adapter({"model.layers.0.self_attn.q_proj": (a, b.T, 2.0)}, tmp_path)
    with pytest.raises(ValueError, match="match none of target_modules"):
        save_peft_adapter(
            {"model.layers.0.self_attn.q_proj": (a, b, 2.0)}, tmp_path, target_modules=["v_proj"]
        )


# --- reclora_ds.commands.export_user_lora (tools/export_user_lora.py) ---------------------------------------


def _write_processed_samples(data_dir: Path, rows: dict[str, list]) -> None:
    """The part of a processed dataset that --user-index reads: metadata.json and one shard per split."""
    (data_dir / "samples").mkdir(parents=True)
    shards = {}
    for split in ("train", "valid", "test"):
        name = f"{split}-00000-of-00001.parquet"
        keep = [i for i, s in enumerate(rows["split"]) if s == split]
        table = pa.table(
            {
                "sample_id": pa.array([rows["sample_id"][i] for i in keep], pa.int64()),
                "user_index": pa.array([rows["user_index"][i] for i in keep], pa.int32()),
                "timestamp": pa.array([rows["timestamp"][i] for i in keep], pa.int64()),
            }
        )
        pq.write_table(table, data_dir / "samples" / name)
        shards[split] = [name]
    (data_dir / "metadata.json").write_text(json.dumps({"schema_version": 1, "shards": shards}))


def _export_tool_main():
    """``main`` of the export_user_lora command (``tools/export_user_lora.py`` wraps it)."""
    from reclora_ds.commands.export_user_lora import main

    return main


@pytest.fixture
def run_dir(tmp_path) -> tuple[Path, nn.Module, dict[int, torch.Tensor]]:
    """A run folder: saved backbone, trained-looking PLoRA adapter, CRM states, processed samples."""
    run = tmp_path / "run"
    _tiny_llama().save_pretrained(str(run / "backbone"))
    model, config = _plora_llama(mixing="products")
    save_plora_adapter(model, config, run / "adapter", {"base_model_name_or_path": str(run / "backbone")})
    states = {int(i): s for i, s in zip([10, 11, 12, 13], _crm_state(batch=4, seed=7))}
    save_crm_states(
        run / "crm_states" / "test.safetensors",
        np.array(list(states)),
        torch.stack(list(states.values())).numpy(),
    )
    # User 5 has samples 10 (t=300, test) and 12 (t=200, valid); 14 (t=900) has no CRM state.
    _write_processed_samples(
        run / "data",
        {
            "sample_id": [10, 11, 12, 13, 14],
            "user_index": [5, 6, 5, 6, 5],
            "timestamp": [300, 100, 200, 400, 900],
            "split": ["test", "train", "valid", "test", "test"],
        },
    )
    return run, model, states


def test_export_tool_writes_a_folder_peft_loads(run_dir, tmp_path):
    main = _export_tool_main()
    run, model, states = run_dir
    out = tmp_path / "export_11"
    assert main(["--run-dir", str(run), "--sample-id", "11", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {
        "adapter_config.json",
        ADAPTER_WEIGHTS_NAME,
        "personalization.json",
    }
    assert json.loads((out / "adapter_config.json").read_text())["r"] == NUM_EXPERTS * RANK

    from transformers import AutoModelForCausalLM

    ids = _input_ids(batch=1)
    backbone = AutoModelForCausalLM.from_pretrained(str(run / "backbone"), dtype=torch.float32).eval()
    expected = _plora_logits(model, states[11][None, :], ids)
    torch.testing.assert_close(_peft_logits(backbone, out, ids), expected, atol=1e-5, rtol=0)


def test_export_tool_user_index_takes_the_latest_sample_with_a_state(run_dir, tmp_path):
    main = _export_tool_main()
    run, _, _ = run_dir
    out = tmp_path / "export_user5"
    assert main(["--run-dir", str(run), "--user-index", "5", "--out", str(out)]) == 0
    summary = json.loads((out / "personalization.json").read_text())
    assert summary["sample_id"] == 10 and summary["user_index"] == 5
    assert len(summary["gate_weights"]) == 2 * NUM_LAYERS


def test_export_tool_reports_unknown_samples_and_users(run_dir, tmp_path, capsys):
    main = _export_tool_main()
    run, _, _ = run_dir
    assert main(["--run-dir", str(run), "--sample-id", "99", "--out", str(tmp_path / "x")]) == 2
    assert "sample 99 occurs 0 times" in capsys.readouterr().err
    assert main(["--run-dir", str(run), "--user-index", "7", "--out", str(tmp_path / "y")]) == 2
    assert "user 7 has no sample" in capsys.readouterr().err
