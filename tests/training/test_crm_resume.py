"""Exact resume: a training run killed with SIGKILL mid-epoch and started again with the same command ends
with the same weights (bit for bit on CPU) as a run that was never interrupted.

The run is the real entry point in a subprocess, one process, one thread, a tiny SIM with dropout (so the
restored RNG state matters), frequent checkpoints and two epochs (so the restored data position, inside an
epoch, and the epoch-end bookkeeping both matter).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reclora_ds.config import load_config
from reclora_ds.training.checkpoint import load_trainer_state, read_info
from reclora_ds.training.crm_config import CRMTrainConfig
from reclora_ds.training.crm_recipe import run_crm_training
from tests.launch import clean_env

ROOT = Path(__file__).parents[2]
ENTRY = ROOT / "launch" / "train_sim.py"
CONFIG = ROOT / "launch" / "configs" / "sim_quickstart.yaml"
STEPS_PER_EPOCH = 78_228 // 512
OVERRIDES = [
    "crm.embedding_dim=8",
    "crm.attention_hidden=16",
    "crm.tower=[16, 16]",
    "crm.top_k=10",
    "crm.dropout=0.1",
    "history_length=30",
    "history_mode=recent",  # SIM's own soft search over the last 30
    "crm.search=soft",
    "batch_size=512",
    "eval_batch_size=4096",
    "epochs=2",
    "patience=5",
    "lr_schedule=linear",
    "warmup_steps=20",
    "checkpoint_every=15",
    "log_every=15",
    "progress=false",
]
ENV = clean_env()


def command(data_dir: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        str(ENTRY),
        "--config",
        str(CONFIG),
        f"data_dir={data_dir}",
        f"output_dir={out}",
        *OVERRIDES,
    ]


def last_step(out: Path) -> int:
    """Step of checkpoints/last, 0 while there is none (read from crm.json, which is written atomically)."""
    try:
        return read_info(out / "checkpoints" / "last").step
    except Exception:
        return 0


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_equals_an_uninterrupted_run(ml_small_prepared, tmp_path):
    data_dir = Path(ml_small_prepared.output_dir)
    total = 2 * STEPS_PER_EPOCH

    # the reference: the same config, never interrupted (in-process; the same single thread)
    reference = tmp_path / "reference"
    torch.set_num_threads(1)
    run_crm_training(
        load_config(CRMTrainConfig, CONFIG, [*command(data_dir, reference)[4:], "num_threads=1"])
    )

    # the interrupted run: SIGKILL once a checkpoint inside the second epoch exists (after a validation,
    # a best checkpoint and an epoch-end checkpoint, and mid-epoch)
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        command(data_dir, out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while last_step(out) <= STEPS_PER_EPOCH and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, (
        "the run ended before a checkpoint could be interrupted:\n" + proc.stderr.read().decode()
    )
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    killed_at = last_step(out)
    assert STEPS_PER_EPOCH < killed_at < total
    assert not (out / "metrics.json").exists() or "test" not in json.loads((out / "metrics.json").read_text())

    # the same command again: it resumes from checkpoints/last
    rerun = subprocess.run(command(data_dir, out), env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumes = [
        json.loads(line)
        for line in (out / "train_log.jsonl").read_text().splitlines()
        if '"event": "resume"' in line
    ]
    assert len(resumes) == 1
    resumed_from = resumes[0]["step"]
    assert STEPS_PER_EPOCH < resumed_from < total and resumed_from >= killed_at
    print(f"killed at step {killed_at}, resumed from {resumed_from} of {total}")
    assert f"at step {resumed_from}" in rerun.stderr

    # identical final weights, best weights, optimizer position and metrics
    for folder in ("last", "best"):
        got = load_file(str(out / "checkpoints" / folder / "model.safetensors"))
        want = load_file(str(reference / "checkpoints" / folder / "model.safetensors"))
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), f"{folder}/{name}"
    state, ref_state = (
        load_trainer_state(out / "checkpoints" / "last"),
        load_trainer_state(reference / "checkpoints" / "last"),
    )
    assert state["trainer"]["step"] == ref_state["trainer"]["step"] == total
    assert state["scheduler"]["last_epoch"] == ref_state["scheduler"]["last_epoch"]
    metrics, ref_metrics = (json.loads((d / "metrics.json").read_text()) for d in (out, reference))
    assert metrics["valid"] == ref_metrics["valid"] and metrics["test"] == ref_metrics["test"]


def test_resume_with_another_batch_size_is_refused(ml_small_prepared, tmp_path):
    data_dir = Path(ml_small_prepared.output_dir)
    out = tmp_path / "run"
    small = [o for o in OVERRIDES if not o.startswith(("epochs", "checkpoint_every"))]
    args = [f"data_dir={data_dir}", f"output_dir={out}", *small, "epochs=1", "max_steps=3", "num_threads=1"]
    run_crm_training(load_config(CRMTrainConfig, CONFIG, args))
    with pytest.raises(ValueError, match=r"other \['batch_size'\]"):
        run_crm_training(load_config(CRMTrainConfig, CONFIG, [*args, "batch_size=256"]))
    # resume=false starts afresh in the same folder
    run_crm_training(load_config(CRMTrainConfig, CONFIG, [*args, "batch_size=256", "resume=false"]))
    assert load_trainer_state(out / "checkpoints" / "last")["config"]["batch_size"] == 256
