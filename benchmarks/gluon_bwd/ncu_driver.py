"""One scan fwd + bwd at SHAPE with VARIANT (ab_gpu.VARIANTS) for Nsight Compute to profile its backward kernel."""
import os, sys
sys.path.insert(0, os.path.dirname(__file__))
import torch
import ab_gpu as g

from benchmarks.bench_scan_gpu import scan_inputs, with_grad
from nnunet_segmamba.ssm import selective_scan
g.VARIANTS["g3_168"] = g.Shim(3, 168)
g.VARIANTS["g7_168"] = g.Shim(7, 168)
g.use(os.environ["VARIANT"])
L, D, batch = (int(v) for v in os.environ.get("SHAPE", "262144,96,2").split(","))
base = scan_inputs(batch, D, 16, L, torch.bfloat16)
leaves = with_grad(base)
dout = torch.randn(base["u"].shape, device="cuda").to(torch.bfloat16)
for _ in range(4):
    torch.autograd.grad(selective_scan(**leaves, delta_softplus=True, backend="triton"), list(leaves.values()), dout)
torch.cuda.synchronize()
