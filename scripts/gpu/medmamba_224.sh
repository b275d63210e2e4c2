#!/usr/bin/env bash
# One device-tool call (issue 6): MedMamba-T on BreastMNIST with the paper's protocol at 224 px (the default
# protocol of `classify train` with --image-size 224), mamba-ssm's scan kernel. Args: seed (default 0).
set -o pipefail
source scripts/gpu/setup.sh
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"
seed=${1:-0}
timeout 575 python3 -m nnunet_segmamba.cli classify train --data .gpu/bench/data/medmnist/breastmnist.npz \
    --out runs/breast_t224_s$seed --variant t --image-size 224 --device cuda --seed "$seed" 2>&1 \
    | tr '\r' '\n' | grep -v "it/s\]$" | tee "$OUT/medmamba_t224_s$seed.log" | tail -25
mkdir -p "$OUT/s$seed"; cp runs/breast_t224_s$seed/*.json runs/breast_t224_s$seed/*.png "$OUT/s$seed/" 2>/dev/null
