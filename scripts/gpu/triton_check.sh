#!/usr/bin/env bash
# GPU tests of the scan implementations, the scan benchmark with the Triton launch sweep, and SegMamba's training
# step per scan backend (with the launch settings the sweep chose, applied in this process only).
#
#   bash scripts/gpu/triton_check.sh [OUT]
#
# Run from the repository root on a CUDA machine. OUT (default runs/gpu) receives gpu.txt, gpu_tests.log,
# scan_gpu.json / .md and step.json. Environment: TESTS (pytest paths, default tests/ssm) and PYTEST_K (a -k
# expression) narrow the test run; WHEELS (wheel folders) and SITE as in scripts/gpu/setup.sh.
set -o pipefail
source scripts/gpu/setup.sh -- $WHEELS
OUT=${1:-${OUT:-runs/gpu}}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/ssm} ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 \
    | tee "$OUT/gpu_tests.log" | tail -15
python3 -m benchmarks.bench_scan_gpu --tune --backends cuda triton --warmup 3 --runs 15 --out "$OUT/scan_gpu.json" \
    2>"$OUT/scan_gpu.err" | tee "$OUT/scan_gpu.md"
tail -3 "$OUT/scan_gpu.err"
python3 - "$OUT" <<'PY' 2>&1 | tail -12
import json, sys
from nnunet_segmamba.ssm import triton_scan
from nnunet_segmamba.cli import main
out = sys.argv[1]
triton_scan.TUNING.update(json.load(open(f"{out}/scan_gpu.json"))["tune"]["chosen"])
print("triton tuning:", triton_scan.TUNING)
sys.argv = ["nnunet-segmamba", "benchmark", "--device", "cuda", "--no-inference", "--warmup", "3", "--iters", "10",
            "--networks", "segmamba[cuda],segmamba[triton]", "--out", f"{out}/step.json"]
sys.exit(main(sys.argv[1:]))  # sys.argv set so that the JSON records this command
PY
