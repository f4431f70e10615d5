"""tools/score.py on tiny stage-2 runs (plora, lora) and the zero-shot backbone of the prepared ML-1M sample.

References, built without reclora_ds.training.scoring: the model rebuilt by hand (PLoRA: inject + strict
adapter load; LoRA: peft's own ``PeftModel.from_pretrained``), scored one sample at a time with
``RecLLM.score``; the rows and labels of the processed split; the test AUC the run wrote in metrics.json
(sklearn's AUC of the written p over the same samples).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from reclora_ds.commands.score import main
from reclora_ds.config import load_config, save_config
from reclora_ds.cpu import CPUExtras
from reclora_ds.cpu import kernels as cpu_kernels
from reclora_ds.data.loader import uniform_sample_ids
from reclora_ds.data.processed import ProcessedDataset
from reclora_ds.data.prompts import PromptEncoder, resolve_answer_tokens
from reclora_ds.distributed import free_port
from reclora_ds.llm_loader import load_causal_lm
from reclora_ds.models.norms import RMSNorm
from reclora_ds.models.rec_llm import RecLLM, RecLLMConfig
from reclora_ds.training.adapter_io import load_plora_adapter, read_plora_adapter_config
from reclora_ds.training.checkpoint import load_crm
from reclora_ds.training.plora_config import PLoRATrainConfig
from reclora_ds.training.plora_data import PLoRABatchLoader
from reclora_ds.training.plora_recipe import run_plora_training
from reclora_ds.training.rec_llm_io import load_rec_llm, read_description, write_description
from reclora_ds.training.scoring import OUTPUT_COLUMNS
from tests.launch import LAUNCH_VARS, clean_env

ROOT = Path(__file__).parents[2]
TOOL = "reclora_ds.commands.score"  # run with `torchrun -m`, as the pipeline runs its commands
QUICKSTART = ROOT / "launch" / "configs" / "plora_quickstart.yaml"
SHORT_HISTORY = 3  # prompt history: short prompts keep the tests quick
EVAL_BATCH = 8
EVAL_SAMPLES = 40


def settings(assets: dict[str, str], *extra: str) -> list[str]:
    return [
        f"data_dir={assets['data_dir']}",
        f"crm_path={assets['crm_path']}",
        f"backbone={assets['backbone']}",
        "deepspeed_config=ds_configs/zero2_fp32.json",
        "dtype=float32",  # the float32 reference models below; auto would be bf16 on a CPU with avx512_bf16
        "short_history=recent",
        f"short_history_length={SHORT_HISTORY}",
        "num_threads=1",
        *extra,
    ]


@pytest.fixture(scope="module", params=["plora", "lora"])
def trained_run(request, plora_assets, tmp_path_factory) -> tuple[Path, dict]:
    """A 2-step stage-2 run of the mode; its test metrics cover a uniform subset of EVAL_SAMPLES test ids."""
    out = tmp_path_factory.mktemp(f"run_{request.param}")
    extra = [
        f"output_dir={out}",
        f"mode={request.param}",
        "adapter.num_experts=4",
        "lora_rank=4",
        "lr=0.01",
        "max_steps=2",
        "batch_size=8",
        "micro_batch_size=4",
        "eval_splits=[test]",
        f"eval_batch_size={EVAL_BATCH}",
        f"eval_max_samples={EVAL_SAMPLES}",
        "checkpoint_every=0",
        "progress=false",
    ]
    cfg = load_config(PLoRATrainConfig, QUICKSTART, settings(plora_assets, *extra), section="plora")
    with pytest.MonkeyPatch.context() as mp:  # the recipe sets a 1-rank group's variables
        for name in LAUNCH_VARS:
            mp.delenv(name, raising=False)
        metrics = run_plora_training(cfg)
    assert (out / "adapter" / "rec_llm.json").is_file()
    return out, metrics


def reference_model(mode: str, assets: dict[str, str], adapter: Path | None) -> RecLLM:
    """The model rebuilt by hand from the backbone, the CRM and the adapter files."""
    llm, tokenizer = load_causal_lm(assets["backbone"])
    answers = resolve_answer_tokens(tokenizer)
    if mode == "plora":
        crm, _ = load_crm(assets["crm_path"])
        manifest = read_plora_adapter_config(adapter)
        model = RecLLM(llm, answers, crm, RecLLMConfig(mode="plora", adapter=manifest.config))
        load_plora_adapter(model.llm, adapter)
    elif mode == "lora":
        from peft import PeftModel

        model = RecLLM(PeftModel.from_pretrained(llm, str(adapter)), answers, None, RecLLMConfig("zero_shot"))
    else:
        model = RecLLM(llm, answers, None, RecLLMConfig("zero_shot"))
    return model.eval()


def one_at_a_time(model: RecLLM, assets: dict[str, str], split: str, n: int) -> tuple[list[int], np.ndarray]:
    """Sample ids and RecLLM.score of the split's uniform n-subset (seed 0), each scored alone (batch of 1)."""
    from transformers import AutoTokenizer

    ds = ProcessedDataset(assets["data_dir"])
    encoder = PromptEncoder(AutoTokenizer.from_pretrained(assets["backbone"]), "ml-1m")
    _, crm_info = load_crm(assets["crm_path"])
    loader = PLoRABatchLoader(
        ds, split, 1, encoder, with_answer=False, short_history_length=SHORT_HISTORY,
        history_length=crm_info.history_length, sample_ids=uniform_sample_ids(ds, split, n, seed=0),
    )  # fmt: skip
    ids, probs = [], []
    for batch in loader:
        if len(ids) == n:
            break
        ids.append(int(batch["sample_id"]))
        probs.append(float(model.score(batch)[0]))
    return ids, np.array(probs)


