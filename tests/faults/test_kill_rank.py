"""A rank killed with ``-9`` mid-training ends the whole job, non-zero, within 60 s, with no process left.

Stage 1 runs under ``torchrun --standalone -m reclora_ds.commands.train_sim`` (DDP on gloo, gradients
through DeepSpeed's shared-memory all-reduce where it builds); stage 2 under the DeepSpeed launcher
(``deepspeed --num_gpus 2 launch/train_plora.py``, ZeRO-2 on CPU). Both on the tiny assets of
``tests/conftest.py``. The test waits until the job is training (its first log line / checkpoint), kills one
rank's process with SIGKILL, and checks with psutil that the launcher and every process it started (the
other rank, a compiler, anything in the tree) are gone within :data:`DEADLINE_S`.

Without a launcher that watches (ranks started one by one, as ``srun`` with exported variables does), the
peer watch of :mod:`reclora_ds.distributed` ends the other ranks: run as a script with ``--worker``, this
file is such a rank (:func:`test_without_a_launcher_the_peer_watch_ends_a_blocked_rank`).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from reclora_ds import distributed as D
from tests.launch import ROOT, clean_env, deepspeed, torchrun

pytestmark = pytest.mark.distributed

DEADLINE_S = 60.0
START_TIMEOUT_S = 400.0  # a cold extension cache compiles the shm op first; 2 busy cores are slow


def rank_processes(root: psutil.Process) -> dict[int, psutil.Process]:
    """``{RANK: process}`` of the workers under the launcher ``root`` (read from their environment)."""
    found = {}
    for child in root.children(recursive=True):
        try:
            rank = child.environ().get("RANK")
            is_python = "python" in os.path.basename(child.exe())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if rank is not None and is_python:
            found.setdefault(int(rank), child)  # the outermost python with RANK is the worker
    return found


def kill_rank_and_watch(
    command: list[str], started: Callable[[], bool], rank: int, log: Path
) -> tuple[int, float, list[str]]:
    """Start ``command``; once ``started()`` is true, SIGKILL the worker of ``rank``.

    Returns ``(launcher exit status, seconds from the kill to the end of every process, survivors)``, where
    survivors are the processes of the tree (as seen just before the kill) still alive after the deadline.
    """
    with open(log, "wb") as sink:
        launcher = subprocess.Popen(command, env=clean_env(), stdout=sink, stderr=subprocess.STDOUT)
    root = psutil.Process(launcher.pid)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not started():
        assert launcher.poll() is None, "the job ended before the kill:\n" + log.read_text()[-4000:]
        assert time.monotonic() < deadline, "the job did not start training:\n" + log.read_text()[-4000:]
        time.sleep(0.2)
    ranks = rank_processes(root)
    assert sorted(ranks) == [0, 1], f"ranks found: {sorted(ranks)}"
    tree = [root, *root.children(recursive=True)]
    victim = ranks[rank]
    killed_at = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    try:
        code = launcher.wait(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        code = None
    _, alive = psutil.wait_procs(tree, timeout=max(0.0, DEADLINE_S - (time.monotonic() - killed_at)))
    elapsed = time.monotonic() - killed_at
    survivors = []
    for proc in alive:
        try:
            survivors.append(f"{proc.pid} {proc.status()} {' '.join(proc.cmdline())[:200]}")
        except psutil.NoSuchProcess:
            continue
        proc.kill()  # clean up after a failure, so the next test starts on a quiet machine
    if code is None:
        launcher.kill()
        code = launcher.wait()
    return code, elapsed, survivors


@pytest.mark.parametrize("rank", [1, 0])
def test_stage1_torchrun_rank_killed(ml_small_prepared, tmp_path, rank):
    out = tmp_path / "sim"
    command = torchrun(
        2, "-m", "reclora_ds.commands.train_sim",
        "--config", str(ROOT / "launch" / "configs" / "sim_quickstart.yaml"),
        f"data_dir={ml_small_prepared.output_dir}", f"output_dir={out}",
        "crm.embedding_dim=8", "crm.attention_hidden=16", "crm.tower=[16, 16]", "crm.top_k=10",
        "history_mode=recent", "history_length=20", "crm.search=soft", "batch_size=64",
        "eval_batch_size=2048", "epochs=50", "checkpoint_every=100000", "log_every=1", "progress=false",
    )  # fmt: skip
    code, elapsed, survivors = kill_rank_and_watch(
        command, lambda: (out / "train_log.jsonl").is_file(), rank, tmp_path / "job.log"
    )
    log = (tmp_path / "job.log").read_text()[-3000:]
    assert not survivors, f"left behind {elapsed:.0f} s after the kill: {survivors}\n{log}"
    assert code != 0, log
    assert elapsed < DEADLINE_S, log
    print(f"stage 1, rank {rank} killed: job ended with {code} after {elapsed:.1f} s")


@pytest.mark.parametrize("rank", [1, 0])
def test_stage2_deepspeed_rank_killed(plora_assets, tmp_path, rank):
    out = tmp_path / "plora"
    command = deepspeed(
        2, ROOT / "launch" / "train_plora.py",
        "--config", str(ROOT / "launch" / "configs" / "plora_quickstart.yaml"),
        f"data_dir={plora_assets['data_dir']}", f"output_dir={out}", f"crm_path={plora_assets['crm_path']}",
        f"backbone={plora_assets['backbone']}", "deepspeed_config=ds_configs/zero2_fp32.json",
        "short_history=recent", "adapter.num_experts=4", "progress=false", "epochs=20", "max_steps=100000",
        "batch_size=8", "micro_batch_size=4", "checkpoint_every=2", "log_every=1", "eval_max_samples=32",
        "short_history_length=3",
    )  # fmt: skip
    code, elapsed, survivors = kill_rank_and_watch(
        command, lambda: (out / "checkpoints" / "latest").is_file(), rank, tmp_path / "job.log"
    )
    log = (tmp_path / "job.log").read_text()[-3000:]
    assert not survivors, f"left behind {elapsed:.0f} s after the kill: {survivors}\n{log}"
    assert code != 0, log
    assert elapsed < DEADLINE_S, log
    print(f"stage 2, rank {rank} killed: job ended with {code} after {elapsed:.1f} s")


# ----------------------------------------------------------------------------------------------------------
# no launcher: the peer watch
# ----------------------------------------------------------------------------------------------------------

HANG_S = 600  # "forever": longer than any test timeout


def worker(role: str) -> None:
    """One rank of a 2-rank gloo group started without a launcher; ``role`` says what rank 1 does:
    ``hang`` (rank 1 blocks until it is killed), ``exit0`` (rank 1 ends normally at once), ``fail`` (rank 1
    ends with status 1 through run_and_exit). Rank 0 then sleeps in its main thread, as a rank blocked in
    a collective that never returns does (DeepSpeed's shared-memory all-reduce spins forever)."""
    info = D.init_distributed("gloo")
    print(f"rank {info.rank} ready", flush=True)
    if info.rank == 1:
        if role == "exit0":
            D.exit_process(0)
        if role == "fail":
            D.run_and_exit(lambda: 1)
        time.sleep(HANG_S)
    time.sleep(4 if role == "exit0" else HANG_S)
    D.exit_process(0)  # reached only when nothing ended this rank


def start_ranks(role: str, tmp_path: Path) -> list[subprocess.Popen]:
    port = D.free_port()
    procs = []
    for rank in range(2):
        env = clean_env(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port), RECLORA_PEER_FLAGS=str(tmp_path / "flags"),
        )  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "--worker", role],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for rank, proc in enumerate(procs):
        assert proc.stdout.readline().strip() == f"rank {rank} ready", proc.stderr.read()
    return procs


