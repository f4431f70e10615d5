"""The sbatch scripts of ``launch/slurm`` on a real one-node SLURM cluster (see ``conftest.py``).

* ``train_sim.sbatch`` with 2 tasks trains the CRM on the bundled data (torchrun, 2 gloo ranks): the job
  COMPLETES with exit code 0 and the run's files land in ``output_dir``;
* a job whose rank 1 exits 3 while rank 0 is stuck ends FAILED with a non-zero exit code within a bounded
  time, with both launchers of ``common.sh`` (torchrun per node, srun task per rank): no rank hangs.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.distributed, pytest.mark.slow]

ROOT = Path(__file__).parents[2]
SLURM_DIR = ROOT / "launch" / "slurm"
JOB_TIMEOUT_S = 240
FAILURE_BOUND_S = 120  # a failing job must end well before any collective timeout (rank 0 waits 600 s)

# Rank 1 dies; rank 0 waits for it in a barrier, then (as a rank that never notices, e.g. NCCL without
# async error handling) keeps waiting. Only the launcher can end it.
# rank 1 fails as an entry point of the package does (run_and_exit -> exit_process): a bare sys.exit with a
# live gloo group can be turned into SIGABRT by gloo's threads at finalisation (exit_process's docstring),
# and the log would then show -6 instead of the rank's own status
FAILING_WORKER = """\
import time
from reclora_ds.distributed import barrier, exit_process, init_distributed

info = init_distributed("gloo", timeout_s=600)
if info.rank == 1:
    exit_process(3)
try:
    barrier()
finally:
    time.sleep(600)
"""

FAILING_JOB = """\
#!/usr/bin/env bash
set -euo pipefail
source "$RECLORA_SLURM_DIR/common.sh"
reclora_setup
reclora_launch "$@"
"""


def sbatch(cluster, args: list[str], tmp_path: Path, **env: str) -> tuple[str, int, str]:
    """``sbatch --wait`` from the repository root; the job id, sbatch's exit code and the job's output."""
    log = tmp_path / "slurm-%j.out"
    bin_dir = str(Path(sys.executable).parent)  # the job's `python` is this environment's
    run_env = cluster.env(**env)
    run_env["PATH"] = bin_dir + ":" + run_env.get("PATH", "")
    cmd = ["sbatch", "--wait", "--parsable", f"--output={log}", *args]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        job = out.strip().split(";")[0]
        if job:
            subprocess.run(["scancel", job], env=run_env)
        pytest.fail(f"job {job} still running after {JOB_TIMEOUT_S} s: {err}")
    job = out.strip().split(";")[0]
    assert job.isdigit(), f"sbatch printed {out!r}, stderr {err!r}"
    output_file = tmp_path / f"slurm-{job}.out"
    output = output_file.read_text() if output_file.exists() else ""
    return job, proc.returncode, output


def job_fields(cluster, job: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (no accounting database: ``sacct`` does not work here)."""
    text = subprocess.run(
        ["scontrol", "show", "job", job], env=cluster.env(), capture_output=True, text=True, check=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text))


