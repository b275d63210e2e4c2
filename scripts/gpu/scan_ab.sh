#!/usr/bin/env bash
# A/B of Triton scan versions on one GPU: the working tree ("tree") against each given copy of triton_scan.py,
# alternating versions, two rounds of `python -m benchmarks.profile_scan_gpu timeline` (40 steps; a breakdown per
# version in the first round), then mamba-ssm's timeline.
#
#   bash scripts/gpu/scan_ab.sh [TRITON_SCAN_PY ...]
#
# Make a variant from any commit with
#   mkdir -p runs/ab && git show REV:nnunet_segmamba/ssm/triton_scan.py > runs/ab/triton_scan_REV.py
# and pass its path; the version is named after the file (triton_scan_REV.py -> REV). Each variant runs in its
# own copy of nnunet_segmamba/ and benchmarks/ under $OUT/ab_trees. Environment: OUT (default runs/gpu/ab)
# receives <what>_<version>_<round>.json and timeline_cuda.json; DT (default bf16) and SHAPE (default 32768x192)
# pick the case, GATE=0 takes the gate out of the scan (the trainers' layers: 262144x96 is their first stage at
# 128^3); TESTS: pytest paths to run on the tree first (without the interpreter test). WHEELS and SITE as in
# scripts/gpu/setup.sh.
set -o pipefail
source scripts/gpu/setup.sh -- $WHEELS >/dev/null
OUT=${OUT:-runs/gpu/ab}; mkdir -p "$OUT"
trees=$OUT/ab_trees; rm -rf "$trees"; mkdir -p "$trees"
variants=()
for file in "$@"; do
    v=$(basename "$file" .py); v=${v#triton_scan_}
    mkdir "$trees/$v" && cp -r nnunet_segmamba benchmarks "$trees/$v/"
    cp "$file" "$trees/$v/nnunet_segmamba/ssm/triton_scan.py"
    variants+=("$v")
done
if [ -n "$TESTS" ]; then
    python3 -m pytest -q -p no:cacheprovider $TESTS -k "not interpreter" 2>&1 | tail -3
fi
res=$(cd "$OUT" && pwd)
gate=; [ "${GATE:-1}" = 0 ] && gate=--no-gate
profile() {  # version, round, what
    local dir=$PWD steps=10; [ "$1" = tree ] || dir=$(cd "$trees/$1" && pwd); [ "$3" = timeline ] && steps=40
    (cd "$dir" && PYTHONPATH="$dir:$SITE" python3 -m benchmarks.profile_scan_gpu "$3" --backends triton \
        --shape "${SHAPE:-32768x192}" --dtype "${DT:-bf16}" $gate --steps $steps --out "$res/${3}_$1_$2.json" \
        2>/dev/null | sed "s/^/$1: /")
}
for round in 1 2; do
    for v in tree "${variants[@]}"; do
        profile "$v" "$round" timeline | grep -E "^$v: triton|idle before"
        [ "$round" = 1 ] && profile "$v" "$round" breakdown | grep -E "^$v: triton|_chunk|reduce|copy"
    done
done
python3 -m benchmarks.profile_scan_gpu timeline --backends cuda --shape "${SHAPE:-32768x192}" --dtype "${DT:-bf16}" \
    $gate --out "$res/timeline_cuda.json" 2>/dev/null | grep -E "^cuda|idle before"
