"""Gluon variants of _bwd_chunk against the Triton kernel on one GPU: gradients of the whole scan (forward, reverse
and slice orders; three shapes) against the Triton kernel's, then fwd + bwd in CUDA graphs at three shapes, two rounds,
the variants alternating. PYTHONPATH=. OUT=DIR python3 benchmarks/gluon_bwd/ab_gpu.py (docs/results/gluon_bwd_chunk_ab.json)."""
import json, sys, os, time
sys.path.insert(0, os.path.dirname(__file__))
import torch
import kernels as gluon_bwd
from nnunet_segmamba.ssm import triton_scan, selective_scan
from benchmarks.bench_scan_gpu import scan_inputs, with_grad, GRAD_NAMES, time_graphed

ORIG = triton_scan._bwd_chunk
args_L = ORIG.arg_names.index('L')


class Shim:
    def __init__(self, smem, maxnreg, kernel="_bwd_chunk_gluon"):
        self.smem, self.maxnreg, self.kernel = smem, maxnreg, getattr(gluon_bwd, kernel)

    def __getitem__(self, grid):
        def launch(*args, **kw):
            if kw["BL"] != 64 or kw["NP"] != 16 or ((kw["MODE"] != 0 or args[args_L] % 16) and self.kernel is gluon_bwd._bwd_chunk_gluon_pf):
                return ORIG[grid](*args, **kw)
            extra = {"maxnreg": self.maxnreg} if self.maxnreg else {}
            return self.kernel[grid](*args, SMEM_BC=bool(self.smem & 1), SMEM_ACC=bool(self.smem & 2),
                                                    BC_F32=bool(self.smem & 4), **extra, **kw)
        return launch


VARIANTS = {"triton": None, "g3_168": Shim(3, 168), "u3_168": Shim(3, 168, "_bwd_chunk_gluon_u"),
            "u3_152": Shim(3, 152, "_bwd_chunk_gluon_u"), "u3_255": Shim(3, None, "_bwd_chunk_gluon_u")}
if os.environ.get("VARIANTS"):
    VARIANTS = {k: VARIANTS[k] for k in os.environ["VARIANTS"].split(",")}


def use(name):
    triton_scan._bwd_chunk = ORIG if VARIANTS[name] is None else VARIANTS[name]


def grads(base, mode, num_slices, dout):
    leaves = with_grad(base)
    out = selective_scan(**leaves, delta_softplus=True, backend="triton", order=mode,
                         num_slices=num_slices if mode == "slice" else None)
    return torch.autograd.grad(out, [leaves[k] for k in GRAD_NAMES], dout)


def main():
    report = {"check": {}, "time": {}}
    for (L, D, batch, ns) in ([(18432, 96, 7, 24), (4096, 48, 2, 16), (1000, 96, 1, 10)] if not os.environ.get("NOCHECK") else [(4096, 48, 2, 16)]):
        base = scan_inputs(batch, D, 16, L, torch.bfloat16)
        dout = torch.randn(base["u"].shape, device="cuda").to(torch.bfloat16)
        for mode in ("forward", "reverse", "slice"):
            try:
                use("triton"); ref = grads(base, mode, ns, dout)
            except TypeError:
                ref = None
            for name in VARIANTS:
                if name == "triton":
                    continue
                try:
                    use(name); got = grads(base, mode, ns, dout)
                    err = {k: ((g.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-30)).item()
                           for k, g, r in zip(GRAD_NAMES, got, ref)}
                    report["check"][f"{L}x{D}b{batch} {mode} {name}"] = max(err.values())
                    print(f"{L}x{D} b{batch} {mode} {name}: max rel err {max(err.values()):.2e} {err}", flush=True)
                except Exception as exc:
                    report["check"][f"{L}x{D}b{batch} {mode} {name}"] = repr(exc)[:500]
                    print(f"{name} failed: {exc!r}"[:2000], flush=True)
    use("triton")
    for (L, D, batch) in [(262144, 96, 2), (18432, 96, 7), (32768, 192, 2)]:
        base = scan_inputs(batch, D, 16, L, torch.bfloat16)
        leaves = with_grad(base)
        dout = torch.randn(base["u"].shape, device="cuda").to(torch.bfloat16)

        def step():
            torch.autograd.grad(selective_scan(**leaves, delta_softplus=True, backend="triton"), list(leaves.values()), dout)
        for rnd in range(2):
            for name in VARIANTS:
                if name != "triton" and not all(isinstance(v, float) and v < 5e-3 for k, v in report["check"].items() if k.endswith(" " + name)):
                    continue
                use(name)
                ms = time_graphed(step, 3, 30)["mean_ms"]
                report["time"].setdefault(f"{L}x{D}b{batch} {name}", []).append(ms)
                print(f"{L}x{D} b{batch} round {rnd} {name}: {ms:.3f} ms", flush=True)
        use("triton")
    os.makedirs(os.environ.get("OUT", "/tmp"), exist_ok=True)
    json.dump(report, open(os.path.join(os.environ.get("OUT", "/tmp"), "gluon_check.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
