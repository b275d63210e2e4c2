#!/usr/bin/env bash
# One device-tool call (issue 8 / 7): GPU tests of the scan backends, the scan benchmark with the triton launch
# sweep, and SegMamba's training step per backend. Run from the repo root with .gpu/bench carried:
#   bash scripts/gpu/triton_check.sh      (writes under $OUT)
# TESTS (default tests/ssm) and PYTEST_K narrow the test run when only part of the scan code changed.
set -o pipefail
source scripts/gpu/setup.sh
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout 220 python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/ssm} ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
timeout 300 python3 -m benchmarks.bench_scan_gpu --tune --backends cuda triton --warmup 3 --runs 15 --out "$OUT/scan_gpu.json" 2>"$OUT/scan_gpu.err" \
    | tee "$OUT/scan_gpu.md"
tail -3 "$OUT/scan_gpu.err"
# the training step with the launch settings the sweep chose (applied in-process; they become the module's defaults
# once recorded in docs/benchmarks.md)
timeout 120 python3 - "$OUT" <<'PY' 2>&1 | tail -12
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