def check_rows(table, assets: dict[str, str], split: str, n: int) -> None:
    """Columns, sample ids in split order, labels and raw user / item ids of the split's uniform n-subset."""
    assert table.column_names == list(OUTPUT_COLUMNS)
    ds = ProcessedDataset(assets["data_dir"])
    rows = ds.read_split(split, ["sample_id", "user_index", "item_index", "label"])
    wanted = uniform_sample_ids(ds, split, n, seed=0)
    rows = rows.filter(pa.array(np.isin(rows["sample_id"].to_numpy(), wanted)))
    assert table.num_rows == n
    assert table["sample_id"].to_pylist() == rows["sample_id"].to_pylist()
    assert table["label"].to_pylist() == rows["label"].to_pylist()
    raw_users, raw_items = ds.users["user"].to_pylist(), ds.items["item"].to_pylist()
    assert table["user"].to_pylist() == [raw_users[u] for u in rows["user_index"].to_pylist()]
    assert table["item"].to_pylist() == [raw_items[i] for i in rows["item_index"].to_pylist()]


def test_run_scores_equal_one_at_a_time_and_the_runs_test_auc(trained_run, plora_assets, tmp_path, capsys):
    run, metrics = trained_run
    mode = metrics["mode"]
    n = metrics["test"]["n"]
    assert n == EVAL_SAMPLES  # the recipe scored the seeded uniform subset of 40 test ids
    out = tmp_path / "scores" / "test.parquet"
    argv = ["--run", str(run), "--split", "test", "--max-samples", str(n), "--batch-size", str(EVAL_BATCH)]
    assert main([*argv, "--out", str(out)]) == 0
    assert f"-> {out}" in capsys.readouterr().out
    assert not list(out.parent.glob("*.tmp"))
    table = pq.read_table(out)
    check_rows(table, plora_assets, "test", n)
    p = table["p"].to_numpy()

    ids, reference = one_at_a_time(
        reference_model(mode, plora_assets, run / "adapter"), plora_assets, "test", n
    )
    assert ids == table["sample_id"].to_pylist()
    np.testing.assert_allclose(p, reference, rtol=0, atol=1e-6)
    # the very samples behind the run's test metrics, so the same AUC
    labels = table["label"].to_numpy()
    assert roc_auc_score(labels, p) == pytest.approx(metrics["test"]["auc"], abs=1e-12)
    # a trained adapter changes the scores: not the backbone's
    _, zero_shot = one_at_a_time(reference_model("zero_shot", plora_assets, None), plora_assets, "test", n)
    assert np.abs(p - zero_shot).max() > 1e-4


def test_zero_shot_from_a_config_to_csv(plora_assets, tmp_path):
    n = 25  # a seeded uniform subset of 25 valid ids
    out = tmp_path / "zero_shot.csv"
    argv = ["--mode", "zero_shot", "--config", str(QUICKSTART), "--split", "valid", "--max-samples", str(n)]
    assert main([*argv, "--batch-size", "16", "--out", str(out), *settings(plora_assets)]) == 0
    table = pacsv.read_csv(out)
    check_rows(table, plora_assets, "valid", n)
    _, reference = one_at_a_time(reference_model("zero_shot", plora_assets, None), plora_assets, "valid", n)
    np.testing.assert_allclose(table["p"].to_numpy(), reference, rtol=0, atol=1e-6)


def test_scoring_on_a_cpu_keeps_freed_memory_in_the_process(plora_assets, tmp_path, monkeypatch):
    """The CPU scoring path asks for glibc's freed memory to be kept, for the attention kernel when the
    backbone scores with eager_fused and for the RMSNorm kernel when its norms are fused (the quickstart's
    settings; what they buy: docs/PLORA_BENCH.md)."""
    import reclora_ds.training.plora_recipe as recipe_module
    import reclora_ds.training.scoring as scoring_module

    calls = []

    def record(**kwargs):
        calls.append(kwargs)
        return CPUExtras(kernels=False, allocator=False)

    for module in (scoring_module, recipe_module):  # scoring's own call, and enable_backbone_kernels'
        monkeypatch.setattr(module, "enable_cpu_extras", record)
    argv = ["--mode", "zero_shot", "--config", str(QUICKSTART), "--split", "valid", "--max-samples", "4"]
    out = tmp_path / "s.parquet"
    assert main([*argv, "--device", "cpu", "--out", str(out), *settings(plora_assets)]) == 0
    assert calls == [{"allocator": True}, {"attention": True, "attention_form": "auto", "rms_norm": True}]
    assert pq.read_table(out).num_rows == 4


