"""Stage-1 recipe end to end on the bundled real data (tiny model): the files that land, the checkpoint that
rebuilds the CRM alone, the CRM states for stage 2, configs, schedules and atomic checkpoint folders."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from reclora_ds import files
from reclora_ds.config import ConfigError, load_config
from reclora_ds.data.loader import DEFAULT_RECENT_LENGTH, CRMBatchLoader, uniform_sample_ids
from reclora_ds.data.processed import ProcessedDataset
from reclora_ds.distributed import DistInfo
from reclora_ds.models.crm import CRMConfig
from reclora_ds.training import checkpoint as ckpt
from reclora_ds.training.crm_config import CRMTrainConfig
from reclora_ds.training.crm_recipe import (
    build_loader,
    crm_config,
    lr_factor,
    per_rank_batch,
    run_crm_training,
)
from reclora_ds.training.crm_states import (
    DatasetMismatchError,
    compute_crm_outputs,
    compute_crm_states,
    load_crm_states,
    save_crm_states,
)

ROOT = Path(__file__).parents[2]
CONFIGS = ROOT / "launch" / "configs"
# A tiny SIM: a few ms per step on one core, so two epochs of the bundled data take seconds.
TINY = [
    "crm.embedding_dim=8",
    "crm.attention_hidden=16",
    "crm.tower=[16, 16]",
    "crm.top_k=10",
    "history_length=30",
    "history_mode=recent",  # SIM's own soft search over the last 30
    "crm.search=soft",
    "batch_size=1024",
    "eval_batch_size=2048",
    "progress=false",
    "num_threads=1",
]
RUN_FILES = {
    "config.yaml",
    "metrics.json",
    "train_log.jsonl",
    "checkpoints/last/model.safetensors",
    "checkpoints/last/crm.json",
    "checkpoints/last/trainer_state.pt",
    "checkpoints/best/model.safetensors",
    "checkpoints/best/crm.json",
}
SCALARS = ("train/loss", "train/lr", "eval/auc", "eval/logloss", "eval/gauc", "perf/samples_per_s")


def run_files(out: Path) -> tuple[set[str], list[Path]]:
    """Relative paths of every file in the run folder (event files apart) and the event files."""
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    events = sorted((out / "tb").glob("events.out.tfevents.*"))
    return {f for f in files if not f.startswith("tb/")}, events


def check_event_file(event: Path) -> None:
    acc = EventAccumulator(str(event), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in SCALARS:
        values = [e.value for e in acc.Scalars(tag)]
        assert values and all(math.isfinite(v) for v in values), tag
    assert any("config" in t for t in tags["tensors"]), tags  # add_text is stored as a tensor summary


@pytest.fixture(scope="module")
def data_dir(ml_small_prepared) -> Path:
    return Path(ml_small_prepared.output_dir)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir) -> Path:
    out = tmp_path_factory.mktemp("crm_run") / "run"
    cfg = load_config(
        CRMTrainConfig,
        CONFIGS / "sim_quickstart.yaml",
        [
            f"data_dir={data_dir}",
            f"output_dir={out}",
            "epochs=2",
            "log_every=20",
            "checkpoint_every=50",
            *TINY,
        ],
    )
    run_crm_training(cfg)
    return out


# ----------------------------------------------------------------------------------------------------------
# End to end: which files land, what they hold
# ----------------------------------------------------------------------------------------------------------


def test_run_writes_exactly_these_files(finished_run):
    files, events = run_files(finished_run)
    assert files == RUN_FILES
    assert len(events) == 1
    check_event_file(events[0])

    metrics = json.loads((finished_run / "metrics.json").read_text())
    assert [v["epoch"] for v in metrics["valid"]] == [0, 1]
    assert metrics["steps"] == 2 * (78_228 // 1024)
    assert metrics["best"]["valid_auc"] == max(v["auc"] for v in metrics["valid"])
    for split in ("test",):
        m = metrics[split]
        assert 0.5 < m["auc"] < 1 and 0 < m["logloss"] < 1 and m["n"] == 9_779
        assert {"auc", "logloss", "gauc", "ece", "calibration"} <= set(m)

    records = [json.loads(line) for line in (finished_run / "train_log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records if "event" in r] == ["valid", "valid", "test"]
    steps = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in steps] == list(range(20, metrics["steps"] + 1, 20))
    assert all(0 <= r["perf/data_share"] < 1 for r in steps)

    saved = load_config(CRMTrainConfig, finished_run / "config.yaml")
    assert saved.crm.embedding_dim == 8 and saved.epochs == 2


def test_load_crm_rebuilds_from_the_checkpoint_alone(finished_run, tmp_path):
    alone = tmp_path / "best"
    shutil.copytree(finished_run / "checkpoints" / "best", alone)  # no dataset, no run folder beside it
    model, info = ckpt.load_crm(alone)
    assert not model.training
    assert (info.model, info.hidden_dim, info.history_length, info.history_mode) == ("sim", 16, 30, "recent")
    assert info.config == crm_config(load_config(CRMTrainConfig, finished_run / "config.yaml"))
    assert type(info.config) is CRMConfig and (info.config.embedding_dim, info.config.tower) == (8, (16, 16))
    assert [(f.name, f.vocab_size) for f in info.feature_spec.fields] == [
        ("user_id", 524),
        ("item_id", 7869),
        ("genre", 21),
    ]
    assert info.feature_spec.category_field == "genre"
    weights = load_file(str(alone / "model.safetensors"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name
    # the run folder resolves to its best checkpoint
    again, _ = ckpt.load_crm(finished_run)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))

    # the weights file alone still describes the model (crm.json repeated in its header)
    (alone / "crm.json").unlink()
    assert ckpt.read_info(alone / "model.safetensors").config == info.config

    # strict keys: a missing and an unexpected tensor are both named
    (alone / "crm.json").write_text(json.dumps(info.to_dict()))
    weights.pop("head.bias")
    weights["head.extra"] = torch.zeros(1)
    save_file(weights, str(alone / "model.safetensors"))
    with pytest.raises(ckpt.CheckpointError, match=r"missing \['head.bias'\], unexpected \['head.extra'\]"):
        ckpt.load_crm(alone)


def test_a_checkpoint_from_before_item_merge_loads_as_concatenated(finished_run):
    data = ckpt.read_info(finished_run / "checkpoints" / "best").to_dict()
    assert data["crm_config"]["item_merge"] == "sum"  # the default, saved with every checkpoint
    del data["crm_config"]["item_merge"]  # what a checkpoint written before the field existed holds
    assert ckpt.CRMCheckpointInfo.from_dict(data).config.item_merge == "concat"


def test_crm_states_are_deterministic_and_equal_the_eval_forward(finished_run, data_dir, tmp_path):
    model, info = ckpt.load_crm(finished_run)
    ids, hidden = compute_crm_states(finished_run, data_dir, split="test", batch_size=1000)
    ids2, hidden2 = compute_crm_states((model, info), data_dir, split="test", batch_size=1000)
    assert np.array_equal(ids, ids2) and np.array_equal(hidden, hidden2)
    assert hidden.dtype == np.float32 and hidden.shape == (9_779, 16)
    assert np.array_equal(ids, np.sort(ids))

    # the same batches through model(batch).hidden in eval mode
    loader = CRMBatchLoader(ProcessedDataset(data_dir), "test", 1000, history_length=30)
    with torch.no_grad():
        expected = np.concatenate([model(batch).hidden.numpy() for batch in loader])
    assert np.array_equal(hidden, expected)

    # listed samples from several splits, in the given order
    rng = np.random.default_rng(0)
    fewshot = ProcessedDataset(data_dir).read_split("fewshot", ["sample_id"]).column("sample_id").to_numpy()
    wanted = np.concatenate([rng.choice(fewshot, 40, replace=False), rng.choice(ids, 40, replace=False)])
    sub_ids, sub_hidden = compute_crm_states(finished_run, data_dir, sample_ids=wanted, batch_size=32)
    assert np.array_equal(sub_ids, wanted)
    rows = np.searchsorted(ids, wanted[40:])
    np.testing.assert_allclose(sub_hidden[40:], hidden[rows], rtol=1e-5, atol=1e-6)

    for suffix in (".safetensors", ".npz"):
        path = save_crm_states(tmp_path / f"states{suffix}", sub_ids, sub_hidden, {"model": "sim"})
        back_ids, back_hidden = load_crm_states(path)
        assert np.array_equal(back_ids, sub_ids) and np.array_equal(back_hidden, sub_hidden)

    with pytest.raises(KeyError, match="in no split"):
        compute_crm_states(finished_run, data_dir, sample_ids=[10**9])


def test_crm_states_refuse_another_dataset(finished_run, data_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(data_dir, other)
    meta = json.loads((other / "metadata.json").read_text())
    meta["raw_dir"] = "/elsewhere"
    (other / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetMismatchError, match="not the dataset the CRM was trained on"):
        compute_crm_states(finished_run, other, split="valid")
    ids, _ = compute_crm_states(finished_run, other, split="valid", check_dataset=False)
    assert len(ids) == 9_779
    meta["fields"]["genre"]["vocab_size"] = 99
    (other / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetMismatchError, match="vocab sizes"):
        compute_crm_states(finished_run, other, split="valid", check_dataset=False)


# ----------------------------------------------------------------------------------------------------------
# Configs, batch split, schedules
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("sim_*.yaml")), ids=lambda p: p.name)
def test_every_shipped_sim_config_parses(path):
    cfg = load_config(CRMTrainConfig, path)
    assert cfg.model in ("sim", "din", "logreg")
    assert cfg.batch_size % 2 == 0  # runs on 1 or 2 ranks


def test_config_errors_are_collected():
    with pytest.raises(ConfigError) as info:
        load_config(CRMTrainConfig, None, ["model=dien", "crm.search=semantic", "lr_schedule=step"])
    msg = str(info.value)
    for expected in ("model must be one of", "crm.search: expected one of"):
        assert expected in msg, msg
    with pytest.raises(ConfigError, match="history_mode=retrieved needs retrieval_dir"):
        load_config(CRMTrainConfig, None, ["history_mode=retrieved", "retrieval_dir="])
    with pytest.raises(ConfigError, match="crm.search=soft is SIM's own search"):
        load_config(CRMTrainConfig, None, ["history_mode=retrieved", "crm.search=soft"])
    with pytest.raises(ConfigError, match=r"crm.short_term_length=21: at most 20, the short-term window"):
        load_config(CRMTrainConfig, None, ["crm.short_term_length=21"])
    assert load_config(CRMTrainConfig, None, ["model=din", "crm.short_term_length=21"]).model == "din"
    with pytest.raises(ValueError, match="divisible by the world size 3"):
        per_rank_batch(1024, 3)
    assert per_rank_batch(1024, 2) == 512


@pytest.mark.parametrize(
    ("overrides", "window"),
    [([], DEFAULT_RECENT_LENGTH), (["crm.short_term_length=0"], 0), (["model=din"], 0)],
)
def test_only_a_short_term_sim_trains_on_the_recent_window(data_dir, overrides, window):
    cfg = load_config(
        CRMTrainConfig, CONFIGS / "sim_quickstart.yaml", [f"data_dir={data_dir}", *TINY, *overrides]
    )
    assert load_config(CRMTrainConfig, CONFIGS / "sim_quickstart.yaml").crm.short_term_length > 0
    stage1 = CRMTrainConfig().crm  # no file: CRMConfig's defaults
    assert (stage1.short_term_length, stage1.behaviour_age) == (10, True)
    loader = build_loader(cfg, ProcessedDataset(data_dir), "valid", DistInfo(0, 0, 1))
    assert loader.recent_length == window
    assert ("recent_item" in next(iter(loader))) == bool(window)


def test_lr_schedules():
    assert [lr_factor(s, "constant", 4, 20) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(4, "linear", 4, 20) == 1.0 and lr_factor(12, "linear", 4, 20) == 0.5
    assert lr_factor(12, "cosine", 4, 20) == pytest.approx(0.5)
    assert lr_factor(20, "cosine", 4, 20) == pytest.approx(0.0)


# ----------------------------------------------------------------------------------------------------------
# Checkpoint folders and RNG states
# ----------------------------------------------------------------------------------------------------------


def test_a_checkpoint_left_as_old_by_a_kill_is_found(tmp_path):
    """A kill between atomic_dir's two renames leaves the previous folder as last.old: it is found."""
    target = tmp_path / "last"
    with files.atomic_dir(target) as tmp:
        (tmp / "crm.json").write_text("one")
    target.rename(tmp_path / "last.old")
    assert ckpt.resolve_checkpoint(target) == tmp_path / "last.old"
    assert ckpt.checkpoint_exists(target)
    assert not ckpt.checkpoint_exists(tmp_path / "nothing")


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    state = ckpt.rng_state()
    torch.save({"rng": [state]}, tmp_path / "s.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002 (the global RNG is the point)
    ckpt.set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["rng"][0])
    got = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_compare_crms_tool_scores_every_model_on_the_same_samples(finished_run, data_dir, capsys):
    """tools/compare_crms.py: the AUC, interval and paired test of each CRM on the same ids, against
    sklearn and the metrics module; a CRM against itself is within noise (p = 1)."""
    import importlib.util

    from sklearn.metrics import roc_auc_score

    from reclora_ds.metrics import auc_confidence_interval

    spec = importlib.util.spec_from_file_location("compare_crms", ROOT / "tools" / "compare_crms.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    args = ["--data", str(data_dir), "--split", "valid", "--max-samples", "500"]
    assert tool.main([*args, f"a={finished_run}", f"b={finished_run}"]) == 0
    out = capsys.readouterr().out
    assert "500 samples, the same for every model" in out and "within noise" in out
    ids = uniform_sample_ids(ProcessedDataset(data_dir), "valid", 500, seed=0)
    got_ids, _, logits = compute_crm_outputs(finished_run, data_dir, sample_ids=ids)
    table = (
        ProcessedDataset(data_dir)
        .read_split("valid", ["sample_id", "label"])
        .to_pandas()
        .set_index("sample_id")
    )
    labels = table.loc[ids, "label"].to_numpy()
    ci = auc_confidence_interval(labels, logits)
    assert ci.auc == pytest.approx(roc_auc_score(labels, logits), abs=1e-12)
    row_a = next(line for line in out.splitlines() if line.startswith("| a |"))
    assert f"{ci.auc:.4f}" in row_a and f"[{ci.low:.4f}, {ci.high:.4f}]" in row_a
    assert tool.main([*args, f"a={finished_run}", "b=/nonexistent"]) == 2
    assert "error:" in capsys.readouterr().err
