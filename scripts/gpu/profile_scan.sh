#!/usr/bin/env bash
# Where the scan's forward+backward time goes at one shape, per kernel (torch.profiler) and inside the kernels
# (Nsight Compute: occupancy, stall reasons, instruction mix, per-line SASS samples), Triton and mamba-ssm's
# kernel side by side.
#
#   bash scripts/gpu/profile_scan.sh [OUT]
#
# Run from the repository root on a CUDA machine whose `ncu` may read the hardware counters. SHAPE (default
# 32768x192) and DTYPE (default bf16) pick the case. OUT (default runs/gpu) receives gpu.txt, breakdown.md,
# breakdown_<dtype>.json, ncu.log, the Nsight Compute reports (triton.ncu-rep, cuda.ncu-rep), their detail pages
# as text and the SASS of the backward's main kernel as CSV. WHEELS and SITE as in scripts/gpu/setup.sh.
set -o pipefail
source scripts/gpu/setup.sh -- $WHEELS
OUT=${1:-${OUT:-runs/gpu}}; mkdir -p "$OUT"
SHAPE=${SHAPE:-32768x192}; DTYPE=${DTYPE:-bf16}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$OUT/gpu.txt"
ncu --version | tail -1 | tee -a "$OUT/gpu.txt"
for dtype in bf16 fp32; do
    python3 -m benchmarks.profile_scan_gpu breakdown --shape "$SHAPE" --dtype $dtype \
        --out "$OUT/breakdown_$dtype.json" 2>&1 | grep -v -i warn | tee -a "$OUT/breakdown.md"
done
step="-m benchmarks.profile_scan_gpu step --shape $SHAPE --dtype $DTYPE --steps 4"
# 3 steps skipped (compilation, caches), the 4th profiled: 6 triton launches per step, 2 of mamba-ssm's
ncu --clock-control none --set full --import-source yes --force-overwrite --export "$OUT/triton" \
    --kernel-name regex:'^(_fwd_chunk_summary|_chunk_carry|_fwd_chunk_output|_bwd_chunk_summary|_bwd_chunk)$' \
    --launch-skip 18 --launch-count 6 python3 $step --backend triton > "$OUT/ncu.log" 2>&1
ncu --clock-control none --set full --force-overwrite --export "$OUT/cuda" \
    --kernel-name regex:'selective_scan_(fwd|bwd)_kernel' --launch-skip 6 --launch-count 2 \
    python3 $step --backend cuda >> "$OUT/ncu.log" 2>&1
for rep in triton cuda; do
    [ -f "$OUT/$rep.ncu-rep" ] && ncu --import "$OUT/$rep.ncu-rep" --page details > "$OUT/${rep}_details.txt" 2>&1
done
[ -f "$OUT/triton.ncu-rep" ] && ncu --import "$OUT/triton.ncu-rep" --kernel-name regex:'^_bwd_chunk$' --page source \
    --csv --print-source sass > "$OUT/triton_bwd_sass.csv" 2>&1
# the headline numbers of each kernel
headline='^  [A-Za-z_]+.*\(|Duration|Registers Per Thread|Achieved Occupancy|Executed Ipc Active|Issue Slots Busy'
grep -E "$headline|No Eligible|Local Memory Spilling Requests  " \
    "$OUT/triton_details.txt" "$OUT/cuda_details.txt" 2>/dev/null | cut -c1-150
