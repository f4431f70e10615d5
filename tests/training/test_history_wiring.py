"""The paper's wiring (App. B.2): one retrieval over each sample's whole prior history feeds the CRM (top-60)
and the prompt (top-10), in stage 1 and in stage 2 alike.

The rows every loader gives are checked against an independent brute force written here: for each sample,
the cosine of the target item with every earlier behaviour of its user (float64, a Python loop), the 60
(or 10) best, ties to the more recent, re-sorted into time order. Also: the ablations' recent histories,
the refusal of a retrieval the CRM was not trained on, and evaluation subsets that do not depend on the
number of ranks (1 and 2 ranks score the same ids with the same predictions).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from reclora_ds.data.histories import load_retrieved
from reclora_ds.data.loader import uniform_sample_ids
from reclora_ds.data.processed import ProcessedDataset
from reclora_ds.distributed import DistInfo, free_port
from reclora_ds.models.crm import CRMConfig, FeatureSpec
from reclora_ds.models.registry import build_crm
from reclora_ds.retrieval.index import (
    load_index,
)
from reclora_ds.retrieval.retriever import retrieve_histories
from reclora_ds.training.checkpoint import CheckpointError, CRMCheckpointInfo, load_crm, save_crm_checkpoint
from reclora_ds.training.crm_config import CRMTrainConfig
from reclora_ds.training.crm_recipe import build_loader
from reclora_ds.training.plora_config import PLoRATrainConfig
from reclora_ds.training.plora_data import PLoRABatchLoader, history_settings
from tests.item_index import build_item_index
from tests.launch import clean_env

ROOT = Path(__file__).parents[2]
K_LONG, K_SHORT = 60, 10


@pytest.fixture(scope="module")
def retrieval(tmp_path_factory, ml1m_prepared):
    """Genre-clustered item embeddings of the ML-1M sample, their PCA + FAISS index, the retrieval folder."""
    root = tmp_path_factory.mktemp("wiring")
    data = Path(ml1m_prepared.output_dir)
    ds = ProcessedDataset(data)
    build_item_index(data, root, dim=24, components=16, noise=1.0, seed=3)
    retrieve_histories(data, root / "index", ks=(K_LONG, K_SHORT), out_dir=root / "retrieval")
    return {
        "data": data,
        "ds": ds,
        "folder": root / "retrieval",
        "vectors": load_index(root / "index").vectors().astype(np.float64),
        "root": root,
    }


def brute_force_rows(ds: ProcessedDataset, vectors: np.ndarray, sample: dict, k: int) -> list[int]:
    """Timeline rows of the k behaviours most similar to the target, in time order (plain Python)."""
    tl = ds.timelines
    start, h = int(tl.offsets[sample["user_index"]]), int(sample["hist_len"])
    target = vectors[sample["item_index"]]
    scored = [(float(vectors[tl.item_index[start + j]] @ target), j) for j in range(h)]
    best = sorted(scored, key=lambda sj: (-sj[0], -sj[1]))[:k]  # ties: the more recent behaviour wins
    return sorted(start + j for _, j in best)


def most_recent_rows(ds: ProcessedDataset, sample: dict, k: int) -> list[int]:
    start, h = int(ds.timelines.offsets[sample["user_index"]]), int(sample["hist_len"])
    return list(range(start + max(0, h - k), start + h))


def samples_by_id(ds: ProcessedDataset, split: str) -> dict[int, dict]:
    rows = ds.read_split(split, ["sample_id", "user_index", "item_index", "hist_len"]).to_pylist()
    return {r["sample_id"]: r for r in rows}


def encoded_items(ds: ProcessedDataset, rows: list[int], length: int) -> list[int]:
    """The batch's ``hist_item`` of these timeline rows: encoded item ids, right-aligned, 0-padded."""
    item_ids = ds.items.column("item_id").to_numpy()
    return [0] * (length - len(rows)) + [int(item_ids[ds.timelines.item_index[r]]) for r in rows]


def check_long_rows(ds, vectors, split, batch, length, *, retrieved=True):
    by_id = samples_by_id(ds, split)
    checked = 0
    for j, sid in enumerate(batch["sample_id"].tolist()):
        sample = by_id[sid]
        rows = (
            brute_force_rows(ds, vectors, sample, length)
            if retrieved
            else most_recent_rows(ds, sample, length)
        )
        assert batch["hist_item"][j].tolist() == encoded_items(ds, rows, length), sid
        assert int(batch["hist_len"][j]) == len(rows)
        checked += sample["hist_len"] > length  # a real selection, not the whole history
    return checked


