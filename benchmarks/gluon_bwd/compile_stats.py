"""Registers, spills and channel-loop instructions of a Gluon variant, compiled for sm_90 without a GPU (as
benchmarks/triton_registers.py does for the Triton kernels): [KERNEL=name] [MAXNREG=n] python compile_stats.py FLAGS
(FLAGS: 1 SMEM_BC, 2 SMEM_ACC, 4 BC_F32)."""
import sys, os, re, subprocess, tempfile
from pathlib import Path
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
import benchmarks.triton_registers as tr
import kernels as gluon_bwd

def stats(kernel, consts, dtype="bf16", by_line=False):
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in consts:
            signature[name] = "constexpr"; continue
        if name.endswith("_ptr"):
            signature[name] = "*" + (dtype if name in tr.INPUT_DTYPE_POINTERS or name == "dBC_ptr" else "fp32")
        else:
            signature[name] = "i32"
        if name.endswith("_ptr") or name in tr.DIVISIBLE_INTS:
            attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(GluonASTSource(kernel, signature, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 1, **({"maxnreg": int(os.environ["MAXNREG"])} if os.environ.get("MAXNREG") else {})})
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"; ptx.write_text(compiled.asm["ptx"])
        cubin = os.path.join(tmp, "k.cubin")
        rep = subprocess.run([tr.ptxas_path(), "-v", *(["-lineinfo"] if by_line else []), "--gpu-name", "sm_90a", str(ptx), "-o", cubin], capture_output=True, text=True, check=True)
        nvd = str(Path(tr.ptxas_path()).parent / "nvdisasm")
        listing = subprocess.run([nvd, "-g", "-c", cubin], capture_output=True, text=True, check=True).stdout
    text = rep.stdout + rep.stderr
    print("shared bytes", compiled.metadata.shared)
    code = tr.parse_listing(listing)
    out = {"registers": int(re.search(r"Used (\d+) registers", text).group(1)), "spills": re.search(r"(\d+) bytes spill stores", text).group(1), **tr.loop_body(code)}
    if by_line: out["lines"] = tr.loop_lines(code, 20)
    return out

if __name__ == "__main__":
    smem = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    consts = {"NP": 16, "BL": 64, "MODE": 0, "HAS_D": True, "HAS_Z": True, "HAS_BIAS": True, "SOFTPLUS": True, "SMEM_BC": bool(smem & 1), "SMEM_ACC": bool(smem & 2), "BC_F32": bool(smem & 4)}
    r = stats(getattr(gluon_bwd, os.environ.get('KERNEL', '_bwd_chunk_gluon')), consts, by_line="--by-line" in sys.argv)
    lines = r.pop("lines", [])
    print(r)
    for l in lines: print(l)
