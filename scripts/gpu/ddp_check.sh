#!/usr/bin/env bash
# Issue 9, part 4, on the device tool's 2-GPU kind: nnU-Net's DDP training of SegMamba (`nnUNetv2_train ...
# -num_gpus 2`, the _5epochs variant on the 200 hippocampus cases), its test split predicted on one GPU, and the
# first test cases predicted with the same checkpoint on one GPU and on the CPU. The wheels exceed one call's
# carry, so two calls: first with .gpu/nn carried (`source scripts/gpu/setup.sh` installs it and stays installed
# while the machine is warm), then with .gpu/nn2 and .gpu/kern:
#   bash scripts/gpu/ddp_check.sh      (writes under $OUT)
set -o pipefail
source scripts/gpu/setup.sh
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never NVLink multicast here
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
nvidia-smi topo -m | tee -a "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda devices', torch.cuda.device_count())" | tee -a "$OUT/gpu.txt"
timeout 560 python3 -m benchmarks.hippocampus_study --data .gpu/kern/data/hippocampus --work /root/hippo_ddp \
    --trainers nnUNetTrainerSegMamba --epochs 5 --num-gpus 2 --device-check 4 --num-processes 28 \
    --out "$OUT/hippo_ddp.json" > "$OUT/hippo_ddp.log" 2>&1
echo "exit $?"
grep -iE "rank|world|DDP|gpus|epoch|pseudo dice|train_loss|val_loss|error|Traceback|predicted" "$OUT/hippo_ddp.log" | head -60
tail -25 "$OUT/hippo_ddp.log"
cp /root/hippo_ddp/nnUNet_results/Dataset004_Hippocampus/*/fold_0/training_log_*.txt "$OUT/" 2>/dev/null
cp /root/hippo_ddp/nnUNet_results/Dataset004_Hippocampus/*/fold_0/progress.png "$OUT/" 2>/dev/null
true
