"""Choosing a selective-scan implementation, and falling back when one fails. No arithmetic lives here.

Implementations (`scan_backend` names):
    "cuda"    mamba-ssm's compiled kernel (`mamba_ssm_kernels.py`), with causal-conv1d's fused conv   CUDA
    "triton"  our Triton kernels (`triton_scan.py`, `triton_conv.py`), compiled at run time          CUDA
    "cpu"     our fused C++ scan and conv (`cpu_scan.py`), compiled at first use                     CPU
    "torch"   the chunked PyTorch scan (`torch_scan.py`)                                              any
"auto" takes the best that runs on the tensors' device: cuda, else triton, else torch for CUDA tensors; cpu,
else torch (no C++ compiler), for CPU tensors. The environment variable NNUNET_SEGMAMBA_SCAN_BACKEND
only sets what "auto" means (for a whole job without touching code); an explicit argument always wins.

Failure policy (docs/reliability.md): the first run-time failure of a kernel chosen by "auto" warns once, marks
that kernel unusable for the rest of the process and redoes the call on the next implementation; a kernel asked
for by name (argument or environment variable) raises instead.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

from . import cpu_scan, mamba_ssm_kernels, triton_common
from .mamba_ssm_kernels import CUDA_INSTALL_HINT, cuda_scan_status
from .orders import visit
from .torch_scan import causal_conv1d_torch, selective_scan_torch

__all__ = ["BACKENDS", "ENV_VAR", "backend_from_env", "causal_conv1d_eager", "cuda_scan_status", "resolve",
           "scan_keeps_residuals", "selective_scan_eager", "selective_scan_keeping_residuals", "triton_scan_status"]

ENV_VAR = "NNUNET_SEGMAMBA_SCAN_BACKEND"
BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")


def backend_from_env() -> str:
    """What NNUNET_SEGMAMBA_SCAN_BACKEND asks "auto" to mean, as `resolve` reads it ("" when unset)."""
    return os.environ.get(ENV_VAR, "").strip().lower()


_triton_failure: str | None = None


def triton_scan_status() -> tuple[bool, str]:
    """Whether our Triton kernels can run, and why not."""
    if _triton_failure is not None:
        return False, f"triton kernels disabled: {_triton_failure}"
    if not triton_common.TRITON_AVAILABLE:
        return False, f"triton not importable: {triton_common.TRITON_IMPORT_ERROR}"
    if not torch.cuda.is_available() and not triton_common.interpreting():
        return False, "no CUDA device (triton kernels need one, or TRITON_INTERPRET=1 for the slow interpreter)"
    return True, "Triton selective-scan kernels (nnunet_segmamba.ssm.triton_scan)"


def resolve(backend: str, device: torch.device) -> str:
    """The implementation a scan on `device` uses: an explicit choice, else the environment variable, else the best.

    The environment variable chooses among the implementations that can run on the device: with it set to
    "cuda" or "triton", scans on CPU tensors use the best CPU implementation, and with "cpu" scans on CUDA tensors
    the best CUDA one (one setting serves a job that moves between devices, e.g. nnU-Net's export on CPU after
    training on GPU), while a missing kernel for the device it names is an error, not a fallback.
    """
    from_env = backend == "auto"
    if from_env:
        backend = backend_from_env() or "auto"
    if backend not in BACKENDS:
        source = f"${ENV_VAR}" if from_env else "scan_backend"
        raise ValueError(f"{source} must be one of {BACKENDS}, got {backend!r}")
    on_cuda = device.type == "cuda"
    interpreted = triton_common.interpreting()
    if backend == "torch":
        return "torch"
    if from_env and backend == "cpu" and device.type != "cpu":
        backend = "auto"
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"scan_backend 'cpu' needs CPU tensors, got tensors on {device}")
        usable, reason = cpu_scan.cpu_scan_status()
        if not usable:
            raise RuntimeError(f"scan_backend 'cpu' is unavailable ({reason}); it needs a C++ compiler (g++ or "
                               f"clang++); or use scan_backend='torch'")
        return "cpu"
    if not on_cuda and (backend == "auto" or (from_env and not (backend == "triton" and interpreted))):
        return "cpu" if device.type == "cpu" and cpu_scan.cpu_scan_status()[0] else "torch"
    if backend == "triton":
        usable, reason = triton_scan_status()
        if not on_cuda and not interpreted:
            raise ValueError(f"scan_backend 'triton' needs CUDA tensors, got tensors on {device}")
        if not usable:
            raise RuntimeError(f"scan_backend 'triton' is unavailable ({reason}); install triton (it comes with "
                               f"PyTorch on Linux) or use scan_backend='torch'")
        return "triton"
    usable, reason = cuda_scan_status()
    if backend == "cuda":
        if not on_cuda:
            raise ValueError(f"scan_backend 'cuda' needs CUDA tensors, got tensors on {device}")
        if not usable:
            raise RuntimeError(f"scan_backend 'cuda' is unavailable ({reason}); {CUDA_INSTALL_HINT}")
        return "cuda"
    if usable:
        return "cuda"
    return "triton" if triton_scan_status()[0] else "torch"


def supports_index_maps(name: str) -> bool:
    """Whether a resolved implementation reads the reverse and inter-slice orders itself (no permuted copies)."""
    return name in ("triton", "cpu")


def _run_triton(kernel_call, fallback_call, explicit: bool):
    """Run a Triton-backed call; on its first failure (a GPU Triton cannot compile for, a broken install) warn
    once, mark the kernels unusable in this process and run `fallback_call` instead, unless triton was asked
    for by name (`explicit`) or by the environment variable."""
    global _triton_failure
    try:
        return kernel_call()
    except Exception as exc:  # triton raises compilation and driver errors of several types
        if _triton_failure is None:
            _triton_failure = f"the Triton kernels failed in this process with {type(exc).__name__}: {exc}"
        if explicit or backend_from_env() == "triton":
            raise
        warnings.warn(f"our Triton kernels failed ({type(exc).__name__}: {exc}); this process uses the (slower) "
                      f"torch scan from now on. Set {ENV_VAR}=triton to make this an error.", RuntimeWarning,
                      stacklevel=3)
        return fallback_call()


def _run_mamba_ssm(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, explicit: bool):
    """mamba-ssm's kernel; on its first RuntimeError, the torch scan (see the policy above)."""
    dtype_in = u.dtype
    try:
        result = mamba_ssm_kernels.MambaSelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                                            return_last_state)
    except RuntimeError as exc:
        mamba_ssm_kernels.mark_unusable(exc, "forward")
        if explicit:
            raise RuntimeError(f"scan_backend='cuda' was requested, but mamba-ssm's selective-scan kernel failed "
                               f"({type(exc).__name__}: {exc}). {CUDA_INSTALL_HINT}") from exc
        if backend_from_env() == "cuda":
            raise RuntimeError(f"{ENV_VAR}=cuda, but mamba-ssm's selective-scan kernel failed "
                               f"({type(exc).__name__}: {exc}); unset it to fall back to the torch scan. "
                               f"{CUDA_INSTALL_HINT}") from exc
        warnings.warn(f"mamba-ssm's selective-scan kernel failed ({type(exc).__name__}: {exc}); this scan is "
                      f"redone with the torch scan, and later scans in this process use the next backend (triton "
                      f"where it runs, else torch). Set {ENV_VAR}=cuda to make this an error. "
                      f"{CUDA_INSTALL_HINT}", RuntimeWarning, stacklevel=3)
        return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if return_last_state:
        return result[0].to(dtype_in), result[1]
    return result.to(dtype_in)