def check_short_term_rows(ds, split, batch):
    """SIM's short-term window (``recent_*``) holds the most recent behaviours, with their ages."""
    by_id = samples_by_id(ds, split)
    window = batch["recent_item"].shape[1]
    for j, sid in enumerate(batch["sample_id"].tolist()):
        rows = most_recent_rows(ds, by_id[sid], window)
        assert batch["recent_item"][j].tolist() == encoded_items(ds, rows, window), sid
        assert batch["recent_age"][j].tolist() == [0] * (window - len(rows)) + list(range(len(rows), 0, -1))


def test_stage_one_crm_gets_the_brute_force_top_60_of_the_whole_history(retrieval):
    ds, vectors = retrieval["ds"], retrieval["vectors"]
    cfg = CRMTrainConfig(
        data_dir=str(retrieval["data"]), retrieval_dir=str(retrieval["folder"]), output_dir="unused"
    )
    assert (cfg.history_mode, cfg.history_length, cfg.crm.search) == ("retrieved", K_LONG, "precomputed")
    selections = 0
    for split in ("train", "valid", "test"):
        loader = build_loader(cfg, ds, split, DistInfo())
        batch = next(iter(loader))
        idx = torch.arange(0, len(batch["sample_id"]), max(1, len(batch["sample_id"]) // 40))
        selections += check_long_rows(ds, vectors, split, {k: v[idx] for k, v in batch.items()}, K_LONG)
        check_short_term_rows(ds, split, {k: v[idx] for k, v in batch.items()})  # the stage-1 SIM reads it
    assert selections > 20  # many samples have more than 60 prior behaviours: the retrieval chose


@pytest.fixture(scope="module")
def retrieved_crm(retrieval):
    """A (random) stage-1 SIM checkpoint trained, as its crm.json says, on the retrieval folder's top-60
    (with the short-term unit and behaviour ages of stage 1's default)."""
    spec = FeatureSpec.from_metadata(retrieval["ds"].metadata)
    config = CRMConfig(embedding_dim=8, attention_hidden=16, tower=(16, 16))
    crm = build_crm("sim", config, spec)
    folder = load_retrieved(retrieval["folder"], retrieval["data"])
    info = CRMCheckpointInfo(
        model="sim", config=config, feature_spec=spec, hidden_dim=crm.hidden_dim, history_mode="retrieved",
        history_length=K_LONG, retrieval_dir=str(retrieval["folder"]), retrieval_sha256=folder.sidecar_sha256,
    )  # fmt: skip
    save_crm_checkpoint(retrieval["root"] / "crm", crm, info)
    return retrieval["root"] / "crm"


def stage_two_loader(retrieval, crm_path, backbone, split, **cfg_overrides):
    from transformers import AutoTokenizer

    from reclora_ds.data.prompts import PromptEncoder

    cfg = PLoRATrainConfig(
        data_dir=str(retrieval["data"]), crm_path=str(crm_path), backbone=backbone,
        retrieval_dir=str(retrieval["folder"]), **cfg_overrides,
    )  # fmt: skip
    _, info = load_crm(crm_path)
    encoder = PromptEncoder(AutoTokenizer.from_pretrained(backbone), "ml-1m")
    return PLoRABatchLoader(
        retrieval["ds"], split, 48, encoder, with_answer=False, **history_settings(cfg, info)
    )


def check_prompt_rows(loader, ds, vectors, split, k, *, retrieved):
    by_id = samples_by_id(ds, split)
    table = ds.read_split(split, ["sample_id", "user_index", "item_index", "hist_len"]).slice(0, 48)
    cols = {c: table.column(c).to_numpy().astype(np.int64) for c in table.column_names}
    titles = ds.items.column("title").to_pylist()
    for view, sid in zip(loader.build_text_views(cols), cols["sample_id"].tolist()):
        sample = by_id[sid]
        rows = brute_force_rows(ds, vectors, sample, k) if retrieved else most_recent_rows(ds, sample, k)
        expected = [(titles[ds.timelines.item_index[r]], float(ds.timelines.rating[r])) for r in rows]
        assert list(view.history) == expected, sid


def test_stage_two_feeds_the_frozen_crm_the_rows_it_was_trained_on(retrieval, retrieved_crm, plora_assets):
    ds, vectors = retrieval["ds"], retrieval["vectors"]
    for split in ("fewshot", "test"):
        loader = stage_two_loader(retrieval, retrieved_crm, plora_assets["backbone"], split)
        assert loader.history_mode == "retrieved" and loader.history_length == K_LONG
        batch = next(iter(loader))
        check_long_rows(ds, vectors, split, batch, K_LONG)
        check_short_term_rows(ds, split, batch)
        check_prompt_rows(loader, ds, vectors, split, K_SHORT, retrieved=True)
        crm, _ = load_crm(retrieved_crm)  # the frozen CRM scores stage 2's batch as stage 1's
        assert torch.isfinite(crm(batch).hidden).all()


def test_ablations_give_the_most_recent_behaviours(retrieval, retrieved_crm, plora_assets):
    ds, vectors = retrieval["ds"], retrieval["vectors"]
    # "w/o short retriever": the most recent 10 in the prompt; the CRM keeps its retrieved 60
    loader = stage_two_loader(
        retrieval, retrieved_crm, plora_assets["backbone"], "test", short_history="recent"
    )
    check_prompt_rows(loader, ds, vectors, "test", K_SHORT, retrieved=False)
    check_long_rows(ds, vectors, "test", next(iter(loader)), K_LONG)
    # "w/o long retriever" at stage 1: the CRM on the most recent 60 (DIN on them: no search in the model)
    cfg = CRMTrainConfig(data_dir=str(retrieval["data"]), history_mode="recent", output_dir="unused")
    batch = next(iter(build_loader(cfg, ds, "test", DistInfo())))
    check_long_rows(ds, vectors, "test", batch, K_LONG, retrieved=False)


def test_a_retrieval_the_crm_was_not_trained_on_is_refused(retrieval, retrieved_crm, tmp_path):
    import shutil

    moved = tmp_path / "crm"
    shutil.copytree(retrieved_crm, moved)
    other = tmp_path / "retrieval"
    shutil.copytree(retrieval["folder"], other)
    side = json.loads((other / "retrieval.json").read_text())
    side["timings_s"]["total"] += 1.0  # a re-run retrieval: another sidecar
    (other / "retrieval.json").write_text(json.dumps(side))
    crm_json = moved / "crm.json"
    data = json.loads(crm_json.read_text())
    data["history"]["retrieval_dir"] = str(other)
    crm_json.write_text(json.dumps(data))
    _, info = load_crm(moved)
    with pytest.raises(CheckpointError, match="not the retrieval this CRM was trained on"):
        info.history_loader_kwargs(retrieval["data"])


@pytest.mark.distributed
@pytest.mark.slow
def test_one_and_two_ranks_evaluate_the_same_uniform_ids_with_the_same_predictions(plora_assets, tmp_path):
    """eval_max_samples draws a seeded uniform set of ids: 1 and 2 torchrun ranks score the same ids, and the
    same p(yes) for each (up to float noise from different left-padding within batches)."""
    preds = {}
    for nproc in (1, 2):
        out = tmp_path / f"w{nproc}"
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", str(ROOT / "launch" / "train_plora.py"),
            "--config", str(ROOT / "launch" / "configs" / "plora_quickstart.yaml"),
            f"data_dir={plora_assets['data_dir']}", f"output_dir={out}", f"crm_path={plora_assets['crm_path']}",
            f"backbone={plora_assets['backbone']}", "mode=zero_shot", "short_history=recent",
            "short_history_length=3", "eval_max_samples=37", "eval_batch_size=5", "eval_splits=[test]",
            "deepspeed_config=ds_configs/zero2_fp32.json", "progress=false",
        ]  # fmt: skip
        run = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
        preds[nproc] = pq.read_table(out / "predictions_test.parquet").to_pandas().sort_values("sample_id")
        metrics = json.loads((out / "metrics.json").read_text())["test"]
        assert metrics["n"] == 37 and metrics["auc_low"] <= metrics["auc"] <= metrics["auc_high"]
    expected_ids = uniform_sample_ids(ProcessedDataset(plora_assets["data_dir"]), "test", 37, seed=0)
    for nproc in (1, 2):
        assert np.array_equal(preds[nproc]["sample_id"].to_numpy(), expected_ids)
    np.testing.assert_allclose(preds[1]["p"].to_numpy(), preds[2]["p"].to_numpy(), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(preds[1]["label"].to_numpy(), preds[2]["label"].to_numpy())
