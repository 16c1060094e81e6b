#!/usr/bin/env bash
# One prepared GPU benchmark that fits a few minutes on an H100/H200: ViT-B/16 linear and ila_pp at
# 448 px, bf16, batch 32, eager and torch.compile, plus ila_pp training with gradient checkpointing
# for peak memory. Peak dense bf16 TFLOP/s for MFU defaults to 989 (H100/H200 SXM); override with PEAK.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PEAK=${PEAK:-989}
common=(--device cuda --sizes 448 --precisions bf16 --batch 32 --peak-tflops "$PEAK" --warmup 3 --iters 10)
$PY -m benchmarks.run "${common[@]}" --methods linear,ila_pp --modes train,infer --name gpu_eager
$PY -m benchmarks.run "${common[@]}" --methods linear,ila_pp --modes train,infer --compile --name gpu_compile
$PY -m benchmarks.run "${common[@]}" --methods ila_pp --modes train --grad-checkpointing --name gpu_gradckpt
$PY -m benchmarks.data --workers 0,4,8 --name gpu_data
