"""Two-process checks of stage-1 training: DDP steps (gradients through gloo and through the shared-memory
all-reduce) equal a single process with twice the batch,
ranks read disjoint shards (the same ones ``split_dataset_by_node`` gives), metrics are exact over the
whole split, and only rank 0 writes files.

Run as a script with ``--worker`` (and RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set, as a launcher
sets them), this file is the worker of :func:`test_ddp_steps_equal_one_process_with_twice_the_batch`.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from reclora_ds import distributed as D
from reclora_ds.data.loader import CRMBatchLoader
from reclora_ds.data.processed import ProcessedDataset
from reclora_ds.metrics import evaluate_predictions
from reclora_ds.models.crm import CRMConfig, FeatureSpec
from reclora_ds.models.registry import build_crm
from reclora_ds.training.checkpoint import load_crm
from reclora_ds.training.crm_recipe import predict, train_step, wrap_ddp
from tests.launch import clean_env

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).parents[2]
META = {
    "category_field": "genre",
    "fields": {
        "user_id": {"source": "user", "vocab_size": 30},
        "item_id": {"source": "item", "vocab_size": 50},
        "genre": {"source": "item", "vocab_size": 8},
    },
}
CONFIG = CRMConfig(
    embedding_dim=8,
    attention_hidden=16,
    tower=(32, 16),
    top_k=6,
    dropout=0.0,
    short_term_length=0,
    behaviour_age=False,
)  # the synthetic batches carry no recent window or ages
STEPS, PER_RANK, WORLD, LENGTH = 4, 16, 2, 12
LR = 1e-2


def global_batches(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``STEPS`` fixed batches of ``WORLD * PER_RANK`` loader-like samples (right-aligned histories)."""
    g = torch.Generator().manual_seed(seed)
    n = WORLD * PER_RANK
    batches = []
    for _ in range(STEPS):
        lengths = torch.randint(0, LENGTH + 1, (n,), generator=g)
        mask = torch.arange(LENGTH)[None, :] >= (LENGTH - lengths)[:, None]
        batch = {"label": torch.randint(0, 2, (n,), generator=g).float(), "hist_mask": mask}
        for name, info in META["fields"].items():
            batch[name] = torch.randint(2, info["vocab_size"], (n,), generator=g)
            if info["source"] == "item":
                key = "hist_item" if name == "item_id" else f"hist_{name}"
                batch[key] = torch.randint(2, info["vocab_size"], (n, LENGTH), generator=g) * mask
        batch["hist_rating"] = torch.randint(1, 11, (n, LENGTH), generator=g) * mask
        batches.append(batch)
    return batches


def train(
    batches: list[dict[str, torch.Tensor]],
    rank: int = 0,
    world: int = 1,
    allreduce: str = "gloo",
    name: str = "sim",
    config: CRMConfig = CONFIG,
) -> dict[str, torch.Tensor]:
    """AdamW steps of the recipe's train_step on the registry CRM ``name``, one per batch; rank r takes its
    contiguous part of each batch (the DDP tests of every model family use this)."""
    torch.manual_seed(0)
    model = build_crm(name, config, FeatureSpec.from_metadata(META))
    ddp = wrap_ddp(model, torch.device("cpu"), allreduce)  # "shm" raises when it cannot be used
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    for batch in batches:
        size = len(batch["label"]) // world
        part = {k: v[rank * size : (rank + 1) * size] for k, v in batch.items()}
        train_step(ddp, part, optimizer)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def worker(out: Path, allreduce: str) -> None:
    info = D.init_distributed("gloo")
    torch.set_num_threads(1)
    state = train(global_batches(), info.rank, info.world_size, allreduce)
    torch.save(state, out / f"{allreduce}_rank{info.rank}.pt")
    D.barrier()
    D.destroy()


def launch_env(rank: int, port: int) -> dict[str, str]:
    env = clean_env()
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        LOCAL_WORLD_SIZE=str(WORLD),  # as torchrun sets it: every rank on this node
        OMP_NUM_THREADS="1",
    )
    return env


