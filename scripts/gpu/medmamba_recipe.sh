#!/usr/bin/env bash
# MedMamba-T on BreastMNIST at the paper's 224 px: a recipe over several seeds, with its summary.
#
#   bash scripts/gpu/medmamba_recipe.sh BREASTMNIST_NPZ [OUT] [RECIPE] [SEEDS]
#
# Run from the repository root on a CUDA machine. RECIPE is strong (default) or paper, SEEDS a comma list (default
# 0,1,2). The runs go to OUT/<recipe>_t224 (default OUT: runs/gpu): per-seed folders with config, history and
# test metrics, and summary.json / summary.txt (mean +- std over the seeds). WHEELS and SITE as in
# scripts/gpu/setup.sh.
set -o pipefail
if [ -z "${1:-}" ]; then
    echo "usage: bash scripts/gpu/medmamba_recipe.sh BREASTMNIST_NPZ [OUT] [RECIPE] [SEEDS]" >&2; exit 2
fi
data=$1; OUT=${2:-${OUT:-runs/gpu}}; recipe=${3:-strong}; seeds=${4:-0,1,2}
source scripts/gpu/setup.sh -- $WHEELS
mkdir -p "$OUT"
python3 -m nnunet_segmamba.cli classify train --data "$data" --out "$OUT/${recipe}_t224" --variant t \
    --image-size 224 --device cuda --quiet --recipe "$recipe" --seeds "$seeds" 2>&1 | tee "$OUT/${recipe}_t224.log" | tail -25