def test_the_adapter_records_how_the_norms_were_loaded_and_scoring_follows_it(trained_run, tmp_path):
    """rec_llm.json records norm_implementation (the run's: the default, fused); the rebuilt model has the
    fused norms, and a record that says ``transformers`` rebuilds transformers' modules (an old record
    without the key gets the default)."""
    out, _ = trained_run
    adapter = out / "adapter"
    description = read_description(adapter)
    assert description["load"]["norm_implementation"] == "fused"

    def fused_norms(folder: Path) -> int:
        model, _, _ = load_rec_llm(folder)
        return sum(isinstance(m, RMSNorm) for m in model.llm.modules())

    assert fused_norms(adapter) > 0
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    description["load"]["norm_implementation"] = "transformers"
    write_description(copy, description)
    assert fused_norms(copy) == 0
    del description["load"]["norm_implementation"]
    write_description(copy, description)
    assert fused_norms(copy) > 0


def test_bad_inputs_exit_2_naming_the_problem(plora_assets, tmp_path, capsys):
    out = ["--out", str(tmp_path / "s.parquet")]
    missing = tmp_path / "no_such_run"
    assert main(["--run", str(missing), "--split", "test", *out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err and "no such run folder" in err

    with pytest.raises(SystemExit) as exc:
        main(["--run", str(missing), "--split", "tset", *out])
    assert exc.value.code == 2
    assert "argument --split: invalid choice: 'tset'" in capsys.readouterr().err

    # a run folder whose training never exported its adapter
    run = tmp_path / "unfinished"
    run.mkdir()
    cfg = load_config(PLoRATrainConfig, QUICKSTART, settings(plora_assets, f"output_dir={run}"), "plora")
    save_config(cfg, run / "config.yaml")
    assert main(["--run", str(run), "--split", "test", *out]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'adapter'}: missing" in err

    assert main(["--run", str(run), "--split", "test", "--out", str(tmp_path / "s.txt")]) == 2
    assert "must end in .parquet or .csv" in capsys.readouterr().err
    assert main(["--run", str(run), "--split", "test", *out, "no_such_key=1"]) == 2
    assert "unknown key 'no_such_key'" in capsys.readouterr().err
    assert not (tmp_path / "s.parquet").exists()


@pytest.mark.distributed
@pytest.mark.parametrize("trained_run", ["plora"], indirect=True)
def test_two_ranks_with_torchrun_equal_one_process(trained_run, tmp_path):
    """Each rank scores its shard (the test split has 4 files: 2 per rank); rank 0 writes them in order."""
    run, _ = trained_run
    n = 330  # the first file (312 rows, rank 0) and 18 rows of the second (rank 1)
    argv = ["--run-dir", str(run), "--split", "test", "--max-samples", str(n)]
    single = tmp_path / "one.parquet"
    assert main([*argv, "--batch-size", "32", "--out", str(single), "--no-progress"]) == 0

    env = clean_env(PYTHONPATH=str(ROOT))
    launcher = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    double = tmp_path / "two.parquet"
    command = [launcher, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", TOOL]
    proc = subprocess.run(
        [*command, *argv, "--batch-size", "32", "--out", str(double)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert proc.stdout.count(f"-> {double}") == 1  # rank 0 writes
    a, b = pq.read_table(single), pq.read_table(double)
    assert a["sample_id"].to_pylist() == b["sample_id"].to_pylist()
    assert a["label"].to_pylist() == b["label"].to_pylist()
    np.testing.assert_allclose(b["p"].to_numpy(), a["p"].to_numpy(), rtol=0, atol=1e-6)
    assert json.loads(b.schema.metadata[b"reclora_ds.scores"])["split"] == "test"


@pytest.mark.parametrize(
    ("attention", "form", "logged"),
    [
        (
            "sdpa",
            "matmul",
            "attention sdpa on cpu, CPU attention kernel none (plora.cpu_attention_form=matmul)",
        ),
        ("eager_fused", "dot", "attention eager_fused on cpu, CPU attention kernel dot"),
    ],
)
def test_scoring_follows_the_configs_attention_form_and_says_which_ran(
    plora_assets, tmp_path, caplog, attention, form, logged
):
    """A run trained with an explicit cpu_attention_form scores with it where the scoring attention is
    eager_fused; where it is not (the run's scoring attention is sdpa) scoring still runs, and the log says
    that no kernel ran for that setting."""
    if form == "dot" and not (cpu_kernels.load() and cpu_kernels.decoder_attention_supported()):
        pytest.skip("this CPU lacks AVX512-BF16")
    argv = ["--mode", "zero_shot", "--config", str(QUICKSTART), "--split", "valid", "--max-samples", "4"]
    overrides = [f"attn_implementation={attention}", f"cpu_attention_form={form}"]
    out = tmp_path / "s.parquet"
    with caplog.at_level("INFO", logger="reclora_ds.training.scoring"):
        assert main([*argv, "--device", "cpu", "--out", str(out), *settings(plora_assets, *overrides)]) == 0
    assert logged in caplog.text
    assert pq.read_table(out).num_rows == 4
