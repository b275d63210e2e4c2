#!/usr/bin/env bash
# One device-tool call (issue 8 / 7): GPU tests of the scan backends, the scan benchmark with the triton launch
# sweep, and SegMamba's training step per backend. Run from the repo root with .gpu/bench carried:
#   bash scripts/gpu/triton_check.sh      (writes under $OUT)
set -o pipefail
source scripts/gpu/setup.sh
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout 220 python3 -m pytest -q -p no:cacheprovider tests/ssm 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
timeout 250 python3 benchmarks/bench_scan_gpu.py --tune --backends cuda triton --warmup 3 --runs 15 --out "$OUT/scan_gpu.json" 2>"$OUT/scan_gpu.err" \
    | tee "$OUT/scan_gpu.md"
tail -3 "$OUT/scan_gpu.err"
timeout 120 python3 -m nnunet_segmamba.cli benchmark --device cuda --no-inference --warmup 3 --iters 10 \
    --networks 'segmamba[cuda],segmamba[triton],segmamba_ckpt[cuda],segmamba_ckpt[triton]' \
    --out "$OUT/step.json" 2>&1 | tail -12
