"""A full disk (a small tmpfs) during a stage-2 (DeepSpeed) run: a clear error naming the folder, and the
previous checkpoint / output intact.

* the disk fills after the first checkpoint: the second ``save_checkpoint`` raises ``DiskFullError`` naming
  its tag folder, ``checkpoints/latest`` still names the first tag, whose files keep their sha256, and no
  partial tag folder or temporary is left; with the space freed, ``resume=true`` continues from the first
  tag and finishes;
* on a full disk the final writes (adapter folder, ``predictions_<split>.parquet``, ``metrics.json``) each
  raise ``DiskFullError`` naming their destination and keep the previous file bit for bit;
* the same through the entry point ``python -m reclora_ds.commands.train_plora``: exit 2, an ``error:``
  line, no traceback.

The tmpfs comes from ``tests/faults/conftest.py: small_tmpfs`` (skipped where mounting is not permitted).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from reclora_ds import files
from reclora_ds.config import load_config
from reclora_ds.training import plora_recipe
from reclora_ds.training.plora_config import PLoRATrainConfig
from reclora_ds.training.plora_recipe import PLoRARecipe, run_plora_training
from tests.faults.conftest import fill
from tests.launch import clean_env
from tests.training.test_plora_recipe import QUICKSTART, overrides

pytestmark = pytest.mark.slow  # in-process DeepSpeed runs of a tiny Llama: tens of seconds each

TMPFS_BYTES = 64 << 20
LEAVE_BYTES = (
    16 << 10
)  # room for a few small writes, not for a checkpoint: DeepSpeed's save starts, then fails
TOTAL_STEPS = 3


def settings(assets: dict[str, str], out: Path, *extra: str) -> list[str]:
    """The stage-2 recipe tests' settings (``test_plora_recipe.overrides``), checkpointing every step."""
    return overrides(
        assets, out, "short_history_length=3", f"max_steps={TOTAL_STEPS}", "batch_size=8",
        "micro_batch_size=8", "checkpoint_every=1", "keep_checkpoints=5", "log_every=1",
        "eval_max_samples=16", "num_threads=1", *extra,
    )  # fmt: skip


def config(assets: dict[str, str], out: Path, *extra: str) -> PLoRATrainConfig:
    return load_config(PLoRATrainConfig, QUICKSTART, settings(assets, out, *extra), section="plora")


def checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` by relative path."""
    return {
        p.relative_to(folder).as_posix(): files.sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if ".tmp-" in p.name)


def test_full_disk_at_the_second_checkpoint_keeps_the_first_and_a_rerun_resumes(
    plora_assets, small_tmpfs, monkeypatch
):
    disk = small_tmpfs(TMPFS_BYTES)
    out = disk / "run"
    ckpt = out / "checkpoints"
    first: dict[str, str] = {}
    original = PLoRARecipe.save_checkpoint

    def save_then_fill(self: PLoRARecipe) -> None:
        if first:  # the second checkpoint: the disk is full now
            fill(disk, LEAVE_BYTES)
        original(self)
        if not first:
            first.update(checksums(ckpt / "step00000001"))

    monkeypatch.setattr(PLoRARecipe, "save_checkpoint", save_then_fill)
    with pytest.raises(files.DiskFullError) as caught:
        run_plora_training(config(plora_assets, out))
    error = caught.value
    assert error.filename == str(ckpt / "step00000002")
    text = str(error)
    assert text.startswith(
        f"{ckpt / 'step00000002'}: no space left on the device while writing this checkpoint"
    )
    assert "still names the previous checkpoint step00000001" in text and "resume=true" in text
    assert (ckpt / "latest").read_text() == "step00000001"
    assert first and "mp_rank_00_model_states.pt" in first  # the first checkpoint, as it was written
    assert checksums(ckpt / "step00000001") == first
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step00000001"]  # no partial step00000002
    assert temporaries(out) == []
    assert not (out / "metrics.json").exists() and not (out / "adapter").exists()

    # free the space: the same run with resume=true continues from step 1 and finishes
    (disk / "filler.bin").unlink()
    monkeypatch.setattr(PLoRARecipe, "save_checkpoint", original)
    metrics = run_plora_training(config(plora_assets, out, "resume=true"))
    assert metrics["resumed_from"] == 1 and metrics["steps"] == TOTAL_STEPS
    assert [step for step, _ in metrics["train_loss"]] == [1, 2, 3]  # step 1's record from the checkpoint
    assert (ckpt / "latest").read_text() == f"step{TOTAL_STEPS:08d}"
    assert json.loads((out / "metrics.json").read_text())["steps"] == TOTAL_STEPS
    assert temporaries(out) == []


def test_full_disk_at_the_final_writes_keeps_adapter_predictions_and_metrics(
    plora_assets, small_tmpfs, monkeypatch
):
    disk = small_tmpfs(TMPFS_BYTES)
    out = disk / "run"
    run_plora_training(config(plora_assets, out, "checkpoint_every=0"))
    before = checksums(out)
    kept = [
        name for name in before if name.startswith("adapter/") or name.endswith((".parquet", "metrics.json"))
    ]
    assert "adapter/adapter_model.safetensors" in kept and "metrics.json" in kept

    recipe = PLoRARecipe(config(plora_assets, out, "checkpoint_every=0", "resume=true"))
    recipe.setup()  # resumes the finished run: training is over, only the final writes remain
    filler = fill(disk, 0)  # no room at all: the predictions and metrics.json are a few KiB
    try:
        recipe.train()
        # 1. the adapter folder (files.atomic_dir: safetensors' own error on a full disk)
        with pytest.raises(files.DiskFullError) as caught:
            recipe.finish()
        assert caught.value.filename == str(out / "adapter")
        # 2. the predictions of the first eval split (pyarrow's write error)
        monkeypatch.setattr(recipe, "export_adapter", lambda: None)
        with pytest.raises(files.DiskFullError) as caught:
            recipe.finish()
        assert caught.value.filename == str(out / "predictions_valid.parquet")
        # 3. metrics.json
        monkeypatch.setattr(plora_recipe, "write_predictions", lambda path, pred: None)
        with pytest.raises(files.DiskFullError) as caught:
            recipe.finish()
        assert caught.value.filename == str(out / "metrics.json")
        assert "no space left on the device" in str(caught.value)
        assert {name: files.sha256_file(out / name) for name in kept} == {name: before[name] for name in kept}
        assert temporaries(out) == []
    finally:
        filler.unlink()
        recipe.cleanup()


def test_entry_point_on_a_full_disk_exits_2_with_an_error_line(plora_assets, small_tmpfs):
    disk = small_tmpfs(TMPFS_BYTES)
    out = disk / "run"
    command = [sys.executable, "-m", "reclora_ds.commands.train_plora", "--config", str(QUICKSTART)]

    def train(*extra: str) -> subprocess.CompletedProcess:
        run = [*command, *settings(plora_assets, out, *extra)]
        return subprocess.run(run, env=clean_env(), capture_output=True, text=True)

    first = train("max_steps=1")
    assert first.returncode == 0, first.stderr[-3000:]
    kept = checksums(out / "checkpoints" / "step00000001")
    fill(disk, LEAVE_BYTES)
    # two more steps from the checkpoint: the first new checkpoint meets the full disk
    rerun = train("resume=true")
    assert rerun.returncode == 2, rerun.stderr[-3000:]
    lines = [line for line in rerun.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "no space left" in lines[-1], lines[-5:]
    assert "Traceback" not in rerun.stderr
    print(f"\nentry point on a full disk: exit {rerun.returncode}, {lines[-1]}")
    assert (out / "checkpoints" / "latest").read_text() == "step00000001"
    assert checksums(out / "checkpoints" / "step00000001") == kept
