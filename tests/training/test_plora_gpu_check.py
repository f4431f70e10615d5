"""``benchmarks/gpu_check.sh`` fails clearly without CUDA; its Python part runs every part on a CPU at toy size
(ZeRO-2 engine over gloo, the 8-bit backbone through bitsandbytes' CPU backend, the throughput loop)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.launch import clean_env

ROOT = Path(__file__).parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_gpu_check_sh_fails_clearly_without_cuda():
    run = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
        env=clean_env(PYTHON=sys.executable), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.startswith("error: benchmarks/gpu_check.sh: no CUDA GPU")
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")],
        env=clean_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode != 0 and "error: --device cuda: torch.cuda.is_available() is False" in run.stderr


@pytest.mark.slow
def test_gpu_check_parts_run_on_a_cpu_at_toy_size(tmp_path):
    parts = ["zero2", "throughput"]
    try:
        import bitsandbytes  # noqa: F401

        parts.insert(1, "int8")
    except ImportError:
        pass
    out = tmp_path / "gpu_check.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny",
         "--parts", *parts, "--json", str(out)],
        env=clean_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    results = json.loads(out.read_text())
    assert [r["part"] for r in results] == parts
    for r in results:
        assert r["train_s_per_sample"] > 0 and r["infer_s_per_sample"] > 0 and r["peak_memory_gib"] > 0
        assert f"{r['part']}: tiny" in run.stdout
    assert "ZeRO-2 over gloo" in run.stdout
    if "int8" in parts:
        assert "int8 weights unchanged" in run.stdout
