"""An 8-bit frozen LLM (bitsandbytes ``Linear8bitLt``, its CPU backend) under DeepSpeed ZeRO-2 on 2 CPU ranks.

The ranks run :func:`worker` (this module, started by the ``deepspeed`` launcher): the stage-2 recipe with
``load_in_8bit=true`` and ``zero2_fp32.json``. They check, after ``deepspeed.initialize`` and again after
training, that every linear weight of the LLM is still ``int8`` and bitwise unchanged (DeepSpeed's module
cast and parameter broadcast must not touch it), and rank 0 writes what it saw. The test then checks that the
adapter trained (the loss falls), that the checkpoints hold only the trainable tensors, that a second launch
with more steps resumes from the checkpoint, and that the exported adapter scores through
:mod:`reclora_ds.training.scoring` with the same 8-bit backbone, giving the run's test predictions.
Skipped when bitsandbytes is not installed.
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

from reclora_ds.distributed import free_port
from tests.launch import clean_env, deepspeed

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed: the 8-bit path cannot run")

ROOT = Path(__file__).parents[2]
QUICKSTART = ROOT / "launch" / "configs" / "plora_quickstart.yaml"
REPORT = "int8_report.json"


def int8_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the LLM's int8 parameters, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype == torch.int8}


def worker(argv: list[str]) -> None:
    """One rank: setup, check the int8 weights, train, check again, finish; rank 0 writes REPORT."""
    from reclora_ds.config import load_config
    from reclora_ds.training.plora_config import PLoRATrainConfig
    from reclora_ds.training.plora_recipe import PLoRARecipe

    cfg = load_config(PLoRATrainConfig, QUICKSTART, argv, "plora")
    recipe = PLoRARecipe(cfg)
    recipe.setup()
    try:
        llm = recipe.model.llm
        linears = [n for n, m in llm.named_modules() if type(m).__name__ == "Linear8bitLt"]
        before = int8_weights(llm)
        recipe.train()
        after = int8_weights(llm)
        metrics = recipe.finish()
        if recipe.is_main:
            report = {
                "int8_linears": len(linears),
                "int8_params": sorted(before),
                "unchanged": sorted(before) == sorted(after)
                and all(torch.equal(before[n], after[n]) for n in before),
                "trainable_dtypes": sorted({str(p.dtype) for p in recipe.trainable.values()}),
                "steps": metrics["steps"],
                "resumed_from": metrics["resumed_from"],
            }
            (Path(cfg.output_dir) / REPORT).write_text(json.dumps(report))
    finally:
        recipe.cleanup()


def launch(plora_assets: dict[str, str], out: Path, max_steps: int) -> dict:
    args = [
        f"data_dir={plora_assets['data_dir']}", f"output_dir={out}", f"crm_path={plora_assets['crm_path']}",
        f"backbone={plora_assets['backbone']}", "deepspeed_config=ds_configs/zero2_fp32.json",
        "load_in_8bit=true", "short_history=recent", "short_history_length=3", "adapter.num_experts=4",
        "lr=0.02", "progress=false", f"max_steps={max_steps}", "batch_size=16", "micro_batch_size=4",
        "eval_batch_size=32", "eval_max_samples=64", "checkpoint_every=6", "log_every=1",
    ]  # fmt: skip
    command = deepspeed(2, Path(__file__), *args, port=free_port())
    run = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return json.loads((out / REPORT).read_text())


@pytest.mark.distributed
@pytest.mark.slow
def test_int8_backbone_under_zero2_on_two_cpu_ranks(plora_assets, tmp_path):
    from safetensors.torch import load_file

    from reclora_ds.training.scoring import load_scoring_model, score_table

    out = tmp_path / "int8"
    report = launch(plora_assets, out, max_steps=6)
    # every Linear of the tiny Llama's layers is 8-bit (lm_head is kept in float by transformers), and its
    # int8 weights came through deepspeed.initialize and training bitwise unchanged
    assert report["int8_linears"] == 2 * 7 and len(report["int8_params"]) == 2 * 7
    assert report["unchanged"] and report["trainable_dtypes"] == ["torch.float32"]
    metrics = json.loads((out / "metrics.json").read_text())
    losses = [loss for _, loss in metrics["train_loss"]]
    print("int8 ZeRO-2 losses:", [round(x, 4) for x in losses])
    assert report["steps"] == 6 and np.mean(losses[:2]) > np.mean(losses[-2:])

    # checkpoints hold only the trainable tensors (no int8 weight, no scale, no tied lm_head)
    states = torch.load(
        out / "checkpoints" / "step00000006" / "mp_rank_00_model_states.pt", weights_only=False
    )
    module = states["module"]
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert set(module) == {f"llm.{n}" for n in adapter} and all("plora_" in k for k in module)
    assert {t.dtype for t in module.values()} == {torch.float32}

    # a second launch with more steps resumes from step 6
    report = launch(plora_assets, out, max_steps=10)
    assert report["resumed_from"] == 6 and report["steps"] == 10 and report["unchanged"]

    # the exported adapter scores with the same 8-bit backbone: the run's own test predictions
    scoring = load_scoring_model(run_dir=out)
    assert any(p.dtype == torch.int8 for p in scoring.model.llm.parameters())
    table = score_table(scoring, "test", max_samples=64, batch_size=32, progress=False)
    run_pred = pq.read_table(out / "predictions_test.parquet").to_pandas().sort_values("sample_id")
    got = table.to_pandas().sort_values("sample_id")
    np.testing.assert_array_equal(got["sample_id"].to_numpy(), run_pred["sample_id"].to_numpy())
    np.testing.assert_allclose(got["p"].to_numpy(), run_pred["p"].to_numpy(), atol=1e-5)


if __name__ == "__main__":
    from reclora_ds.distributed import run_and_exit

    # the deepspeed launcher appends --local_rank=N; the rank comes from the environment
    run_and_exit(lambda: worker([a for a in sys.argv[1:] if not a.startswith("--local_rank")]))
