#!/usr/bin/env bash
# All GPU checks in one short run (for a session lent a GPU through the device tool).
# Writes its numbers under ${OUT:-gpu_results}/. Usage: bash scripts/gpu_checks.sh
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1
# 1. kernel correctness on CUDA (fp32/bf16/fp16) and graph replay
python -m pytest -q tests/test_kernels.py tests/test_kernels_triton.py > "$OUT/kernel_tests.txt" 2>&1
# 2. bandwidth / speed-up vs eager, graph-captured sampling
python scripts/bench_kernels.py --json "$OUT/bench_kernels.json" > "$OUT/bench_kernels.md" 2>&1
# 3. a GPU training step of the teacher and of a distiller
python -m flowdistill.cli train-teacher configs/teacher_checkerboard.yaml \
  out_dir="$OUT/teacher" train.steps=200 --overwrite > "$OUT/train_gpu.txt" 2>&1
# 4. issue 15: an SD3-sized transformer (24 blocks, random weights), two-time LoRA student, bf16, gradient
#    checkpointing, FreeFlow at 1024²: step time, peak memory, throughput (JSON + markdown; capped at 4 min)
python scripts/gpu_pipeline_distill.py --steps 300 --time-limit 240 --out "$OUT/pipeline_distill" \
  > "$OUT/pipeline_distill.txt" 2>&1
tail -n 3 "$OUT"/*.txt "$OUT"/*.md
