"""The main job end to end on tiny real data: ``reclora-ds pipeline`` with 2 ranks (torchrun, deepspeed).

One module-scoped run (ML-1M sample of 100 users, tiny random Llama, tiny SIM) is checked for: every stage
finished and recorded; the report's numbers equal metrics recomputed here with scikit-learn from the
per-sample predictions; TensorBoard event files under ``runs/<name>/<stage>/tb`` hold the expected scalars;
a rerun skips every stage; a changed setting redoes exactly the stages downstream of it; ``--from``.
Then a run killed (SIGKILL, whole process group) in the middle of the PLoRA stage resumes from its last
checkpoint on the next run and completes.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from sklearn.metrics import log_loss, roc_auc_score

from reclora_ds.metrics import group_auc
from reclora_ds.pipeline.config import load_pipeline_settings
from reclora_ds.pipeline.runner import PipelineRunner
from tests.pipeline.tiny import tiny_config

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STAGES = [
    "prepare",
    "backbone",
    "embeddings",
    "index",
    "retrieval",
    "sim",
    "lora",
    "plora",
    "report",
]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def pipeline_cmd(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "reclora_ds", "pipeline", "--config", str(config), *extra]


def run_pipeline(config: Path, *extra: str) -> subprocess.CompletedProcess:
    run = subprocess.run(pipeline_cmd(config, *extra), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return run


def planned_actions(config: Path, *overrides: str, from_stage: str | None = None) -> dict[str, str]:
    runner = PipelineRunner(load_pipeline_settings(config, overrides), from_stage)
    return {p.stage.name: p.action for p in runner.plan()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, ml1m_dir, plora_assets):
    tmp = tmp_path_factory.mktemp("pipeline")
    config = tiny_config(tmp, ml1m_dir, plora_assets["backbone"], "tiny")
    first = run_pipeline(config)
    return config, tmp / "runs" / "tiny", first


def test_every_stage_ran_and_was_recorded(finished):
    config, run_dir, first = finished
    for stage in STAGES:
        record = json.loads((run_dir / "_pipeline" / f"{stage}.json").read_text())
        assert record["status"] == "done" and record["wall_s"] >= 0, record
    assert (run_dir / "report.md").is_file() and (run_dir / "results.png").stat().st_size > 10_000
    # the CRM trained on the retrieval stage's top-K (the paper's wiring), and says so
    crm = json.loads((run_dir / "sim" / "checkpoints" / "best" / "crm.json").read_text())
    assert crm["history"]["mode"] == "retrieved" and crm["history"]["length"] == 20
    assert Path(crm["history"]["retrieval_dir"]) == (run_dir / "retrieval").resolve()
    retrieval = json.loads((run_dir / "retrieval" / "retrieval.json").read_text())
    assert retrieval["ks"] == [20, 3]  # sim.history_length and plora.short_history_length
    assert not (run_dir / "crm_states").exists()  # stage 2 computes the frozen CRM's state itself
    times = read_csv(run_dir / "stage_times.csv")
    assert [t["stage"] for t in times] == STAGES[:-1]  # the report records itself after writing


def test_report_numbers_equal_an_independent_recomputation(finished):
    _, run_dir, _ = finished
    rows = read_csv(run_dir / "results.csv")
    sim_all = json.loads((run_dir / "sim" / "metrics.json").read_text())["test"]
    assert float(rows[0]["auc"]) == pytest.approx(sim_all["auc"])
    for mode in ("lora", "plora"):
        pred = pq.read_table(run_dir / mode / "predictions_test.parquet").to_pandas()
        assert len(pred) == 48 and pred["sample_id"].is_unique
        (row,) = [r for r in rows if r["model"] == mode]
        y, p = pred["label"].to_numpy(), pred["p"].to_numpy()
        assert float(row["auc"]) == pytest.approx(roc_auc_score(y, p), abs=1e-9)
        assert float(row["logloss"]) == pytest.approx(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7)), abs=1e-4)
        assert float(row["gauc"]) == pytest.approx(group_auc(pred["user_index"], y, p), abs=1e-9)
        # the recipe's own metrics over the same samples
        assert float(row["auc"]) == pytest.approx(
            json.loads((run_dir / mode / "metrics.json").read_text())["test"]["auc"]
        )
        assert int(float(row["n"])) == 48
    # lora and plora evaluated the same 48 samples: one sim row on them, recomputed here from the CRM
    (sim_row,) = [r for r in rows if r["model"] == "sim" and r["eval_set"] != "test (all)"]
    assert {r["eval_set"] for r in rows if r["model"] != "sim"} == {sim_row["eval_set"]}
    from reclora_ds.training.crm_states import compute_crm_outputs

    pred = pq.read_table(run_dir / "plora" / "predictions_test.parquet").to_pandas()
    _, _, logits = compute_crm_outputs(run_dir / "sim", run_dir / "prepare", sample_ids=pred["sample_id"])
    assert float(sim_row["auc"]) == pytest.approx(roc_auc_score(pred["label"], logits), abs=1e-9)
    # every AUC has its interval; the paired tests compare models on the same ids only
    assert all(float(r["auc_low"]) <= float(r["auc"]) <= float(r["auc_high"]) for r in rows)
    tests = read_csv(run_dir / "paired_tests.csv")
    assert {(t["a"], t["b"]) for t in tests} == {("sim", "lora"), ("sim", "plora"), ("lora", "plora")}
    auc_of = {r["model"]: float(r["auc"]) for r in rows if r["eval_set"] == sim_row["eval_set"]}
    for t in tests:
        assert t["eval_set"] == sim_row["eval_set"] and int(t["n"]) == 48
        assert float(t["diff"]) == pytest.approx(auc_of[t["a"]] - auc_of[t["b"]], abs=1e-9)
        assert 0.0 <= float(t["p_value"]) <= 1.0


def test_tensorboard_event_files_hold_the_scalars(finished):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir, _ = finished
    expected = {
        "sim": {"train/loss", "train/lr", "eval/auc", "eval/logloss", "eval/gauc", "perf/samples_per_s"},
        # stage 2's first eval split (here the only one, test) is logged as eval/*
        "lora": {"train/loss", "train/lr", "eval/auc", "eval/logloss", "eval/gauc"},
        "plora": {"train/loss", "train/lr", "eval/auc", "gate/entropy"},
    }
    for stage, tags in expected.items():
        acc = EventAccumulator(str(run_dir / stage / "tb"))
        acc.Reload()
        scalars = set(acc.Tags()["scalars"])
        assert tags <= scalars, (stage, tags - scalars)
        losses = [e.value for e in acc.Scalars("train/loss")]
        assert losses and all(np.isfinite(losses))
    acc = EventAccumulator(str(run_dir / "plora" / "tb"))
    acc.Reload()
    entropy = [e.value for e in acc.Scalars("gate/entropy")]
    assert all(0 <= v <= np.log(2) + 1e-6 for v in entropy)  # 2 experts
    assert any(t.startswith("gate/expert_usage") for t in acc.Tags()["scalars"])


def test_rerun_skips_everything_and_changes_redo_only_downstream(finished):
    config, run_dir, _ = finished
    before = {
        s: json.loads((run_dir / "_pipeline" / f"{s}.json").read_text())["finished"] for s in STAGES[:-1]
    }
    assert planned_actions(config) == {**{s: "skip" for s in STAGES[:-1]}, "report": "run"}
    second = run_pipeline(config)
    assert "finished in" in second.stdout
    after = {
        s: json.loads((run_dir / "_pipeline" / f"{s}.json").read_text())["finished"] for s in STAGES[:-1]
    }
    assert after == before  # nothing was redone

    changed = planned_actions(config, "sim.lr=0.002")
    assert changed == {
        "prepare": "skip", "backbone": "skip", "embeddings": "skip", "index": "skip", "retrieval": "skip",
        "sim": "redo", "lora": "redo", "plora": "redo", "report": "run",
    }  # fmt: skip
    assert planned_actions(config, "plora.adapter.num_experts=3")["lora"] == "redo"  # shared section
    shorter = planned_actions(config, "plora.short_history_length=4")  # K_short 4: a new retrieval
    assert shorter["embeddings"] == shorter["index"] == "skip" and shorter["retrieval"] == "redo"
    # "w/o long retriever": the CRM on the most recent 20, no longer reading the retrieval
    no_long = PipelineRunner(load_pipeline_settings(config, ["sim.history_mode=recent"])).plan()
    assert {p.stage.name: p.stage.inputs for p in no_long}["sim"] == ("prepare",)
    # "w/o long-short retriever": nothing reads a retrieval, so no embeddings, index or retrieval stage
    neither = planned_actions(config, "sim.history_mode=recent", "plora.short_history=recent")
    assert list(neither) == ["prepare", "backbone", "sim", "lora", "plora", "report"]
    forced = planned_actions(config, from_stage="index")
    assert [s for s, a in forced.items() if a == "forced"] == STAGES[STAGES.index("index") :]


def test_a_changed_raw_file_makes_prepare_and_all_after_it_stale(finished, tmp_path):
    """Over a copy of the raw files: unchanged -> every stage skipped; one rating of ratings.dat changed
    -> prepare and every stage after it redone, the backbone skipped."""
    import shutil

    config, _, _ = finished
    raw = tmp_path / "raw"
    shutil.copytree(yaml.safe_load(config.read_text())["prepare"]["raw_dir"], raw)
    data = yaml.safe_load(config.read_text())
    data["prepare"]["raw_dir"] = str(raw)
    data["pipeline"]["runs_dir"] = str(tmp_path / "runs")
    copied = tmp_path / "copied.yaml"
    copied.write_text(yaml.safe_dump(data))
    # records of a finished run over the copied raw files (the plan reads only their hash and status)
    runner = PipelineRunner(load_pipeline_settings(copied))
    for item in runner.plan():
        runner._write_record(item.stage.name, {"stage": item.stage.name, "hash": item.hash, "status": "done"})
    assert set(planned_actions(copied).values()) == {"skip", "run"}

    ratings = raw / "ratings.dat"
    lines = ratings.read_text(encoding="latin-1").splitlines(keepends=True)
    user, item, rating, ts = lines[0].rstrip("\n").split("::")
    lines[0] = f"{user}::{item}::{6 - int(rating)}::{ts}\n"
    ratings.write_text("".join(lines), encoding="latin-1")
    actions = planned_actions(copied)
    assert actions["backbone"] == "skip"
    assert all(actions[s] == "redo" for s in STAGES if s not in ("backbone", "report")), actions


def test_bad_settings_are_reported_together_before_any_work(tmp_path, ml1m_dir):
    config = tiny_config(tmp_path, ml1m_dir, "default", "bad")
    run = subprocess.run(
        pipeline_cmd(config, "sim.epochz=1", "pipeline.modes=[plora, lora3]", "plora.lr=fast", "nosection.x=1"),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2
    for needle in ("epochz", "lora3", "plora", "nosection"):
        assert needle in run.stderr
    assert not (tmp_path / "runs").exists()


def test_killed_in_plora_resumes_from_its_checkpoint(tmp_path, ml1m_dir, plora_assets):
    # Tiny steps take ~30 ms: 600 of them with a checkpoint every 50 leave many seconds between the first
    # checkpoint (the kill) and the end of training, on a quiet machine too.
    steps = 600
    config = tiny_config(
        tmp_path,
        ml1m_dir,
        plora_assets["backbone"],
        "killed",
        epochs=20,
        max_steps=steps,
        checkpoint_every=50,
    )
    run_dir = tmp_path / "runs" / "killed"
    latest = run_dir / "plora" / "checkpoints" / "latest"
    deadline = time.time() + 600
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(
            pipeline_cmd(config), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        while not latest.is_file():
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "no PLoRA checkpoint within 10 minutes"
            time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the pipeline, its launcher and every rank
    proc.wait()
    assert not (run_dir / "plora" / "metrics.json").exists()
    assert json.loads((run_dir / "_pipeline" / "plora.json").read_text())["status"] == "running"
    actions = planned_actions(config)
    assert actions["lora"] == "skip" and actions["plora"] == "resume"

    run_pipeline(config)
    metrics = json.loads((run_dir / "plora" / "metrics.json").read_text())
    assert metrics["resumed_from"], "the rerun started PLoRA from scratch"
    assert metrics["steps"] == steps
    assert json.loads((run_dir / "_pipeline" / "plora.json").read_text())["status"] == "done"


def test_export_user_lora_computes_the_state_with_the_runs_crm(finished, tmp_path):
    """A pipeline run has no CRM-states stage: the export_user_lora command gets the sample's state from the
    run's CRM, and its gate weights equal the ones stage 2 computes for that sample in a batch."""
    import torch

    from reclora_ds.commands import export_user_lora as tool
    from reclora_ds.data.processed import ProcessedDataset
    from reclora_ds.training.scoring import eval_loader, load_scoring_model

    _, run_dir, _ = finished
    sid = int(pq.read_table(run_dir / "plora" / "predictions_test.parquet")["sample_id"][3].as_py())
    assert tool.main(["--run-dir", str(run_dir), "--sample-id", str(sid), "--out", str(tmp_path / "e")]) == 0
    exported = json.loads((tmp_path / "e" / "personalization.json").read_text())["gate_weights"]

    scoring = load_scoring_model(run_dir / "plora")
    ds = ProcessedDataset(run_dir / "prepare")
    (batch,) = list(eval_loader(scoring, ds, "test", 4, sample_ids=np.array([sid])))
    with torch.no_grad():
        in_stage_two = scoring.model.gate_weights(batch)[:, 0].numpy()  # [G, N]
    np.testing.assert_allclose(np.array(list(exported.values())), in_stage_two, atol=1e-6)