@pytest.fixture(scope="module")
def bundled_data(tmp_path_factory) -> Path:
    """``reclora-ds prepare`` of the bundled quickstart config into a temporary directory."""
    out = tmp_path_factory.mktemp("slurm_data")
    cli = Path(sys.executable).parent / "reclora-ds"
    subprocess.run(
        [str(cli), "prepare", "--config", "launch/configs/quickstart.yaml", f"output_dir={out}"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return out


def test_train_sim_two_tasks_completes(slurm_cluster, bundled_data, tmp_path):
    out = tmp_path / "run"
    job, rc, output = sbatch(
        slurm_cluster,
        [
            "--ntasks=2",
            str(SLURM_DIR / "train_sim.sbatch"),
            "launch/configs/sim_quickstart.yaml",
            f"data_dir={bundled_data}",
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
            "max_steps=6",
            "log_every=3",
            "checkpoint_every=6",
            "progress=false",
        ],
        tmp_path,
    )
    assert rc == 0, output[-4000:]
    fields = job_fields(slurm_cluster, job)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", fields
    # 2 tasks on one node: one torchrun with 2 workers sharing the node's CPUs
    assert "procs/node=2" in output and "launcher=torchrun" in output, output[-4000:]
    assert f"OMP_NUM_THREADS={max(1, slurm_cluster.cpus // 2)}" in output, output[-4000:]

    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert len([f for f in files if f.startswith("tb/")]) == 1, files  # rank 0's writer only
    for name in (
        "metrics.json",
        "checkpoints/best/crm.json",
        "checkpoints/best/model.safetensors",
        "config.yaml",
    ):
        assert name in files, files


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_failing_rank_fails_the_job_without_hanging(slurm_cluster, tmp_path, launcher):
    worker = tmp_path / "fail_rank1.py"
    worker.write_text(FAILING_WORKER)
    script = tmp_path / "failing.sbatch"
    script.write_text(textwrap.dedent(FAILING_JOB))
    start = time.monotonic()
    job, rc, output = sbatch(
        slurm_cluster,
        ["--ntasks=2", str(script), str(worker)],
        tmp_path,
        RECLORA_SLURM_DIR=str(SLURM_DIR),
        RECLORA_LAUNCHER=launcher,
    )
    elapsed = time.monotonic() - start
    assert rc != 0, output[-4000:]
    fields = job_fields(slurm_cluster, job)
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] != "0:0", fields
    assert re.search(r"exit ?code\s*:? 3", output), output[-4000:]  # rank 1's status reached the log
    assert elapsed < FAILURE_BOUND_S, f"{launcher}: the job took {elapsed:.0f} s to fail\n{output[-4000:]}"


@pytest.fixture(scope="module")
def tiny_pipeline_config(tmp_path_factory, ml1m_dir, plora_assets):
    from tests.pipeline.tiny import tiny_config

    tmp = tmp_path_factory.mktemp("slurm_pipeline")
    return tiny_config(tmp, ml1m_dir, plora_assets["backbone"], "slurm"), tmp / "runs" / "slurm"


def test_pipeline_two_tasks_completes(slurm_cluster, tiny_pipeline_config, tmp_path):
    """The whole tiny pipeline as one job; each distributed stage is a 2-rank job step."""
    config, run_dir = tiny_pipeline_config
    job, rc, output = sbatch(
        slurm_cluster, ["--ntasks=2", str(SLURM_DIR / "pipeline.sbatch"), str(config)], tmp_path
    )
    assert rc == 0, output[-6000:]
    fields = job_fields(slurm_cluster, job)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", fields
    assert "procs/node=2" in output and "launcher=torchrun" in output, output[-4000:]
    for stage in ("prepare", "embeddings", "index", "retrieval", "sim", "lora", "plora"):
        record = json.loads((run_dir / "_pipeline" / f"{stage}.json").read_text())
        assert record["status"] == "done", record
    # the distributed stages ran on 2 ranks: 2 embedding shards, stage 2 on a world of 2
    assert sorted(p.name for p in (run_dir / "embeddings" / "shards").glob("*.npy")) == [
        "rank000-of-002.npy",
        "rank001-of-002.npy",
    ]
    assert json.loads((run_dir / "plora" / "metrics.json").read_text())["world_size"] == 2
    assert (run_dir / "report.md").is_file() and (run_dir / "results.csv").is_file()


def test_pipeline_whose_stage_fails_ends_failed(slurm_cluster, tiny_pipeline_config, tmp_path):
    config, _ = tiny_pipeline_config
    start = time.monotonic()
    job, rc, output = sbatch(
        slurm_cluster,
        [
            "--ntasks=2",
            str(SLURM_DIR / "pipeline.sbatch"),
            str(config),
            "pipeline.name=failing",
            "sim.device=cuda",  # no GPU here: every rank of the SIM step fails
        ],
        tmp_path,
    )
    assert rc != 0, output[-4000:]
    fields = job_fields(slurm_cluster, job)
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] != "0:0", fields
    assert "stage sim failed" in output, output[-4000:]
    assert time.monotonic() - start < FAILURE_BOUND_S + 120, output[-4000:]


def test_experiment_two_tasks_completes(slurm_cluster, ml1m_dir, plora_assets, tmp_path):
    """A tiny experiment (2 variants x 2 seeds) as one job: each distributed stage is a 2-rank job step."""
    from tests.experiments.tiny import tiny_spec

    spec = tiny_spec(tmp_path, ml1m_dir, plora_assets["backbone"])
    job, rc, output = sbatch(
        slurm_cluster, ["--ntasks=2", str(SLURM_DIR / "experiment.sbatch"), str(spec)], tmp_path
    )
    assert rc == 0, output[-6000:]
    fields = job_fields(slurm_cluster, job)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", fields
    root = tmp_path / "runs" / "tiny"
    for variant, mode in (("lora_r2", "lora"), ("plora_n3", "plora")):
        for seed in (1, 2):
            metrics = json.loads(
                (root / "runs" / variant / f"seed{seed}" / mode / "metrics.json").read_text()
            )
            assert metrics["world_size"] == 2, (variant, seed)  # pipeline.nproc from the allocation
    rows = list(csv.DictReader((root / "results.csv").open()))
    assert {r["variant"] for r in rows} == {"lora_r2", "plora_n3"}
