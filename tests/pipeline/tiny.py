"""A tiny pipeline config over real data (ML-1M sample of 100 users) and the tiny stage-2 backbone."""

from __future__ import annotations

from pathlib import Path

import yaml


def tiny_config(tmp_path: Path, ml1m_dir: Path, backbone: str, name: str, **plora) -> Path:
    config = {
        "pipeline": {"name": name, "runs_dir": str(tmp_path / "runs"), "nproc": 2, "threads_per_rank": 1,
                     "modes": ["lora", "plora"], "pca_components": 8},
        "prepare": {"dataset": "ml-1m", "raw_dir": str(ml1m_dir), "few_shot_size": 200, "shards_per_split": 4},
        "sim": {"model": "sim", "crm": {"embedding_dim": 8, "attention_hidden": 16, "tower": [16, 16]},
                "history_length": 20, "epochs": 1, "batch_size": 256, "checkpoint_every": 0, "log_every": 2,
                "progress": False},
        "embeddings": {"batch_size": 64, "max_length": 64, "show_progress": False},
        "plora": {"backbone": backbone, "adapter": {"num_experts": 2, "rank": 4, "alpha": 8},
                  "lora_rank": 4, "max_steps": 6, "batch_size": 4, "micro_batch_size": 2, "eval_batch_size": 8,
                  "eval_max_samples": 48, "eval_splits": ["test"], "lr": 1e-2, "max_length": 512,
                  "deepspeed_config": "ds_configs/zero2_fp32.json", "checkpoint_every": 2, "log_every": 1,
                  "short_history_length": 3, "progress": False, **plora},
    }  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
