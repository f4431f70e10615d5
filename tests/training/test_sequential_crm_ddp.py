"""Two-process DDP training of the sequential CRMs: k steps on 2 gloo ranks leave both ranks with the same
parameters, equal to one process that takes the whole (twice the per-rank) batches.

Reuses the batches and launcher environment of :mod:`tests.training.test_crm_ddp`. Run as a script with
``--worker`` (and RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set, as a launcher sets them), this file is
the worker of :func:`test_ddp_steps_equal_one_process_with_twice_the_batch`.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reclora_ds import distributed as D
from reclora_ds.models.crm import FeatureSpec
from reclora_ds.models.registry import build_crm
from tests.training.test_crm_ddp import CONFIG, META, WORLD, global_batches, launch_env
from tests.training.test_crm_ddp import train as train_model

pytestmark = pytest.mark.distributed

# Two blocks of two heads, so the per-head split and the stacking are both exercised across ranks.
SEQUENCE_CONFIG = dataclasses.replace(CONFIG, attention_size=16, attention_heads=2, sequence_layers=2)


def train(name: str, batches: list[dict[str, torch.Tensor]], rank: int = 0, world: int = 1):
    """The shared DDP training loop (:func:`tests.training.test_crm_ddp.train`) on a sequential CRM."""
    return train_model(batches, rank, world, name=name, config=SEQUENCE_CONFIG)


def worker(out: Path, name: str) -> None:
    info = D.init_distributed("gloo")
    torch.set_num_threads(1)
    state = train(name, global_batches(), info.rank, info.world_size)
    torch.save(state, out / f"{name}_rank{info.rank}.pt")
    D.barrier()
    D.destroy()


def parts(key: str, got: torch.Tensor, want: torch.Tensor, tolerance: float):
    """(name, got, want, atol) per part of a tensor: an attention's key bias apart, with 10x the tolerance."""
    if not key.endswith("attention.in_proj.bias"):
        return [(key, got, want, tolerance)]
    (q_got, k_got, v_got), (q_want, k_want, v_want) = got.chunk(3), want.chunk(3)
    return [
        (f"{key}[query, value]", torch.cat([q_got, v_got]), torch.cat([q_want, v_want]), tolerance),
        (f"{key}[key]", k_got, k_want, 10 * tolerance),
    ]


@pytest.mark.parametrize("name", ["sasrec", "gru4rec", "caser"])
def test_ddp_steps_equal_one_process_with_twice_the_batch(name, tmp_path):
    port = D.free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(tmp_path), name],
            env=launch_env(rank, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(WORLD)
    ]
    outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outputs)
    rank0, rank1 = (torch.load(tmp_path / f"{name}_rank{r}.pt") for r in range(WORLD))

    reference = train(name, global_batches())  # one process, the whole batches
    torch.manual_seed(0)
    initial = build_crm(name, SEQUENCE_CONFIG, FeatureSpec.from_metadata(META)).state_dict()
    # Float sums in another order: up to about 1.5e-6 apart after 4 AdamW steps (Adam divides by the root
    # of small second moments). A rank that skipped the all-reduce is 1e-3 or more apart (checked below).
    # SASRec's key bias (the middle third of in_proj.bias) gets a gradient of rounding noise only: it adds
    # q . b_k to every key's score alike, which the softmax cancels. Adam normalises that noise into steps
    # whose size depends on the summation order, so it gets a looser bound.
    tolerance = 1e-5
    for key, want in reference.items():
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between the ranks"
        for part, got, expected, atol in parts(key, rank0[key], want, tolerance):
            torch.testing.assert_close(got, expected, rtol=0, atol=atol, msg=lambda m, p=part: f"{p}: {m}")
    alone = train(name, global_batches(), rank=0, world=2)  # rank 0's half of each batch, no all-reduce
    assert max((alone[k] - reference[k]).abs().max().item() for k in reference) > 100 * tolerance
    # every tensor was trained (the position table and the encoders' parameters included)
    moved = [k for k in reference if not torch.equal(reference[k], initial[k])]
    assert len(moved) == len(reference), sorted(set(reference) - set(moved))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", type=Path, required=True)
    parser.add_argument("name")
    args = parser.parse_args()
    worker(args.worker, args.name)
