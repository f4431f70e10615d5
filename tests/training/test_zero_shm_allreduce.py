"""DeepSpeed's communication routed through shared memory (``route_deepspeed_all_reduce``), two real ranks.

The reference is a brute-force sum of the two ranks' inputs, regenerated here from their seeds: every SUM
that the kernel can take (float32 in one chunk and in two, bf16, fp16) equals it bit for bit, and every
call it must not take (MAX, a non-contiguous view, int64, async work) reaches gloo and is still right.
Without ``LOCAL_SIZE`` (torchrun's environment) DeepSpeed maps no shared memory: ``auto`` keeps gloo and
``shm`` is refused with the reason.

Run as a script with ``--worker`` (and the launcher's variables set), this file is the rank's code.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reclora_ds import distributed as D
from tests.launch import clean_env

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORLD = 2
# name -> (shape, dtype); 9M float32 are 36 MB, over the kernel's 32 MB buffer: two chunks
ROUTED = {
    "fp32_small": ((1000,), torch.float32),
    "fp32_two_chunks": ((9_000_000,), torch.float32),
    "bf16": ((300_001,), torch.bfloat16),
    "fp16": ((4_096, 33), torch.float16),
}


def inputs(rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    made = {name: torch.randn(shape, generator=g).to(dtype) for name, (shape, dtype) in ROUTED.items()}
    made["max"] = torch.randn(513, generator=g)
    made["strided"] = torch.randn(64, 96, generator=g)  # reduced as its transpose, a non-contiguous view
    made["int64"] = torch.randint(-1000, 1000, (777,), generator=g)
    made["async"] = torch.randn(2_000, generator=g)
    return made


def worker(out: Path, mode: str) -> None:
    import deepspeed
    from deepspeed import comm as ds_comm

    from reclora_ds.cpu.shm_allreduce import route_deepspeed_all_reduce, unlink_own_segment

    deepspeed.init_distributed(dist_backend="gloo")  # its TorchBackend loads the shm op, maps the segments
    rank = D.dist_info().rank
    result: dict = {}
    if mode == "nolocal":
        result["auto"] = route_deepspeed_all_reduce(ds_comm.comm.cdb)
        try:
            route_deepspeed_all_reduce(ds_comm.comm.cdb, required=True)
        except RuntimeError as exc:
            result["required_error"] = str(exc)
        (out / f"nolocal_rank{rank}.json").write_text(json.dumps(result))
        return
    result["routed"] = route_deepspeed_all_reduce(ds_comm.comm.cdb, required=True)
    ds_comm.barrier()
    unlink_own_segment(rank)

    gloo_calls: list[str] = []
    gloo_all_reduce = torch.distributed.all_reduce

    def counting_all_reduce(*args, **kwargs):  # what DeepSpeed's TorchBackend hands to gloo
        gloo_calls.append(current)
        return gloo_all_reduce(*args, **kwargs)

    torch.distributed.all_reduce = counting_all_reduce
    tensors = inputs(rank)
    outputs, took_gloo = {}, {}
    for current, tensor in tensors.items():
        before = len(gloo_calls)
        if current == "max":
            ds_comm.all_reduce(tensor, op=ds_comm.ReduceOp.MAX)
        elif current == "strided":
            ds_comm.all_reduce(tensor.t())
        elif current == "async":
            ds_comm.all_reduce(tensor, async_op=True).wait()
        else:
            ds_comm.all_reduce(tensor)
        outputs[current] = tensor
        took_gloo[current] = len(gloo_calls) > before
    torch.save({"outputs": outputs, "gloo": took_gloo, **result}, out / f"shm_rank{rank}.pt")
    ds_comm.barrier()


def launch(tmp_path: Path, mode: str) -> None:
    port = D.free_port()
    procs = []
    for rank in range(WORLD):
        env = clean_env(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(WORLD),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        if mode == "local":
            env["LOCAL_SIZE"] = str(WORLD)  # as the deepspeed launcher sets it
        else:
            env.pop("LOCAL_SIZE", None)
        cmd = [sys.executable, __file__, "--worker", str(tmp_path), mode]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = [p.communicate(timeout=600)[0].decode() for p in procs]  # a cold cache JIT-builds the op
    assert all(p.returncode == 0 for p in procs), "\n".join(outputs)
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*"))


def test_routed_sums_equal_the_brute_force_sum_and_the_rest_goes_to_gloo(tmp_path):
    launch(tmp_path, "local")
    ranks = [torch.load(tmp_path / f"shm_rank{r}.pt") for r in range(WORLD)]
    a, b = inputs(0), inputs(1)
    expected = {name: (a[name].float() + b[name].float()).to(a[name].dtype) for name in ROUTED}
    expected["max"] = torch.maximum(a["max"], b["max"])
    expected["strided"] = a["strided"] + b["strided"]
    expected["int64"] = a["int64"] + b["int64"]
    expected["async"] = a["async"] + b["async"]
    for rank, saved in enumerate(ranks):
        assert saved["routed"] is True
        assert saved["gloo"] == {name: name not in ROUTED for name in expected}, rank
        for name, want in expected.items():
            got = saved["outputs"][name]
            assert got.dtype == want.dtype and torch.equal(got, want), f"rank {rank}: {name}"


def test_without_local_size_auto_keeps_gloo_and_shm_is_refused_with_the_reason(tmp_path):
    launch(tmp_path, "nolocal")
    for rank in range(WORLD):
        saved = json.loads((tmp_path / f"nolocal_rank{rank}.json").read_text())
        assert saved["auto"] is False
        assert "shm all-reduce requested but unavailable" in saved["required_error"]
        assert "LOCAL_SIZE" in saved["required_error"] or "another rank" in saved["required_error"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", type=Path, required=True)
    parser.add_argument("mode", choices=["local", "nolocal"])
    args = parser.parse_args()
    # through exit_process: a gloo group's threads can abort a normal interpreter exit (reclora_ds.distributed)
    D.run_and_exit(lambda: worker(args.worker, args.mode))
