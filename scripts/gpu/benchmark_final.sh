#!/usr/bin/env bash
# One device-tool call (issue 7): SegMamba's variants and the peers at the paper's setting, with the cuda/triton
# vs torch equivalence check. Run from the repo root with .gpu/bench carried: bash scripts/gpu/benchmark_final.sh
set -o pipefail
source scripts/gpu/setup.sh
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"
timeout 570 python3 -m nnunet_segmamba.cli benchmark --device cuda --equivalence \
    --networks 'segmamba[cuda],segmamba[triton],segmamba_cl[cuda],segmamba_ckpt[cuda],segmamba_nomamba,plainconv,resenc_m,swinunetr' \
    --out "$OUT/benchmark.json" 2>&1 | tee "$OUT/benchmark.log" | tail -25
