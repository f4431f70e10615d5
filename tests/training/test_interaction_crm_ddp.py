"""Stage-1 training of the feature-interaction CRMs: two DDP ranks (gloo) reach identical parameters after k
DeepFM steps, equal to one process with twice the batch; and the real recipe trains, checkpoints and scores
each of DeepFM, DCNv2 and AutoInt on the bundled data.

The DDP batches, sizes, learning rate and launch environment are those of ``tests/training/test_crm_ddp.py``
(imported); only the model differs. Run as a script with ``--worker`` (and RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT set, as a launcher sets them), this file is the worker of the DDP test.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reclora_ds import distributed as D
from reclora_ds.config import load_config
from reclora_ds.models.crm import FeatureSpec
from reclora_ds.models.registry import build_crm
from reclora_ds.training.checkpoint import load_crm
from reclora_ds.training.crm_config import CRMTrainConfig
from reclora_ds.training.crm_recipe import run_crm_training
from tests.training.test_crm_ddp import CONFIG, META, ROOT, WORLD, global_batches, launch_env
from tests.training.test_crm_ddp import train as train_model

MODEL = "deepfm"


def train(batches: list[dict[str, torch.Tensor]], rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    """The shared DDP training loop (:func:`tests.training.test_crm_ddp.train`) on :data:`MODEL`."""
    return train_model(batches, rank, world, name=MODEL)


def worker(out: Path) -> None:
    info = D.init_distributed("gloo")
    torch.set_num_threads(1)
    state = train(global_batches(), info.rank, info.world_size)
    torch.save(state, out / f"rank{info.rank}.pt")
    D.barrier()
    D.destroy()


@pytest.mark.distributed
def test_deepfm_ddp_steps_equal_one_process_with_twice_the_batch(tmp_path):
    port = D.free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(tmp_path)],
            env=launch_env(rank, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(WORLD)
    ]
    outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outputs)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))

    reference = train(global_batches())  # one process, the whole batches (twice the per-rank batch)
    torch.manual_seed(0)
    initial = build_crm(MODEL, CONFIG, FeatureSpec.from_metadata(META)).state_dict()
    assert rank0.keys() == reference.keys()
    for name, want in reference.items():
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between the ranks"
        torch.testing.assert_close(rank0[name], want, rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    moved = [n for n in reference if not torch.equal(reference[n], initial[n])]
    assert len(moved) == len(reference), "every tensor was trained"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deepfm", "dcnv2", "autoint"])
def test_recipe_trains_checkpoints_and_scores(name, ml_small_prepared, tmp_path):
    """The stage-1 recipe (one process) on the bundled real data: 40 steps of 512 samples
    already score clearly above chance, and the best checkpoint rebuilds the very model."""
    out = tmp_path / name
    overrides = [
        f"data_dir={ml_small_prepared.output_dir}", f"output_dir={out}", f"model={name}",
        "crm.embedding_dim=8", "crm.tower=[16, 16]", "crm.attention_size=8", "crm.interaction_layers=1",
        "history_mode=recent", "history_length=20", "batch_size=512", "eval_batch_size=4096",
        "max_steps=40", "lr=0.003", "progress=false", "num_threads=1",
    ]  # fmt: skip
    cfg = load_config(CRMTrainConfig, ROOT / "launch" / "configs" / "sim_quickstart.yaml", overrides)
    metrics = run_crm_training(cfg)
    assert metrics["model"] == name and metrics["steps"] == 40
    assert metrics["valid"][-1]["auc"] > 0.6 and metrics["test"]["auc"] > 0.6, metrics["valid"]
    model, info = load_crm(out)
    assert info.model == name and type(model) is type(build_crm(name, info.config, info.feature_spec))
    assert model.hidden_dim == info.hidden_dim == 16


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", type=Path, required=True)
    worker(parser.parse_args().worker)
