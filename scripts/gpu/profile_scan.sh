#!/usr/bin/env bash
# One device-tool call (issue 8): where the scan's forward+backward time goes at one shape, per kernel
# (torch.profiler) and inside the kernels (Nsight Compute: occupancy, stall reasons, instruction mix, per-line
# SASS samples), triton and mamba-ssm's kernel side by side. Needs ncu with hardware counters (the nvidia-h200
# kind, Firecracker). Run from the repo root with .gpu/bench carried:  bash scripts/gpu/profile_scan.sh
# SHAPE (default 32768x192) and DTYPE (default bf16) pick the case. The device tool returns at most 8 files from
# $OUT, so the reports themselves stay in $WORK and only their text pages come back.
set -o pipefail
source scripts/gpu/setup.sh
OUT=${OUT:-runs/gpu}; WORK=$(mktemp -d); mkdir -p "$OUT"
SHAPE=${SHAPE:-32768x192}; DTYPE=${DTYPE:-bf16}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$OUT/gpu.txt"
ncu --version | tail -1 | tee -a "$OUT/gpu.txt"
for dtype in bf16 fp32; do
    timeout 120 python3 -m benchmarks.profile_scan_gpu breakdown --shape "$SHAPE" --dtype $dtype \
        --out "$OUT/breakdown_$dtype.json" 2>&1 | grep -v -i warn | tee -a "$OUT/breakdown.md"
done
step="-m benchmarks.profile_scan_gpu step --shape $SHAPE --dtype $DTYPE --steps 4"
# 3 steps skipped (compilation, caches), the 4th profiled: 6 triton launches per step, 2 of mamba-ssm's
timeout 200 ncu --clock-control none --set full --import-source yes --force-overwrite --export "$WORK/triton" \
    --kernel-name regex:'^(_fwd_chunk_summary|_chunk_carry|_fwd_chunk_output|_bwd_chunk_summary|_bwd_chunk)$' \
    --launch-skip 18 --launch-count 6 python3 $step --backend triton > "$OUT/ncu.log" 2>&1
timeout 100 ncu --clock-control none --set full --force-overwrite --export "$WORK/cuda" \
    --kernel-name regex:'selective_scan_(fwd|bwd)_kernel' --launch-skip 6 --launch-count 2 \
    python3 $step --backend cuda >> "$OUT/ncu.log" 2>&1
for rep in triton cuda; do
    [ -f "$WORK/$rep.ncu-rep" ] && ncu --import "$WORK/$rep.ncu-rep" --page details > "$OUT/${rep}_details.txt" 2>&1
done
[ -f "$WORK/triton.ncu-rep" ] && ncu --import "$WORK/triton.ncu-rep" --kernel-name regex:'^_bwd_chunk$' --page source \
    --csv --print-source sass > "$OUT/triton_bwd_sass.csv" 2>&1
# the headline numbers of each kernel, for the reply
headline='^  [A-Za-z_]+.*\(|Duration|Registers Per Thread|Achieved Occupancy|Executed Ipc Active|Issue Slots Busy'
grep -E "$headline|No Eligible|Local Memory Spilling Requests  " \
    "$OUT/triton_details.txt" "$OUT/cuda_details.txt" 2>/dev/null | cut -c1-150
