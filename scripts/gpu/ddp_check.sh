#!/usr/bin/env bash
# nnU-Net's DDP training of SegMamba on two GPUs (`nnUNetv2_train ... -num_gpus 2`, the _5epochs variant on the
# MSD hippocampus cases), its test split predicted on one GPU, and the first 4 test cases predicted with the same
# checkpoint on one GPU and on the CPU (benchmarks/hippocampus_study.py).
#
#   bash scripts/gpu/ddp_check.sh HIPPOCAMPUS_DIR [WORK] [OUT]
#
# Run from the repository root on a machine with 2 CUDA GPUs. HIPPOCAMPUS_DIR: the MSD Task04 hippocampus cases as
# images/CASE.nii.gz and labels/CASE.nii.gz; WORK (default runs/hippo_ddp): nnU-Net's raw / preprocessed / results
# folders; OUT (default runs/gpu): hippo_ddp.json, the log and nnU-Net's training log. NUM_PROCESSES (default:
# the CPU count) goes to --num-processes; COMPILE (default: default, i.e. nnU-Net's rule, compiled on CUDA; or
# off) to --compile. The study runs nnU-Net with NCCL's NVLink multicast off. WHEELS and SITE as in
# scripts/gpu/setup.sh.
set -o pipefail
if [ -z "${1:-}" ]; then
    echo "usage: bash scripts/gpu/ddp_check.sh HIPPOCAMPUS_DIR [WORK] [OUT]" >&2; exit 2
fi
data=$1; work=${2:-runs/hippo_ddp}
source scripts/gpu/setup.sh -- $WHEELS
OUT=${3:-${OUT:-runs/gpu}}; mkdir -p "$OUT"
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
nvidia-smi topo -m | tee -a "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda devices', torch.cuda.device_count())" | tee -a "$OUT/gpu.txt"
python3 -m benchmarks.hippocampus_study --data "$data" --work "$work" --trainers nnUNetTrainerSegMamba --epochs 5 \
    --num-gpus 2 --device-check 4 --num-processes "${NUM_PROCESSES:-$(nproc)}" --compile "${COMPILE:-default}" --out "$OUT/hippo_ddp.json" > "$OUT/hippo_ddp.log" 2>&1
echo "exit $?"
grep -iE "rank|world|DDP|gpus|epoch|pseudo dice|train_loss|val_loss|error|Traceback|predicted" "$OUT/hippo_ddp.log" | head -60
tail -25 "$OUT/hippo_ddp.log"
cp "$work"/nnUNet_results/Dataset004_Hippocampus/*/fold_0/training_log_*.txt "$OUT/" 2>/dev/null
cp "$work"/nnUNet_results/Dataset004_Hippocampus/*/fold_0/progress.png "$OUT/" 2>/dev/null
true