def selective_scan_eager(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False, backend: str = "auto", order: str = "forward",
                         num_slices: int | None = None):
    """`api.selective_scan` without the custom op: resolve the backend, run it, fall back on failure.

    The one place that maps a backend name to an implementation (a new implementation is one branch here and
    one name in `resolve`); the custom op's forward and backward call it too.
    """
    name = resolve(backend, u.device)
    if A.dim() == 3 and name != "triton":
        return _scan_each_set(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, backend, order,
                              num_slices)
    if name == "cpu":
        return cpu_scan.selective_scan_cpu(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                           order=order, num_slices=num_slices)
    if name == "triton":
        from .triton_scan import selective_scan_triton

        return _run_triton(
            lambda: selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                          mode=order, num_slices=num_slices),
            lambda: selective_scan_eager(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                         backend="torch", order=order, num_slices=num_slices),
            explicit=backend == "triton")

    def run(u, delta, B, C, z):
        if name == "cuda":
            return _run_mamba_ssm(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                  explicit=backend == "cuda")
        return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)

    if order == "forward":
        return run(u, delta, B, C, z)

    def v(t):
        return visit(t, order, num_slices) if t is not None else None

    result = run(v(u), v(delta), v(B), v(C), v(z))
    if return_last_state:
        return visit(result[0], order, num_slices, inverse=True), result[1]
    return visit(result, order, num_slices, inverse=True)


def _block(t: torch.Tensor | None, i: int, blocks: int) -> torch.Tensor | None:
    """The i-th of `blocks` equal blocks of a batch-first tensor (None stays None)."""
    return None if t is None else t.chunk(blocks)[i]


def _set(t: torch.Tensor | None, i: int) -> torch.Tensor | None:
    """Parameter set i of a (sets, ...) parameter (None stays None)."""
    return None if t is None else t[i]


