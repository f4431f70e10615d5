"""A tiny experiment spec over the tiny pipeline config (tests/pipeline/tiny.py): 2 stage-2 variants (and
optionally a CRM row) x 2 seeds, one rank."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.pipeline.tiny import tiny_config


def tiny_spec(tmp_path: Path, ml1m_dir: Path, backbone: str, crm_row: bool = False, **extra: Any) -> Path:
    base = tiny_config(tmp_path, ml1m_dir, backbone, "base")
    variants = [
        {"name": "lora_r2", "label": "LoRA r=2", "mode": "lora", "x": 1, "overrides": {"plora.lora_rank": 2}},
        {"name": "plora_n3", "label": "PLoRA N_m=3", "mode": "plora", "x": 2,
         "overrides": {"plora.adapter.num_experts": 3}},
    ]  # fmt: skip
    if crm_row:
        variants.append({"name": "crm_sim", "label": "SIM", "mode": "crm", "x": 3})
    spec = {
        "name": "tiny",
        "description": "a tiny end-to-end experiment",
        "base": str(base),
        "overrides": {"pipeline.nproc": 1, "plora.max_steps": 4},
        "seeds": [1, 2],
        "reference": "plora_n3",
        "metrics": ["auc", "logloss", "train_s_per_sample"],
        "significance": {"bootstrap_samples": 400, "seed": 3, "alpha": 0.01},
        "plot": {"kind": "line", "x_label": "variant"},
        "variants": variants,
        **extra,
    }
    path = tmp_path / "tiny_spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
