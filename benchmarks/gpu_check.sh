#!/usr/bin/env bash
# Stage 2 on a CUDA machine (issue #16): a bf16 ZeRO-2 step with NCCL, an 8-bit backbone step, and the
# throughput of a Llama-7B-shaped model with random weights (no download). Prints s/sample for training and
# inference and the peak GPU memory of each part (benchmarks/gpu_check.py has the details).
#
#   bash benchmarks/gpu_check.sh                       # all parts, defaults (batch 16 x 256 tokens)
#   bash benchmarks/gpu_check.sh --batch 32 --json gpu_check.json
#
# Needs torch with CUDA and, for the 8-bit part, bitsandbytes (pip install bitsandbytes).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "error: benchmarks/gpu_check.sh: no CUDA GPU (torch.cuda.is_available() is False in $PYTHON);" \
         "run it on a CUDA machine (the CPU smoke run: $PYTHON benchmarks/gpu_check.py --device cpu --tiny)" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# one rank through the deepspeed launcher: NCCL process group, as stage 2 runs on a GPU
exec "$(dirname "$(command -v "$PYTHON")")/deepspeed" --num_gpus 1 benchmarks/gpu_check.py "$@"
