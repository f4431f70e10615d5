"""Stage 2 end to end on the real ML-1M sample with a tiny random Llama and a tiny random SIM checkpoint.

* the stage-2 loader: both views of a row belong to the same sample, ranks read disjoint files, exact resume;
* the DeepSpeed config resolution and every shipped ``plora_*.yaml``;
* ``zero_shot`` and ``lora`` runs of the recipe in this process;
* a 2-rank DeepSpeed ZeRO-2 run through the real entry point (``deepspeed --num_gpus 2``, CPU, gloo);
* SIGKILL after the first checkpoint, rerun: it resumes there and ends with the uninterrupted run's adapter.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import LlamaForCausalLM

from reclora_ds.config import load_config
from reclora_ds.cpu import kernels as cpu_kernels
from reclora_ds.cpu.allocator import MMAP_THRESHOLD
from reclora_ds.data.processed import ProcessedDataset
from reclora_ds.data.prompts import PromptEncoder, TextView
from reclora_ds.data.text import text_views
from reclora_ds.distributed import free_port
from reclora_ds.models.inject import inject_plora
from reclora_ds.training.adapter_io import load_plora_adapter, read_plora_adapter_config
from reclora_ds.training.plora_config import PLoRATrainConfig
from reclora_ds.training.plora_data import PLoRABatchLoader
from reclora_ds.training.plora_recipe import (
    TRAIN_PHASES,
    find_ds_config,
    resolve_ds_config,
    run_plora_training,
)
from tests.launch import clean_env, deepspeed

ROOT = Path(__file__).parents[2]
ENTRY = ROOT / "launch" / "train_plora.py"
QUICKSTART = ROOT / "launch" / "configs" / "plora_quickstart.yaml"
CRM_HISTORY = 20  # the history length of the plora_assets CRM (tests/conftest.py)


def overrides(plora_assets: dict[str, str], out: Path, *extra: str) -> list[str]:
    return [
        f"data_dir={plora_assets['data_dir']}",
        f"output_dir={out}",
        f"crm_path={plora_assets['crm_path']}",
        f"backbone={plora_assets['backbone']}",
        "deepspeed_config=ds_configs/zero2_fp32.json",
        "short_history=recent",
        "adapter.num_experts=4",
        "lr=0.01",
        "progress=false",
        *extra,
    ]


# ----------------------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", sorted((ROOT / "launch" / "configs").glob("plora_*.yaml")), ids=lambda p: p.name
)
def test_shipped_configs_parse_and_resolve(path):
    cfg = load_config(PLoRATrainConfig, path, section="plora")
    assert cfg.mode == "plora" and cfg.weight_decay == 0.0
    raw = json.loads(find_ds_config(cfg.deepspeed_config).read_text())
    for world in (1, 2):
        ds = resolve_ds_config(raw, cfg, world)
        assert ds["train_batch_size"] == cfg.batch_size
        assert (
            ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world == cfg.batch_size
        )


@pytest.mark.parametrize("path", sorted((ROOT / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_ds_configs_leave_batch_sizes_to_the_recipe(path):
    raw = json.loads(path.read_text())
    assert raw["zero_optimization"]["stage"] == 2
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        assert raw[key] == "auto"
    cfg = PLoRATrainConfig(batch_size=64, micro_batch_size=4, lr=3e-4, grad_clip=1.0)
    ds = resolve_ds_config(raw, cfg, world_size=2)
    assert (ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (8, 1.0)
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["lr"] == 3e-4
    assert ds["optimizer"]["params"]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="multiple of micro_batch_size x world_size"):
        resolve_ds_config(raw, PLoRATrainConfig(batch_size=12, micro_batch_size=4), world_size=2)
    with pytest.raises(ValueError, match="train_batch_size=32 but the stage config gives 64"):
        resolve_ds_config({**raw, "train_batch_size": 32}, cfg, world_size=2)


@pytest.mark.parametrize("name", ["zero2_bf16.json", "zero2_fp16.json", "zero2_fp32.json"])
def test_ds_configs_reduction_buckets_stay_under_glibcs_largest_mmap_threshold(name):
    """ZeRO-2 with overlap_comm allocates two buffers of ``reduce_bucket_size`` gradients (fp32 at most) at
    every micro-step. Above glibc's largest mmap threshold (32 MiB) each is mapped afresh and every page
    faults on its first write; below it, the freed buffers come back from the heap (docs/PLORA_BENCH.md)."""
    zero = json.loads((ROOT / "ds_configs" / name).read_text())["zero_optimization"]
    assert zero["contiguous_gradients"] and zero["overlap_comm"]
    assert zero["reduce_bucket_size"] * torch.finfo(torch.float32).bits // 8 <= MMAP_THRESHOLD


# ----------------------------------------------------------------------------------------------------------
# the stage-2 loader
# ----------------------------------------------------------------------------------------------------------


def test_loader_joins_text_and_id_views_per_sample_ranks_and_resume(plora_assets):
    ds = ProcessedDataset(plora_assets["data_dir"])
    from transformers import AutoTokenizer

    encoder = PromptEncoder(AutoTokenizer.from_pretrained(plora_assets["backbone"]), "ml-1m")
    table = ds.read_split("fewshot", ["sample_id", "item_index"]).to_pydict()
    item_of = dict(zip(table["sample_id"], table["item_index"]))
    item_ids = ds.items["item_id"].to_numpy()

    def loader(rank: int, world: int) -> PLoRABatchLoader:
        return PLoRABatchLoader(
            ds, "fewshot", 16, encoder, history_length=CRM_HISTORY, rank=rank, world_size=world,
            shuffle=True, seed=3, drop_last=True,
        )  # fmt: skip

    genders = ds.users["gender"].to_pylist()
    seen = []
    for rank in (0, 1):
        for index, batch in enumerate(loader(rank, 2)):
            seen.append(batch["sample_id"])
            if index >= 2:
                continue
            # the independent text view (data.text.text_views, joined by sample_id) of the batch's samples
            sids = batch["sample_id"].tolist()
            reference = text_views(ds, "fewshot", sids, history_length=10)
            views = [
                TextView(
                    reference[s]["target"],
                    tuple(reference[s]["history"]),
                    reference[s]["profile"],
                    genders[int(u)],
                )
                for s, u in zip(sids, batch["user_index"])
            ]
            assert torch.equal(encoder.encode(views, batch["label"])["input_ids"], batch["input_ids"])
            assert batch["label"].tolist() == [float(reference[s]["label"]) for s in sids]
            assert batch["item_id"].tolist() == [int(item_ids[item_of[s]]) for s in sids]  # the same rows
    ids = torch.cat(seen).numpy()
    assert len(np.unique(ids)) == len(ids)  # the ranks' samples are disjoint
    assert set(ids) <= set(table["sample_id"])

    first = loader(0, 2)
    iterator = iter(first)
    for _ in range(3):
        next(iterator)
    state = first.state_dict()
    rest = list(iterator)
    again = loader(0, 2)
    again.load_state_dict(state)
    resumed = list(again)
    assert len(resumed) == len(rest) > 0
    for a, b in zip(rest, resumed):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_retrieved_histories_are_read_by_sample_id(plora_assets, tmp_path):
    """The retriever's ``recent`` mode output (the last K rows, by sample id) read as retrieved prompt and
    CRM histories gives exactly the batches of the recent histories."""
    from transformers import AutoTokenizer

    from reclora_ds.data.histories import RetrievedHistoriesError, load_retrieved
    from reclora_ds.retrieval.retriever import retrieve_histories

    retrieve_histories(
        plora_assets["data_dir"], None, ks=(CRM_HISTORY, 10), mode="recent", out_dir=tmp_path / "recent"
    )
    ds = ProcessedDataset(plora_assets["data_dir"])
    encoder = PromptEncoder(AutoTokenizer.from_pretrained(plora_assets["backbone"]), "ml-1m")
    common = {"shuffle": True, "seed": 5, "history_length": CRM_HISTORY}
    folder = load_retrieved(tmp_path / "recent", plora_assets["data_dir"])
    recent = PLoRABatchLoader(ds, "valid", 32, encoder, **common)
    retrieved = PLoRABatchLoader(
        ds,
        "valid",
        32,
        encoder,
        short_history="retrieved",
        short_retrieved=folder,
        history_mode="retrieved",
        retrieved=folder,
        **common,
    )
    for a, b in zip(recent, retrieved):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), [
            k for k in a if not torch.equal(a[k], b[k])
        ]
    with pytest.raises(RetrievedHistoriesError, match="not 7"):
        PLoRABatchLoader(
            ds,
            "valid",
            32,
            encoder,
            short_history="retrieved",
            short_history_length=7,
            short_retrieved=folder,
        )
    with pytest.raises(RetrievedHistoriesError, match="retrieval.json: missing"):
        load_retrieved(tmp_path / "missing", plora_assets["data_dir"])


# ----------------------------------------------------------------------------------------------------------
# in-process runs: zero_shot, lora
# ----------------------------------------------------------------------------------------------------------


def test_zero_shot_evaluates_the_whole_splits_without_training(plora_assets, tmp_path):
    out = tmp_path / "zero_shot"
    cfg = load_config(
        PLoRATrainConfig,
        QUICKSTART,
        overrides(plora_assets, out, "mode=zero_shot", "eval_max_samples=0", "num_threads=1"),
        section="plora",
    )
    metrics = run_plora_training(cfg)
    splits = ProcessedDataset(plora_assets["data_dir"]).metadata["splits"]
    for split in ("valid", "test"):
        assert metrics[split]["n"] == splits[split]["rows"]
        assert 0.0 < metrics[split]["auc"] < 1.0 and math.isfinite(metrics[split]["logloss"])
    assert metrics["steps"] == 0 and metrics["trainable_parameters"] == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "config.yaml", "ds_config.json", "metrics.json", "predictions_test.parquet", "predictions_valid.parquet", "tb",
    ]  # fmt: skip
    pred = pq.read_table(out / "predictions_test.parquet").to_pandas()  # the evaluated samples, one row each
    assert len(pred) == splits["test"]["rows"] and pred["sample_id"].is_monotonic_increasing
    assert pred["p"].between(0, 1).all() and roc_auc_score(pred["label"], pred["p"]) == pytest.approx(
        metrics["test"]["auc"]
    )


def test_lora_mode_trains_peft_lora_only(plora_assets, tmp_path):
    out = tmp_path / "lora"
    extra = [
        "mode=lora",
        "lora_rank=4",
        "max_steps=3",
        "batch_size=8",
        "micro_batch_size=4",
        "eval_max_samples=16",
        "log_every=1",
        "num_threads=1",
    ]
    metrics = run_plora_training(
        load_config(PLoRATrainConfig, QUICKSTART, overrides(plora_assets, out, *extra), section="plora")
    )
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))  # peft's own adapter folder
    assert len(adapter) == 2 * 2 * 2 and all("lora_" in name for name in adapter)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert metrics["trainable_parameters"] == sum(t.numel() for t in adapter.values())
    assert [s for s, _ in metrics["train_loss"]] == [1, 2, 3]
    assert all(math.isfinite(loss) for _, loss in metrics["train_loss"])
    # the timed steps split into phases: each positive, together at most the steps' time (the rest is the
    # loss / token bookkeeping between them)
    perf = metrics["perf"]
    phases = [perf[f"train_{phase}_s_per_sample"] for phase in TRAIN_PHASES]
    assert all(t > 0 for t in phases), phases
    assert 0.9 * perf["train_s_per_sample"] <= sum(phases) <= perf["train_s_per_sample"], (phases, perf)


# ----------------------------------------------------------------------------------------------------------
# DeepSpeed, 2 ranks, through the real entry point
# ----------------------------------------------------------------------------------------------------------


def deepspeed_command(args: list[str], port: int | None = None) -> list[str]:
    return deepspeed(2, ENTRY, "--config", str(QUICKSTART), *args, port=port)


@pytest.mark.distributed
@pytest.mark.slow
def test_deepspeed_zero2_two_ranks_through_the_entry_point(plora_assets, tmp_path):
    out = tmp_path / "ds"
    extra = [
        "max_steps=8",
        "batch_size=16",
        "micro_batch_size=4",  # x 2 ranks x 2 accumulation steps
        "eval_batch_size=32",
        "eval_max_samples=0",
        "eval_every=4",
        "checkpoint_every=4",
        "log_every=1",
        "short_history_length=3",  # short prompts: the full-split evaluations stay quick
    ]
    port = free_port()
    run = subprocess.run(
        deepspeed_command(overrides(plora_assets, out, *extra), port),
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    # DeepSpeed's CPU comm maps a 66 MB /dev/shm segment per rank and never unlinks it; the recipe does.
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 8
    losses = [loss for _, loss in metrics["train_loss"]]
    print("2-rank ZeRO-2 train losses:", [round(x, 4) for x in losses])
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert np.mean(losses[:2]) > np.mean(losses[-2:])
    splits = ProcessedDataset(plora_assets["data_dir"]).metadata["splits"]
    for split in ("valid", "test"):  # exact metrics over the whole split, gathered from both ranks
        assert metrics[split]["n"] == splits[split]["rows"]
        # timings are rank 0's seconds over rank 0's samples (its half of the split), as for training
        perf, n = metrics["perf"], metrics[split]["n"]
        assert perf[f"eval_{split}_samples"] in (n // 2, (n + 1) // 2)
        rank_seconds = metrics[split]["seconds"]
        assert perf[f"eval_s_per_sample_{split}"] == pytest.approx(
            rank_seconds / perf[f"eval_{split}_samples"]
        )
    assert metrics["perf"]["train_samples"] == 8 * 16 // 2
    assert [e["step"] for e in metrics["periodic_eval"]] == [4]

    # what lands in the run folder: rank 0 writes everything but each rank's ZeRO optimizer shard
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    events = [f for f in files if f.startswith("tb/")]
    assert len(events) == 1 and Path(events[0]).name.startswith("events.out.tfevents")
    tags = ("step00000004", "step00000008")
    expected = {"config.yaml", "ds_config.json", "metrics.json", "checkpoints/latest"}
    expected |= {"predictions_valid.parquet", "predictions_test.parquet"}
    expected |= {
        f"adapter/{name}" for name in ("adapter_model.safetensors", "plora_config.json", "rec_llm.json")
    }
    for tag in tags:
        expected |= {
            f"checkpoints/{tag}/{name}"
            for name in (
                "mp_rank_00_model_states.pt",
                "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                "zero_pp_rank_1_mp_rank_00_optim_states.pt",
                "config.yaml",
                "ds_config.json",
            )
        }
    helpers = {f for f in files if f.startswith("checkpoints/zero_to_")}  # DeepSpeed's conversion scripts
    assert set(files) - set(events) - helpers == expected
    assert (out / "checkpoints" / "latest").read_text() == tags[-1]
    ds_config = json.loads((out / "ds_config.json").read_text())
    assert (ds_config["train_batch_size"], ds_config["gradient_accumulation_steps"]) == (16, 2)

    # only the trainable tensors are checkpointed (no frozen weight, no tied lm_head)
    states = torch.load(out / "checkpoints" / tags[-1] / "mp_rank_00_model_states.pt", weights_only=False)
    module = states["module"]
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert set(module) == {f"llm.{name}" for name in adapter} and all("plora_" in k for k in module)
    # the exported adapter loads strictly into a fresh backbone and holds the trained tensors
    manifest = read_plora_adapter_config(out / "adapter")
    assert manifest.config.num_experts == 4 and manifest.config.crm_dim == 16
    fresh = LlamaForCausalLM.from_pretrained(plora_assets["backbone"])
    inject_plora(fresh, manifest.config)
    load_plora_adapter(fresh, out / "adapter")
    for name, tensor in fresh.state_dict().items():
        if "plora_" in name:
            assert torch.equal(tensor, module[f"llm.{name}"]), name
    assert json.loads((out / "adapter" / "rec_llm.json").read_text())["crm"]["model"] == "sim"

    scalars = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0}).Reload()
    tags_logged = set(scalars.Tags()["scalars"])
    assert {"train/loss", "train/lr", "gate/entropy", "eval/auc", "eval/logloss", "test/auc"} <= tags_logged
    assert {f"gate/expert_usage/{k:02d}" for k in range(4)} <= tags_logged
    logged = [e.value for e in scalars.Scalars("train/loss")]
    np.testing.assert_allclose(logged, losses, rtol=1e-6)
    entropy = [e.value for e in scalars.Scalars("gate/entropy")]
    assert len(entropy) == 8 and all(0 < h <= math.log(4) + 1e-6 for h in entropy)


def train_once_per_setting(plora_assets, tmp_path, key: str, values: tuple[str, str]) -> dict[str, str]:
    """The entry point on two ranks once per value of ``key`` (3 steps, 16 test ids); asserts that both runs
    trained and scored bit for bit alike (losses, adapter tensors, predictions); returns each run's log."""
    runs, logs = {}, {}
    for value in values:
        out = tmp_path / value
        extra = [
            "max_steps=3",
            "batch_size=8",
            "micro_batch_size=2",  # x 2 ranks x 2 accumulation steps
            "eval_max_samples=16",
            "eval_splits=[test]",
            "checkpoint_every=0",
            "log_every=1",
            "short_history_length=3",
            f"{key}={value}",
        ]
        run = subprocess.run(
            deepspeed_command(overrides(plora_assets, out, *extra)),
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        logs[value] = run.stdout + run.stderr
        assert run.returncode == 0, logs[value][-4000:]
        metrics = json.loads((out / "metrics.json").read_text())
        adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
        predictions = pq.read_table(out / "predictions_test.parquet").to_pydict()
        runs[value] = metrics, adapter, predictions
    (first, first_adapter, first_pred), (second, second_adapter, second_pred) = (runs[v] for v in values)
    assert len(first["train_loss"]) == 3 and first["train_loss"] == second["train_loss"]
    assert first_adapter.keys() == second_adapter.keys()
    for name, tensor in first_adapter.items():
        assert torch.equal(tensor, second_adapter[name]), name
    assert first_pred == second_pred
    return logs


@pytest.mark.distributed
@pytest.mark.slow
def test_zero2_sums_through_shared_memory_train_exactly_as_through_gloo(plora_assets, tmp_path):
    """cpu_allreduce=shm sums ZeRO-2's gradient buckets in DeepSpeed's shared-memory kernel, gloo over TCP:
    on two ranks the same float sums, so the same losses, adapter and predictions, bit for bit."""
    said = "ZeRO's reductions go through DeepSpeed's shared-memory kernel"
    logs = train_once_per_setting(plora_assets, tmp_path, "cpu_allreduce", ("gloo", "shm"))
    assert said not in logs["gloo"], logs["gloo"][-4000:]
    assert said in logs["shm"], logs["shm"][-4000:]


@pytest.mark.distributed
@pytest.mark.slow
def test_ranks_under_a_preloaded_malloc_train_exactly_as_under_the_system_one(plora_assets, tmp_path):
    """cpu_allocator=mimalloc: each rank runs itself again with mimalloc preloaded (the log and metrics.json
    say which malloc ran). The same arithmetic on other addresses: the same losses, adapter and predictions,
    bit for bit (a kernel that read memory it never wrote would differ between the two allocators)."""
    logs = train_once_per_setting(plora_assets, tmp_path, "cpu_allocator", ("system", "mimalloc"))
    # the attention kernel's form the ranks resolved from cpu_attention_form=auto, as this process resolves it
    form = None
    if cpu_kernels.load() and cpu_kernels.decoder_attention_supported():
        form = "matmul" if cpu_kernels.cpu_has_amx() else "dot"
    for value, log in logs.items():
        assert f"malloc {value}" in log, log[-4000:]
        assert f"CPU attention kernel {form or 'none'}" in log, log[-4000:]
        metrics = json.loads((tmp_path / value / "metrics.json").read_text())
        assert metrics["malloc"] == value and metrics["cpu_attention_form"] == form


# ----------------------------------------------------------------------------------------------------------
# kill -9, resume
# ----------------------------------------------------------------------------------------------------------


def latest_step(out: Path) -> int:
    try:
        return int((out / "checkpoints" / "latest").read_text().removeprefix("step"))
    except (FileNotFoundError, ValueError):
        return 0


@pytest.mark.slow
def test_kill_9_after_the_first_checkpoint_then_resume_equals_an_uninterrupted_run(plora_assets, tmp_path):
    total = 40  # the few-shot split (1000 rows) gives 31 steps of 2 x 16 samples per epoch: 2 epochs
    extra = [
        "epochs=2",
        f"max_steps={total}",
        "batch_size=32",
        "micro_batch_size=16",  # 2 accumulation steps
        "checkpoint_every=5",
        "log_every=1",
        "eval_max_samples=32",
        "adapter.gate_dropout=0.1",  # dropout in the gates: the restored RNG state matters
        "short_history_length=3",
        "num_threads=1",
    ]

    def command(out: Path) -> list[str]:
        return [
            sys.executable,
            str(ENTRY),
            "--config",
            str(QUICKSTART),
            *overrides(plora_assets, out, *extra),
        ]

    # the interrupted run: SIGKILL as soon as its first checkpoint is complete (`latest` points to it)
    out = tmp_path / "killed"
    proc = subprocess.Popen(command(out), env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while latest_step(out) == 0 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, (
        "the run ended before it could be killed:\n" + proc.stderr.read().decode()[-3000:]
    )
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    killed_at = latest_step(out)
    assert 5 <= killed_at < total
    assert not (out / "metrics.json").exists()

    # the same command again (it resumes), while the uninterrupted reference runs in this process
    rerun = subprocess.Popen(command(out), env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    reference = tmp_path / "reference"
    run_plora_training(
        load_config(PLoRATrainConfig, QUICKSTART, overrides(plora_assets, reference, *extra), "plora")
    )
    _, stderr = rerun.communicate(timeout=300)
    stderr = stderr.decode()
    assert rerun.returncode == 0, stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    want = json.loads((reference / "metrics.json").read_text())
    print(f"killed with checkpoint step {killed_at}, resumed from {metrics['resumed_from']} of {total}")
    assert metrics["resumed_from"] == killed_at
    assert f"at step {killed_at}" in stderr
    assert metrics["steps"] == want["steps"] == total
    assert (out / "checkpoints" / "latest").read_text() == f"step{total:08d}"
    assert metrics["train_loss"] == want["train_loss"]  # every step's loss, before and after the kill
    assert (
        metrics["valid"]["auc"] == want["valid"]["auc"]
        and metrics["test"]["logloss"] == want["test"]["logloss"]
    )
    got = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    ref = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == ref.keys() and all("plora_" in k for k in got)
    for name in ref:
        assert torch.equal(got[name], ref[name]), name
