#!/usr/bin/env bash
# The few-channel input convolution's Triton kernels on a CUDA machine, in one call: their GPU tests, their times
# against cuDNN's (and with TUNE=1 the launch sweep), then the trainers' hippocampus step with them against the
# package without them.
#
#   bash scripts/gpu/input_conv_check.sh MAIN_DIR [OUT]
#
# MAIN_DIR holds a copy of main's nnunet_segmamba/ and benchmarks/ (`mkdir -p DIR && git archive main
# nnunet_segmamba benchmarks | tar -x -C DIR`), the step's "before". OUT (default runs/gpu/input_conv) receives
# tests.log, input_convs.json (input_convs_tune.json) and the step A/B's files. ROUNDS (default 2) and WHEELS / SITE
# as in scripts/gpu/step_ab.sh; STEP=0 skips the A/B (about 4 minutes). For the 128^3 step, afterwards:
# NETWORKS='segmamba_cl_recompute_compiled_cg[triton]' ARGS='--no-inference --warmup 3 --iters 10' ROUNDS=1
# OUT=OUT/step_ab_128 bash scripts/gpu/step_ab.sh MAIN_DIR (about 3 minutes a run: cuDNN's full search).
set -o pipefail
if [ -z "${1:-}" ]; then
    echo "usage: bash scripts/gpu/input_conv_check.sh MAIN_DIR [OUT]" >&2; exit 2
fi
main=$1; OUT=${2:-runs/gpu/input_conv}; mkdir -p "$OUT"
source scripts/gpu/setup.sh -- $WHEELS >/dev/null
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/networks/test_triton_input_conv.py -rfs \
    > "$OUT/tests.log" 2>&1; tail -3 "$OUT/tests.log"
python3 -m benchmarks.bench_input_convs --pads 0 --out "$OUT/input_convs.json" 2>&1 | grep -E "^\||^batch"
if [ "${TUNE:-0}" = 1 ]; then
    python3 -m benchmarks.bench_input_convs --tune --iters 10 --out "$OUT/input_convs_tune.json" 2>&1 \
        | grep -E "^\||batch"
fi
[ "${STEP:-1}" = 0 ] && exit 0
OUT=$OUT/step_ab ROUNDS=${ROUNDS:-2} bash scripts/gpu/step_ab.sh "$main" 2>&1 | tail -8
