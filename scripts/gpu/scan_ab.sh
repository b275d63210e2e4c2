#!/usr/bin/env bash
# A/B of triton scan versions on one GPU machine (issue 8): the working tree ("tree") against each
# runs/ab/triton_scan_<name>.py named in VARIANTS, alternating versions, two rounds of
# profile_scan_gpu.py timeline (+ one breakdown each), then mamba-ssm's timeline. Make a variant with
#   mkdir -p runs/ab && git show REV:nnunet_segmamba/ssm/triton_scan.py > runs/ab/triton_scan_REV.py
# and carry .gpu/bench and runs/ab. DT (bf16), SHAPE (32768x192); TESTS: pytest paths to run first on the tree.
# The JSON of every run is packed into $OUT/results.tgz (the device tool returns at most 8 files).
set -o pipefail
source scripts/gpu/setup.sh >/dev/null
RES=/tmp/scan_ab; rm -rf "$RES"; mkdir -p "$RES"
for v in $VARIANTS; do
    rm -rf "/tmp/$v" && mkdir "/tmp/$v" && cp -r nnunet_segmamba benchmarks "/tmp/$v/"
    cp "runs/ab/triton_scan_$v.py" "/tmp/$v/nnunet_segmamba/ssm/triton_scan.py"
done
if [ -n "$TESTS" ]; then
    timeout 240 python3 -m pytest -q -p no:cacheprovider $TESTS -k "not interpreter" 2>&1 | tail -3
fi
profile() {  # version, round, what
    local dir=$PWD steps=10; [ "$1" = tree ] || dir=/tmp/$1; [ "$3" = timeline ] && steps=40
    (cd "$dir" && PYTHONPATH="$dir:/root/gpusite" python3 -m benchmarks.profile_scan_gpu "$3" --backends triton \
        --shape "${SHAPE:-32768x192}" --dtype "${DT:-bf16}" --steps $steps --out "$RES/${3}_$1_$2.json" 2>/dev/null \
        | sed "s/^/$1: /")
}
for round in 1 2; do
    for v in tree $VARIANTS; do
        profile "$v" "$round" timeline | grep -E "^$v: triton|idle before"
        [ "$round" = 1 ] && profile "$v" "$round" breakdown | grep -E "^$v: triton|_chunk|reduce|copy"
    done
done
python3 -m benchmarks.profile_scan_gpu timeline --backends cuda --shape "${SHAPE:-32768x192}" --dtype "${DT:-bf16}" \
    --out "$RES/timeline_cuda.json" 2>/dev/null | grep -E "^cuda|idle before"
tar czf "$OUT/results.tgz" -C "$RES" .