def _scan_each_set(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, backend, order,
                   num_slices):
    """Parameter sets (A of shape (sets, d, n)) where the implementation has none: each set's block of the batch
    scanned alone, the results stacked again (what the Triton kernels compute in one launch)."""
    sets = A.shape[0]
    results = [selective_scan_eager(_block(u, i, sets), _block(delta, i, sets), A[i], _block(B, i, sets),
                                    _block(C, i, sets), _set(D, i), _block(z, i, sets), _set(delta_bias, i),
                                    delta_softplus, return_last_state, backend, order, num_slices)
               for i in range(sets)]
    if return_last_state:
        return torch.cat([r[0] for r in results]), torch.cat([r[1] for r in results])
    return torch.cat(results)


@functools.lru_cache(maxsize=None)
def _keeps_residuals(backend: str, device_type: str, from_env: str) -> bool:
    return resolve(backend, torch.device(device_type)) == "triton"


def scan_keeps_residuals(backend: str, device: torch.device) -> bool:
    """Whether the compiled scan (`ops.selective_scan`) keeps the Triton kernels' chunk states for its backward,
    instead of running the forward again there (as it does for the other implementations).

    Decided at the first call for a (backend, device type, environment variable) and then fixed for the process:
    the op's fake function promises the residuals' shapes when the graph is traced, and a Triton failure after
    that (which switches later scans to the fallback) must not change the shapes the compiled graph receives.
    """
    return _keeps_residuals(backend, device.type, backend_from_env())


def selective_scan_keeping_residuals(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, backend: str,
                                     order: str, num_slices: int | None):
    """The forward of a scan for which `scan_keeps_residuals`: (out, last_state, states, chunk_sum) from the Triton
    kernels; where they fail (now or earlier in the process), the fallback's (out, last_state) with unused
    residual buffers of the promised shapes (the backward then recomputes; see `ops.selective_scan_bwd`)."""
    from .triton_scan import residual_shapes, selective_scan_triton_fwd

    def fallback():
        out, last = selective_scan_eager(u, delta, A, B, C, D, z, delta_bias, delta_softplus, True, backend, order,
                                         num_slices)
        return (out, last, *(u.new_empty(shape, dtype=torch.float32)
                             for shape in residual_shapes(u.shape, A.shape[-1])))

    if not triton_scan_status()[0]:
        return fallback()
    return _run_triton(lambda: selective_scan_triton_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                                         mode=order, num_slices=num_slices),
                       fallback, explicit=backend == "triton")


def causal_conv1d_eager(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        silu: bool = True, backend: str = "auto", order: str = "forward",
                        num_slices: int | None = None) -> torch.Tensor:
    """`api.causal_conv1d` without the custom op: resolve the backend, run it, fall back on failure (the one place
    that maps a backend name to a conv implementation; the custom op calls it too)."""
    from .triton_conv import causal_conv1d_triton, conv_weight_rows  # imports without triton; raises only when called

    weight = conv_weight_rows(weight, x.shape[1])
    name = resolve(backend, x.device)
    if weight.dim() == 3 and name != "triton":  # parameter sets where the implementation has none: set by set
        sets = weight.shape[0]
        return torch.cat([causal_conv1d_eager(_block(x, i, sets), weight[i], _set(bias, i), silu, backend, order,
                                              num_slices) for i in range(sets)])
    if name == "cpu":
        return cpu_scan.causal_conv1d_cpu(x, weight, bias, silu=silu, order=order, num_slices=num_slices)
    if name == "triton":
        return _run_triton(
            lambda: causal_conv1d_triton(x, weight, bias, silu=silu, mode=order, num_slices=num_slices),
            lambda: causal_conv1d_eager(x, weight, bias, silu, backend="torch", order=order, num_slices=num_slices),
            explicit=backend == "triton")
    if order != "forward":
        out = causal_conv1d_eager(visit(x, order, num_slices), weight, bias, silu, backend=name)
        return visit(out, order, num_slices, inverse=True)
    if name == "cuda":
        fused, _ = mamba_ssm_kernels.causal_conv1d_function()
        if fused is not None:
            return fused(x, weight.to(x.dtype), bias.to(x.dtype) if bias is not None else None,
                         activation="silu" if silu else None)
        if triton_scan_status()[0]:
            # without causal-conv1d, our Triton kernel: measured faster than cuDNN's depthwise conv1d + SiLU
            return _run_triton(lambda: causal_conv1d_triton(x, weight, bias, silu=silu),
                               lambda: causal_conv1d_torch(x, weight, bias, silu), explicit=False)
    return causal_conv1d_torch(x, weight, bias, silu)
