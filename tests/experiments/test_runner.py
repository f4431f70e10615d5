"""A tiny experiment end to end: ``reclora-ds experiment`` over the tiny pipeline (ML-1M sample of 100
users, tiny random Llama, tiny SIM, one rank), 2 stage-2 variants (LoRA, PLoRA) and a CRM row x 2 seeds.

Checked: the shared stages ran once (their records and logs); every variant x seed has its own stage-2
folder reading the shared CRM; results.csv equals values recomputed here from the predictions files (and
from the CRM for its row); the significance columns equal an independent bootstrap loop and DeLong's
definition; the figure and the HParams events exist and hold the settings and metrics; a rerun runs nothing.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from scipy import stats
from sklearn.metrics import log_loss, roc_auc_score

from tests.experiments.test_aggregate import brute_delong, reference_bootstrap
from tests.experiments.tiny import tiny_spec

pytestmark = [pytest.mark.slow]

SHARED = ("prepare", "backbone", "embeddings", "index", "retrieval")
CELLS = [("lora_r2", "lora"), ("plora_n3", "plora")]
SEEDS = (1, 2)


def experiment(spec: Path, *extra: str) -> subprocess.CompletedProcess:
    run = subprocess.run(
        [sys.executable, "-m", "reclora_ds", "experiment", "--config", str(spec), *extra],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return run


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def predictions(root: Path, variant: str, mode: str, seed: int):
    pred = pq.read_table(
        root / "runs" / variant / f"seed{seed}" / mode / "predictions_test.parquet"
    ).to_pandas()
    return pred.sort_values("sample_id", kind="stable").reset_index(drop=True)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, ml1m_dir, plora_assets):
    tmp = tmp_path_factory.mktemp("experiment")
    spec = tiny_spec(
        tmp, ml1m_dir, plora_assets["backbone"], crm_row=True, comparisons=[["plora_n3", "lora_r2"]]
    )
    first = experiment(spec)
    return spec, tmp / "runs" / "tiny", tmp / "runs" / "_stages", first


def test_shared_stages_ran_once_and_every_run_has_its_own_folder(finished):
    _, root, store, first = finished
    records = {p.stem: json.loads(p.read_text()) for p in (store / "_records").glob("*.json")}
    for stage in SHARED:
        (key,) = [k for k in records if k.startswith(f"{stage}-")]
        assert records[key]["status"] == "done"
        log = store / "_records" / f"{key}.log"
        if stage != "backbone":  # a backbone folder has no command to run
            assert log.read_text().count("\n$ ") + log.read_text().startswith("$ ") == 1  # one launch
    sims = sorted(k for k in records if k.startswith("sim-"))
    assert len(sims) == 3  # the LLM rows' CRM (sim.seed 42), and the CRM row's seeds 1 and 2
    shared_crm = None
    for variant, mode in CELLS:
        for seed in SEEDS:
            folder = root / "runs" / variant / f"seed{seed}" / mode
            assert (folder / "predictions_test.parquet").is_file() and (folder / "metrics.json").is_file()
            cfg = yaml.safe_load((folder / "stage_config.yaml").read_text())["plora"]
            assert cfg["seed"] == seed and cfg["mode"] == mode
            shared_crm = shared_crm or cfg["crm_path"]
            assert cfg["crm_path"] == shared_crm and Path(shared_crm).parent == store
            record = json.loads((root / "_records" / variant / f"seed{seed}" / f"{mode}.json").read_text())
            assert record["status"] == "done"
    assert "computed once" in first.stdout


def test_the_table_equals_a_recomputation_from_the_predictions(finished):
    from reclora_ds.training.crm_states import compute_crm_outputs

    _, root, store, _ = finished
    rows = {r["variant"]: r for r in read_csv(root / "results.csv")}
    assert list(rows) == ["lora_r2", "plora_n3", "crm_sim"]
    recomputed = {}
    for variant, mode in CELLS:
        aucs, losses, times = [], [], []
        for seed in SEEDS:
            pred = predictions(root, variant, mode, seed)
            assert len(pred) == 48
            aucs.append(roc_auc_score(pred["label"], pred["p"]))
            losses.append(log_loss(pred["label"], np.clip(pred["p"], 1e-7, 1 - 1e-7)))
            perf = json.loads((root / "runs" / variant / f"seed{seed}" / mode / "metrics.json").read_text())[
                "perf"
            ]
            times.append(perf["train_s_per_sample"])
        recomputed[variant] = (aucs, losses, times)
    # the CRM row: the CRM of each seed on the LLM rows' 48 test ids
    ids = predictions(root, "plora_n3", "plora", 1)["sample_id"].to_numpy()
    labels = predictions(root, "plora_n3", "plora", 1)["label"].to_numpy()
    prepare = next(store.glob("prepare-*"))
    crm_aucs = []
    for seed in SEEDS:
        (crm,) = [
            d for d in store.glob("sim-*")
            if yaml.safe_load((d / "stage_config.yaml").read_text())["seed"] == seed
        ]  # fmt: skip
        _, _, logits = compute_crm_outputs(crm, prepare, sample_ids=ids)
        crm_aucs.append(roc_auc_score(labels, logits))
    recomputed["crm_sim"] = (crm_aucs, None, None)

    ref = np.mean(recomputed["plora_n3"][0])
    for variant, (aucs, losses, times) in recomputed.items():
        row = rows[variant]
        assert int(row["seeds"]) == 2 and int(row["n_test"]) == 48
        assert float(row["auc_mean"]) == pytest.approx(np.mean(aucs), abs=1e-9)
        assert float(row["auc_std"]) == pytest.approx(np.std(aucs, ddof=1), abs=1e-9)
        half = stats.t.ppf(0.975, 1) * np.std(aucs, ddof=1) / math.sqrt(2)
        assert float(row["auc_ci_low"]) == pytest.approx(np.mean(aucs) - half, abs=1e-9)
        assert float(row["auc_rel"]) == pytest.approx((np.mean(aucs) - ref) / ref, abs=1e-9)
        if losses is not None:
            assert float(row["logloss_mean"]) == pytest.approx(np.mean(losses), abs=1e-4)
            assert float(row["train_s_per_sample_mean"]) == pytest.approx(np.mean(times), rel=1e-9)
        else:
            assert row["train_s_per_sample_mean"] == "nan"  # no stage 2 in a CRM row
    per_seed = read_csv(root / "per_seed.csv")
    assert len(per_seed) == 6


def test_significance_matches_an_independent_computation(finished):
    spec, root, _, _ = finished
    rows = {r["variant"]: r for r in read_csv(root / "results.csv")}
    lora = [predictions(root, "lora_r2", "lora", s) for s in SEEDS]
    plora = [predictions(root, "plora_n3", "plora", s) for s in SEEDS]
    y = plora[0]["label"].to_numpy()
    assert all((p["sample_id"] == plora[0]["sample_id"]).all() for p in (*lora, *plora))
    observed, _, p = reference_bootstrap(
        y, np.stack([d["p"] for d in lora]), np.stack([d["p"] for d in plora]), 400, 3
    )
    assert float(rows["lora_r2"]["auc_diff"]) == pytest.approx(observed, abs=1e-9)
    assert float(rows["lora_r2"]["p_bootstrap"]) == pytest.approx(p, rel=1e-12)
    p_delong = max(brute_delong(y, lora[i]["p"].to_numpy(), plora[i]["p"].to_numpy())[1] for i in range(2))
    assert float(rows["lora_r2"]["p_delong_max"]) == pytest.approx(p_delong, rel=1e-6)
    assert rows["lora_r2"]["significant"] == ("yes" if p < 0.01 else "no")
    assert rows["plora_n3"]["p_bootstrap"] == "nan"  # the reference row
    # the spec's comparison [plora_n3, lora_r2]: the same tests the other way round, recomputed
    (comparison,) = read_csv(root / "comparisons.csv")
    assert (comparison["row"], comparison["against"]) == ("plora_n3", "lora_r2")
    observed, _, p = reference_bootstrap(
        y, np.stack([d["p"] for d in plora]), np.stack([d["p"] for d in lora]), 400, 3
    )
    assert float(comparison["auc_diff"]) == pytest.approx(observed, abs=1e-9)
    assert float(comparison["p_bootstrap"]) == pytest.approx(p, rel=1e-12)
    assert float(comparison["p_delong_max"]) == pytest.approx(p_delong, rel=1e-6)  # symmetric in the rows
    assert float(comparison["auc_row"]) == pytest.approx(float(rows["plora_n3"]["auc_mean"]), abs=1e-12)
    text = (root / "results.md").read_text()
    assert "| **PLoRA N_m=3** |" in text and "p (bootstrap)" in text
    assert "| PLoRA N_m=3 | LoRA r=2 |" in text  # the comparisons table


def test_figure_and_hparams_events_exist_and_hold_the_settings(finished):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    _, root, _, _ = finished
    assert (root / "tiny.png").stat().st_size > 10_000
    rows = {r["variant"]: r for r in read_csv(root / "results.csv")}
    for variant, experts, rank in (("lora_r2", 2, 2), ("plora_n3", 3, 4), ("crm_sim", 2, 4)):  # base: 2 and 4
        acc = EventAccumulator(str(root / "tb" / variant))
        acc.Reload()
        content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
        assert hparams["plora.adapter.num_experts"].number_value == experts
        assert hparams["plora.lora_rank"].number_value == rank
        assert hparams["mode"].string_value in ("lora", "plora", "crm")
        (event,) = acc.Scalars("hparam/auc_mean")
        assert event.value == pytest.approx(float(rows[variant]["auc_mean"]), abs=1e-6)


def test_a_rerun_runs_nothing_and_rewrites_the_same_table(finished):
    spec, root, store, _ = finished
    before = (root / "results.csv").read_text()
    logs = {
        p: p.read_text() for p in [*(store / "_records").glob("*.log"), *(root / "_records").rglob("*.log")]
    }
    second = experiment(spec)
    assert " run " not in second.stdout and "skip" in second.stdout
    assert (root / "results.csv").read_text() == before
    assert all(p.read_text() == text for p, text in logs.items())  # no stage launched again
