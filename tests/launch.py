"""The one helper for tests that start processes: a clean environment and launcher command lines.

A test process must not leak the launcher variables of an outer job (a CI runner inside torchrun, or a
variable a previous test set) into the ranks it starts, and every rank gets one thread on these 2 cores.
The autouse fixture in ``tests/conftest.py`` removes the same variables from the test process itself.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from reclora_ds.distributed import free_port

# What torchrun / the DeepSpeed launcher / SLURM helpers set for a rank
LAUNCH_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "CROSS_RANK",
    "CROSS_SIZE",
)


ROOT = Path(__file__).resolve().parents[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without launcher variables, one thread per rank, unbuffered output, and
    the repository root on PYTHONPATH (a worker that runs a test module imports ``tests.*``)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    path = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **extra}


def torchrun(nproc: int, script: str | Path, *args: str) -> list[str]:
    """``torchrun --standalone --nproc_per_node N script args`` through this interpreter."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}", str(script), *args,
    ]  # fmt: skip


def deepspeed(nproc: int, script: str | Path, *args: str, port: int | None = None) -> list[str]:
    """``deepspeed --num_gpus N --master_port P script args`` (CPU ranks over gloo without a GPU)."""
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    return [launcher, "--num_gpus", str(nproc), "--master_port", str(port or free_port()), str(script), *args]