def test_ddp_steps_equal_one_process_with_twice_the_batch(tmp_path):
    """Through gloo's TCP all-reduce and through DeepSpeed's shared-memory one (cpu_allreduce=shm): both
    equal one process with the whole batches, and each other bit for bit (the same float sums)."""
    states = {}
    for allreduce in ("gloo", "shm"):
        port = D.free_port()
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, "--worker", str(tmp_path), allreduce],
                env=launch_env(rank, port),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for rank in range(WORLD)
        ]
        # A cold extension cache makes DeepSpeed JIT-build its shm op first (about 30 s - 2 min).
        outputs = [p.communicate(timeout=600)[0].decode() for p in procs]
        assert all(p.returncode == 0 for p in procs), "\n".join(outputs)
        # Nothing is left in /dev/shm: each rank unlinked its segment once every rank had mapped it.
        assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*"))
        states[allreduce] = [torch.load(tmp_path / f"{allreduce}_rank{r}.pt") for r in range(WORLD)]

    reference = train(global_batches())  # one process, the whole batches (twice the per-rank batch)
    torch.manual_seed(0)
    initial = build_crm("sim", CONFIG, FeatureSpec.from_metadata(META)).state_dict()
    for allreduce, (rank0, rank1) in states.items():
        for name, want in reference.items():
            assert torch.equal(rank0[name], rank1[name]), f"{allreduce}: {name} differs between the ranks"
            torch.testing.assert_close(
                rank0[name], want, rtol=0, atol=1e-6, msg=lambda m, n=name, a=allreduce: f"{a} {n}: {m}"
            )
    for name in reference:
        assert torch.equal(states["shm"][0][name], states["gloo"][0][name]), f"shm and gloo differ on {name}"
    moved = [n for n in reference if not torch.equal(reference[n], initial[n])]
    assert len(moved) == len(reference), "every tensor was trained"


def test_rank_shards_are_disjoint_and_match_split_dataset_by_node(ml_small_prepared):
    ds = ProcessedDataset(ml_small_prepared.output_dir)
    parts = []
    for rank in range(WORLD):
        loader = CRMBatchLoader(ds, "train", 1000, rank=rank, world_size=WORLD, even_batches=False)
        mine = np.concatenate([b["sample_id"].numpy() for b in loader])
        streamed = ds.stream("train", rank, WORLD).select_columns(["sample_id"])  # datasets' file split
        assert np.array_equal(np.sort(mine), np.sort([row["sample_id"] for row in streamed]))
        parts.append(mine)
    assert not set(parts[0]) & set(parts[1])
    whole = ds.read_split("train", ["sample_id"]).column("sample_id").to_numpy()
    assert np.array_equal(np.sort(np.concatenate(parts)), np.sort(whole))


def test_two_process_entry_point(ml_small_prepared, tmp_path):
    """torchrun + launch/train_sim.py on 2 ranks: rank 0 alone writes; metrics gathered over the whole split."""
    data_dir = Path(ml_small_prepared.output_dir)
    out = tmp_path / "run"
    env = clean_env()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(ROOT / "launch" / "train_sim.py"),
        "--config",
        str(ROOT / "launch" / "configs" / "sim_quickstart.yaml"),
        f"data_dir={data_dir}",
        f"output_dir={out}",
        "crm.embedding_dim=8",
        "crm.attention_hidden=16",
        "crm.tower=[16, 16]",
        "crm.top_k=10",
        "history_length=30",
        "history_mode=recent",  # SIM's own soft search over the last 30
        "crm.search=soft",
        "batch_size=512",
        "eval_batch_size=1024",
        "max_steps=12",
        "log_every=4",
        "checkpoint_every=5",
        "progress=false",
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]

    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    events = [f for f in files if f.startswith("tb/")]
    assert len(events) == 1, files  # one TensorBoard writer: rank 0's
    assert [f for f in files if not f.startswith("tb/")] == [
        "checkpoints/best/crm.json",
        "checkpoints/best/model.safetensors",
        "checkpoints/last/crm.json",
        "checkpoints/last/model.safetensors",
        "checkpoints/last/trainer_state.pt",
        "config.yaml",
        "metrics.json",
        "train_log.jsonl",
    ]
    acc = EventAccumulator(str(out / events[0]), size_guidance={"scalars": 0})
    acc.Reload()
    for tag in ("train/loss", "eval/auc", "perf/samples_per_s"):
        values = [e.value for e in acc.Scalars(tag)]
        assert values and all(math.isfinite(v) for v in values), tag
    assert [e.step for e in acc.Scalars("train/loss")] == [4, 8, 12]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in log if "event" in r] == ["valid", "test"]  # one record per event, not two

    # exact metrics: the 2-rank validation equals one process scoring the whole split with the same weights
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 12 and metrics["valid"][0]["n"] == 9_779 and metrics["test"]["n"] == 9_779
    model, info = load_crm(out / "checkpoints" / "best")
    assert info.step == 12
    loader = CRMBatchLoader(ProcessedDataset(data_dir), "valid", 4096, history_length=30)
    pred = predict(model, loader, torch.device("cpu"))
    table = ProcessedDataset(data_dir).read_split("valid", ["sample_id", "user_index"])
    users = dict(zip(table.column("sample_id").to_pylist(), table.column("user_index").to_pylist()))
    single = evaluate_predictions(
        pred["label"], pred["prob"], [users[i] for i in pred["sample_id"].tolist()], pred["sample_id"]
    )
    for key in ("auc", "logloss", "gauc"):
        assert metrics["valid"][0][key] == pytest.approx(single[key], abs=1e-6), key


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", type=Path, required=True)
    parser.add_argument("allreduce", choices=["gloo", "shm"])
    args = parser.parse_args()
    worker(args.worker, args.allreduce)
