"""A full disk (a small tmpfs) during an output write and a stage-1 checkpoint write: a clear error that
names the destination, and the previous output / checkpoint intact and loadable.

The tmpfs is mounted by the ``small_tmpfs`` fixture (``tests/faults/conftest.py``; the test is skipped where
mounting is not permitted) and unmounted when the test ends.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reclora_ds import files
from reclora_ds.models.crm import CRMConfig, FeatureSpec
from reclora_ds.models.registry import build_crm
from reclora_ds.training.checkpoint import (
    CRMCheckpointInfo,
    load_crm,
    load_trainer_state,
    save_crm_checkpoint,
)
from tests.faults.conftest import fill
from tests.launch import ROOT, clean_env

META = {
    "category_field": "genre",
    "fields": {
        "user_id": {"source": "user", "vocab_size": 300},
        "item_id": {"source": "item", "vocab_size": 2000},
        "genre": {"source": "item", "vocab_size": 8},
    },
}
CONFIG = CRMConfig(embedding_dim=16, attention_hidden=16, tower=(16, 16), top_k=6)


def tree(folder: Path) -> list[str]:
    """Every name under ``folder`` (hidden temporaries included), relative and sorted."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def test_output_write_on_a_full_disk_raises_and_keeps_the_old_file(small_tmpfs):
    disk = small_tmpfs(256 * 1024)
    out = disk / "metrics.json"
    files.write_json_atomic(out, {"auc": 0.75})
    fill(disk, leave_bytes=8 * 1024)
    with pytest.raises(files.DiskFullError) as caught:
        files.write_json_atomic(out, {"auc": 0.8, "pad": "x" * 200_000})
    message = str(caught.value)
    assert str(out) in message and "no space left" in message and "unchanged" in message
    assert caught.value.errno == 28  # ENOSPC: also an OSError for callers that check errno
    assert json.loads(out.read_text()) == {"auc": 0.75}
    assert tree(disk) == ["filler.bin", "metrics.json"]  # the temporary gave its space back


def test_atomic_dir_on_a_full_disk_raises_and_keeps_the_old_folder(small_tmpfs):
    disk = small_tmpfs(256 * 1024)
    target = disk / "samples"
    with files.atomic_dir(target) as tmp:
        (tmp / "part-0.bin").write_bytes(b"old" * 1000)
    fill(disk, leave_bytes=16 * 1024)
    with pytest.raises(files.DiskFullError, match="no space left"), files.atomic_dir(target) as tmp:
        (tmp / "part-0.bin").write_bytes(b"new" * 100_000)
    assert (target / "part-0.bin").read_bytes() == b"old" * 1000
    assert tree(disk) == ["filler.bin", "samples", "samples/part-0.bin"]


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_crm("sim", CONFIG, FeatureSpec.from_metadata(META))


def test_crm_checkpoint_on_a_full_disk_keeps_the_previous_one_loadable(small_tmpfs):
    """Checkpoint 1 fits; with the disk then filled, checkpoint 2 (through torch.save / safetensors, whose
    write errors carry no errno) raises DiskFullError, and checkpoint 1 loads bit for bit."""
    disk = small_tmpfs(4 * 2**20)
    path = disk / "checkpoints" / "last"
    info = CRMCheckpointInfo(
        model="sim",
        config=CONFIG,
        feature_spec=FeatureSpec.from_metadata(META),
        hidden_dim=16,
        history_mode="recent",
        history_length=10,
        step=1,
    )
    first = _model(0)
    save_crm_checkpoint(path, first, info, trainer_state={"step": 1, "moments": torch.ones(1000)})
    fill(disk, leave_bytes=64 * 1024)
    info.step = 2
    with pytest.raises(files.DiskFullError, match="no space left"):
        save_crm_checkpoint(path, _model(1), info, trainer_state={"step": 2, "moments": torch.ones(10**5)})
    loaded, got = load_crm(path)
    assert got.step == 1
    for name, want in first.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], want), name
    assert load_trainer_state(path)["step"] == 1
    assert tree(disk.parent / disk.name / "checkpoints") == [
        "last",
        "last/crm.json",
        "last/model.safetensors",
        "last/trainer_state.pt",
    ]


@pytest.mark.slow
def test_stage1_run_on_a_full_disk_says_error_and_keeps_its_checkpoint(small_tmpfs, ml_small_prepared):
    """``train_sim`` writes its run folder on a tmpfs; a second run (started afresh) on the filled disk
    ends with ``error: ... no space left`` and exit 2, no traceback, and the first run's checkpoints load."""
    disk = small_tmpfs(24 * 2**20)
    out = disk / "sim"

    def run(max_steps: int, resume: bool) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "reclora_ds.commands.train_sim",
                "--config",
                str(ROOT / "launch" / "configs" / "sim_quickstart.yaml"),
                f"data_dir={ml_small_prepared.output_dir}",
                f"output_dir={out}",
                "crm.embedding_dim=8",
                "crm.attention_hidden=16",
                "crm.tower=[16, 16]",
                "crm.top_k=10",
                "history_mode=recent",
                "history_length=20",
                "crm.search=soft",
                "batch_size=512",
                "eval_batch_size=2048",
                f"max_steps={max_steps}",
                "checkpoint_every=2",
                "log_every=2",
                "progress=false",
                "device=cpu",
                "cpu_kernels=false",
                "num_threads=1",
                f"resume={str(resume).lower()}",
            ],  # fmt: skip
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )

    first = run(2, resume=True)
    assert first.returncode == 0, first.stderr[-3000:]
    before = {p: (out / p).read_bytes() for p in ("checkpoints/last/crm.json", "checkpoints/best/crm.json")}
    fill(disk, leave_bytes=48 * 1024)
    second = run(6, resume=False)  # a new run over it: its first checkpoint hits the full disk
    assert second.returncode == 2, second.stderr[-3000:]
    last_line = second.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and "no space left" in last_line, second.stderr[-3000:]
    assert "Traceback" not in second.stderr
    for name, data in before.items():
        assert (out / name).read_bytes() == data
    model, info = load_crm(out / "checkpoints" / "last")
    assert info.step == 2
    assert load_trainer_state(out / "checkpoints" / "last")["trainer"]["step"] == 2
    assert load_crm(out)[1].step == 2  # checkpoints/best
    assert not [p for p in tree(out) if ".tmp-" in p]
