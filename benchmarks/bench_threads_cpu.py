"""CPU thread settings vs one SegMamba training step (forward + backward), to choose OMP settings for CPU runs.

    OMP_WAIT_POLICY=ACTIVE  OMP_NUM_THREADS=2 python -m benchmarks.bench_threads_cpu
    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=2 python -m benchmarks.bench_threads_cpu
    OMP_NUM_THREADS=1 python -m benchmarks.bench_threads_cpu

The tiny SegMamba of the demo trainer (feat_size 8-64, depths 1, deep supervision) on 2 x 4 x 48^3. Prints the
thread count and the wall time of each run (the first includes warm-up). Run it once on an idle machine and once
with other processes busy to see what the wait policy does.
"""
import os
import time

import torch

from nnunet_segmamba.networks import SegMamba


def main(runs: int = 2) -> None:
    torch.manual_seed(0)
    net = SegMamba(4, 3, feat_size=(8, 16, 32, 64), hidden_size=64, depths=(1, 1, 1, 1), deep_supervision=True)
    x = torch.randn(2, 4, 48, 48, 48)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        outputs = net(x)
        sum(o.mean() for o in outputs).backward()
        times.append(round(time.perf_counter() - start, 2))
    print(f"threads={torch.get_num_threads()} OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')} "
          f"seconds per step: {times}")


if __name__ == "__main__":
    main()
