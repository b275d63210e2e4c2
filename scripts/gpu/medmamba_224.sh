#!/usr/bin/env bash
# MedMamba-T on BreastMNIST with the default protocol of `nnunet-segmamba classify train` at the paper's 224 px.
#
#   bash scripts/gpu/medmamba_224.sh BREASTMNIST_NPZ [SEED] [OUT]
#
# Run from the repository root on a CUDA machine. SEED defaults to 0; the run folder is runs/breast_t224_s<SEED>
# and OUT (default runs/gpu) receives the log and a copy of its metrics JSON and confusion-matrix PNG.
# WHEELS and SITE as in scripts/gpu/setup.sh.
set -o pipefail
if [ -z "${1:-}" ]; then
    echo "usage: bash scripts/gpu/medmamba_224.sh BREASTMNIST_NPZ [SEED] [OUT]" >&2; exit 2
fi
data=$1; seed=${2:-0}
source scripts/gpu/setup.sh -- $WHEELS
OUT=${3:-${OUT:-runs/gpu}}; mkdir -p "$OUT"
run=runs/breast_t224_s$seed
python3 -m nnunet_segmamba.cli classify train --data "$data" --out "$run" --variant t --image-size 224 \
    --device cuda --seed "$seed" 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" | tee "$OUT/medmamba_t224_s$seed.log" | tail -25
mkdir -p "$OUT/s$seed"; cp "$run"/*.json "$run"/*.png "$OUT/s$seed/" 2>/dev/null
true
