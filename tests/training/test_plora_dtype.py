"""Stage 2's dtype of the frozen LLM (``dtype`` setting x DeepSpeed precision x device), and the clear errors
raised before any model is loaded for a dtype or an 8-bit request the machine cannot honour."""

from __future__ import annotations

import sys

import pytest
import torch

from reclora_ds.training import plora_recipe
from reclora_ds.training.plora_config import PLoRATrainConfig
from reclora_ds.training.plora_recipe import stage2_dtype

CPU = torch.device("cpu")
FP32 = {"zero_optimization": {"stage": 2}}
BF16 = {**FP32, "bf16": {"enabled": True}}


def cfg(**kwargs) -> PLoRATrainConfig:
    return PLoRATrainConfig(deepspeed_config="ds_configs/zero2_fp32.json", **kwargs)


@pytest.fixture(params=[True, False], ids=["bf16-cpu", "fp32-only-cpu"])
def native(request, monkeypatch) -> bool:
    monkeypatch.setattr(plora_recipe, "native_bf16", lambda device_type: request.param)
    monkeypatch.setattr("reclora_ds.llm_loader.native_bf16", lambda device_type: request.param)
    return request.param


def test_auto_is_bf16_on_a_native_bf16_cpu_and_explicit_values_win(native):
    assert stage2_dtype(cfg(), FP32, CPU) == ("bfloat16" if native else "float32")
    assert stage2_dtype(cfg(dtype="float32"), FP32, CPU) == "float32"
    if native:
        assert stage2_dtype(cfg(dtype="bfloat16"), FP32, CPU) == "bfloat16"
        assert stage2_dtype(cfg(), BF16, CPU) == "bfloat16"  # the engine's cast decides
    else:
        with pytest.raises(ValueError, match="error: dtype: bfloat16 is not computed natively"):
            stage2_dtype(cfg(dtype="bfloat16"), FP32, CPU)
        with pytest.raises(ValueError, match=r"error: .*: bf16.enabled: this CPU computes no 16-bit"):
            stage2_dtype(cfg(), BF16, CPU)


def test_contradictions_are_errors_naming_the_key(native):
    with pytest.raises(ValueError, match="error: dtype: float32 but .* enables bfloat16"):
        stage2_dtype(cfg(dtype="float32"), BF16, CPU)
    with pytest.raises(ValueError, match="error: dtype: float16"):
        stage2_dtype(cfg(dtype="float16"), FP32, CPU)
    with pytest.raises(ValueError, match="dtype must be one of"):
        cfg(dtype="fp32")


def test_8bit_errors_before_loading(monkeypatch):
    monkeypatch.setattr(plora_recipe, "bitsandbytes_problem", lambda device: None)  # as if it were usable
    with pytest.raises(ValueError, match="error: load_in_8bit: .* enables bfloat16"):
        stage2_dtype(cfg(load_in_8bit=True), BF16, CPU)
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(ValueError, match="error: load_in_8bit: bitsandbytes is not installed"):
        stage2_dtype(cfg(load_in_8bit=True), FP32, CPU)
