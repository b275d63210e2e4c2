#!/usr/bin/env bash
# torch.compile of the Mamba layers on a CUDA machine: the custom-op tests with CUDA tensors (every scan backend
# that loads), then eager against compiled training steps (batch 2, 4 x 128^3 -> 3, fp16 autocast + GradScaler,
# nnU-Net's SGD) for SegMamba on the triton and cuda scans and for nnU-Net's PlainConvUNet and ResEnc-M.
#
# Usage, from the repository root, with the environment that has nnunet-segmamba installed:
#   bash scripts/gpu/compile_check.sh OUT_DIR [PYTHON]
# OUT_DIR receives gpu.txt, ops_tests.log, compile_step.{json,md,err}; PYTHON defaults to python3.
# NETWORKS overrides the benchmark's network list; INFERENCE=1 also times patch and volume inference (each
# compiled network then compiles once more, for inference mode).
set -o pipefail
if [ $# -lt 1 ]; then
    echo "usage: bash scripts/gpu/compile_check.sh OUT_DIR [PYTHON]" >&2
    exit 2
fi
OUT_DIR=$1
PY=${2:-python3}
mkdir -p "$OUT_DIR"
NETWORKS=${NETWORKS:-"segmamba[triton],segmamba_compiled[triton],segmamba[cuda],segmamba_compiled[cuda],plainconv,plainconv_compiled,resenc_m,resenc_m_compiled"}

nvidia-smi --query-gpu=name,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
    | tee -a "$OUT_DIR/gpu.txt"

# the op checks and compiled == eager on CUDA (test_ops_and_compile_on_cuda), with the CPU tests of the same file
timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests/ssm/test_ops.py -rs 2>&1 | tee "$OUT_DIR/ops_tests.log" | tail -15

# eager vs compiled steps; first_call_ms in the JSON is the first warm-up step, which holds the compile
inference_flag=--no-inference
[ "${INFERENCE:-0}" = 1 ] && inference_flag=
timeout 1500 "$PY" -m nnunet_segmamba.cli benchmark --device cuda $inference_flag --warmup 3 --iters 10 \
    --networks "$NETWORKS" --out "$OUT_DIR/compile_step.json" 2>"$OUT_DIR/compile_step.err" \
    | tee "$OUT_DIR/compile_step.md"
status=$?
tail -5 "$OUT_DIR/compile_step.err"
"$PY" - "$OUT_DIR/compile_step.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
for name, entry in report["networks"].items():
    train = entry.get("train")
    if isinstance(train, dict) and "ms_median" in train:
        print(f"{name:28s} step {train['ms_median']:8.1f} ms  first step (compile) {train['first_call_ms'] / 1e3:7.1f} s  "
              f"peak {train['peak_gib']} GiB")
    else:
        print(f"{name:28s} {entry.get('skipped') or train}")
PY
exit $status