def test_without_a_launcher_the_peer_watch_ends_a_blocked_rank(tmp_path):
    procs = start_ranks("hang", tmp_path)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        procs[0].wait(timeout=DEADLINE_S)
    finally:
        for proc in procs:
            proc.kill()
    elapsed = time.monotonic() - killed_at
    err = procs[0].stderr.read()
    assert procs[0].returncode == 1, err
    assert "error: rank 1 (pid" in err and "died" in err and "rank 0 ends too" in err
    assert elapsed < 10 * D.PEER_WATCH_INTERVAL_S, elapsed
    print(f"no launcher, rank 1 killed: rank 0 ended after {elapsed:.1f} s")


def test_a_rank_that_fails_ends_its_peers(tmp_path):
    procs = start_ranks("fail", tmp_path)
    try:
        procs[0].wait(timeout=DEADLINE_S)
        procs[1].wait(timeout=DEADLINE_S)
    finally:
        for proc in procs:
            proc.kill()
    assert procs[1].returncode == 1
    assert procs[0].returncode == 1 and "error: rank 1 (pid" in procs[0].stderr.read()


def test_a_rank_that_ends_normally_does_not_end_its_peers(tmp_path):
    """Rank 1 leaves with status 0 while rank 0 still works: rank 0 finishes its work and exits 0, and the
    flags are gone."""
    procs = start_ranks("exit0", tmp_path)
    try:
        codes = [proc.wait(timeout=DEADLINE_S) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert codes == [0, 0], procs[0].stderr.read()
    assert not list((tmp_path / "flags").rglob("rank*")), "a normal end removes its flag"


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", choices=["hang", "exit0", "fail"], required=True)
    worker(parser.parse_args().worker)
