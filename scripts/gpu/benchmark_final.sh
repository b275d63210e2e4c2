#!/usr/bin/env bash
# SegMamba's variants and its peers at the paper's setting (batch 2, 4 x 128^3, fp16), with the check that the
# cuda and triton scans give the torch scan's output within fp16 rounding.
#
#   bash scripts/gpu/benchmark_final.sh [OUT]
#
# Run from the repository root on a CUDA machine (about 10 minutes on one H200). OUT (default runs/gpu)
# receives benchmark.json and benchmark.log. WHEELS and SITE as in scripts/gpu/setup.sh.
set -o pipefail
source scripts/gpu/setup.sh -- $WHEELS
OUT=${1:-${OUT:-runs/gpu}}; mkdir -p "$OUT"
python3 -m nnunet_segmamba.cli benchmark --device cuda --equivalence \
    --networks 'segmamba[cuda],segmamba[triton],segmamba_cl[cuda],segmamba_ckpt[cuda],segmamba_nomamba,plainconv,resenc_m,swinunetr' \
    --out "$OUT/benchmark.json" 2>&1 | tee "$OUT/benchmark.log" | tail -25
