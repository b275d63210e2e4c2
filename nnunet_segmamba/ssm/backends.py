"""Finding and calling the compiled kernels (mamba-ssm's selective scan, causal-conv1d), and choosing a backend.

Backends, best first for CUDA tensors: "cuda" (mamba-ssm's compiled kernel), "triton" (ours, compiled at run
time: `triton_scan.py`, no extension to build), "torch" (the chunked PyTorch scan, the only one for CPU tensors).

mamba-ssm's package `__init__` imports its generation utilities, which fail with transformers 5.x
(`GreedySearchDecoderOnlyOutput` was removed). The compiled extension `selective_scan_cuda` that the wheel
installs as a top-level module imports fine, so we call it directly through our own autograd function and
never import `mamba_ssm` itself. Nothing here may raise at import time: a missing or broken kernel only makes
its backend unavailable, with the reason kept for `nnunet-segmamba doctor`.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

ENV_VAR = "NNUNET_SEGMAMBA_SCAN_BACKEND"
BACKENDS = ("auto", "cuda", "triton", "torch")
CUDA_INSTALL_HINT = (
    "install the GPU extra: pip install 'nnunet-segmamba[cuda]' (mamba-ssm and causal-conv1d built for your "
    "torch and CUDA), or use NNUNET_SEGMAMBA_SCAN_BACKEND=triton (no build needed) or =torch"
)


@functools.lru_cache(maxsize=None)
def load_extension(name: str):
    """Import a compiled extension module once. Returns (module or None, reason it is unusable or '')."""
    try:
        return importlib.import_module(name), ""
    except Exception as exc:  # ImportError, OSError (ABI / missing .so), anything a broken build raises
        return None, f"{type(exc).__name__}: {exc}"


# ---- run-time failure policy (docs/reliability.md) -------------------------------------------------------------
# The first RuntimeError of the kernel's forward (e.g. "no kernel image is available for execution on the device"
# from a wheel built for another GPU architecture) switches this process to the torch scan, with one warning;
# with NNUNET_SEGMAMBA_SCAN_BACKEND=cuda it is re-raised instead. Either way the kernel counts as unusable
# afterwards (`cuda_scan_status`), so later scans and `nnunet-segmamba doctor` see the reason.
_runtime_failure: str | None = None


def _cuda_explicitly_requested() -> bool:
    return os.environ.get(ENV_VAR, "").strip().lower() == "cuda"


def _record_runtime_failure(exc: BaseException, where: str) -> None:
    global _runtime_failure
    if _runtime_failure is None:
        _runtime_failure = f"the kernel's {where} failed in this process with {type(exc).__name__}: {exc}"


def cuda_scan_status() -> tuple[bool, str]:
    """Whether mamba-ssm's selective-scan kernel can be used, and why not."""
    if _runtime_failure is not None:
        return False, f"selective_scan_cuda (mamba-ssm) disabled: {_runtime_failure}"
    module, reason = load_extension("selective_scan_cuda")
    if module is None:
        return False, f"selective_scan_cuda (mamba-ssm) not importable: {reason}"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, "mamba-ssm selective_scan_cuda kernel"


def triton_interpreting() -> bool:
    """Triton's interpreter (TRITON_INTERPRET=1) runs the kernels on CPU tensors: how CI checks their math."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


_triton_failure: str | None = None


def run_triton(kernel_call, fallback_call, explicit: bool):
    """Run a Triton-backed call; on its first failure (a GPU Triton cannot compile for, a broken install) warn
    once, mark the kernels unusable in this process and run `fallback_call` (the torch path) instead, unless
    the triton backend was asked for by name or by the environment variable."""
    global _triton_failure
    try:
        return kernel_call()
    except Exception as exc:  # triton raises compilation and driver errors of several types
        if _triton_failure is None:
            _triton_failure = f"the Triton kernels failed in this process with {type(exc).__name__}: {exc}"
        if explicit or os.environ.get(ENV_VAR, "").strip().lower() == "triton":
            raise
        warnings.warn(f"our Triton kernels failed ({type(exc).__name__}: {exc}); this process uses the (slower) "
                      f"torch scan from now on. Set {ENV_VAR}=triton to make this an error.", RuntimeWarning,
                      stacklevel=3)
        return fallback_call()


def triton_scan_status() -> tuple[bool, str]:
    """Whether our Triton kernels can run, and why not."""
    from .triton_scan import TRITON_AVAILABLE, TRITON_REASON

    if _triton_failure is not None:
        return False, f"triton kernels disabled: {_triton_failure}"
    if not TRITON_AVAILABLE:
        return False, f"triton not importable: {TRITON_REASON}"
    if not torch.cuda.is_available() and not triton_interpreting():
        return False, "no CUDA device (triton kernels need one, or TRITON_INTERPRET=1 for the slow interpreter)"
    return True, "Triton selective-scan kernels (nnunet_segmamba.ssm.triton_scan)"


@functools.lru_cache(maxsize=None)
def causal_conv1d_function():
    """causal-conv1d's fused conv + SiLU, or None (with the reason) when it cannot be imported."""
    try:
        from causal_conv1d import causal_conv1d_fn

        return causal_conv1d_fn, ""
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


def resolve(backend: str, device: torch.device) -> str:
    """The backend a scan on `device` uses: an explicit choice, else the environment variable, else the best.

    The environment variable chooses among the backends that can run on the device: with it set to "cuda" or
    "triton", scans on CPU tensors still use "torch" (one setting serves a job that moves between devices, e.g.
    nnU-Net's export on CPU after training on GPU), while a missing kernel for CUDA tensors is an error, not a
    fallback. "auto" takes mamba-ssm's kernel where it loads, else the Triton kernels, else torch.
    """
    from_env = backend == "auto"
    if from_env:
        backend = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"scan backend must be one of {BACKENDS} (argument or ${ENV_VAR}), got {backend!r}")
    on_cuda = device.type == "cuda"
    if backend == "torch" or (from_env and not on_cuda and not (backend == "triton" and triton_interpreting())):
        return "torch"
    if backend == "triton":
        usable, reason = triton_scan_status()
        if not on_cuda and not triton_interpreting():
            raise ValueError(f"scan backend 'triton' needs CUDA tensors, got tensors on {device}")
        if not usable:
            raise RuntimeError(f"scan backend 'triton' is unavailable ({reason}); install triton (it comes with "
                               f"PyTorch on Linux) or use {ENV_VAR}=torch")
        return "triton"
    usable, reason = cuda_scan_status()
    if backend == "cuda":
        if not on_cuda:
            raise ValueError(f"scan backend 'cuda' needs CUDA tensors, got tensors on {device}")
        if not usable:
            raise RuntimeError(f"scan backend 'cuda' is unavailable ({reason}); {CUDA_INSTALL_HINT}")
        return "cuda"
    if not on_cuda:
        return "torch"
    if usable:
        return "cuda"
    return "triton" if triton_scan_status()[0] else "torch"


def supports_index_maps(name: str) -> bool:
    """Whether a resolved backend reads the reverse and inter-slice orders itself (no permuted copies)."""
    return name == "triton"


@functools.lru_cache(maxsize=None)
def _kernel_takes_cu_seqlens() -> bool:
    # mamba-ssm releases after 2.2.6 added a `cu_seqlens` argument to fwd/bwd; count the pybind signature.
    module, _ = load_extension("selective_scan_cuda")
    doc = (module.fwd.__doc__ or "") if module is not None else ""
    return "cu_seqlens" in doc or doc.split("->")[0].count(",") >= 9


class _CudaSelectiveScan(torch.autograd.Function):
    """Autograd around mamba-ssm's kernel. It saves the kernel's chunk states and recomputes the rest."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        kernel, _ = load_extension("selective_scan_cuda")
        extra = (None,) if _kernel_takes_cu_seqlens() else ()
        u, delta = u.contiguous(), delta.to(u.dtype).contiguous()
        # the kernel wants input-dependent B/C as (batch, groups, n, L) in u's dtype (it checks), and A, D and
        # delta_bias in float32
        ctx.squeeze_B, ctx.squeeze_C = B.dim() == 3, C.dim() == 3
        B = (B.unsqueeze(1) if B.dim() == 3 else B).to(u.dtype).contiguous()
        C = (C.unsqueeze(1) if C.dim() == 3 else C).to(u.dtype).contiguous()
        A = A.float().contiguous()
        D = D.float().contiguous() if D is not None else None
        z = z.to(u.dtype).contiguous() if z is not None else None
        delta_bias = delta_bias.float().contiguous() if delta_bias is not None else None
        out, states, *rest = kernel.fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, *extra)
        ctx.delta_softplus = delta_softplus
        ctx.has_z = z is not None
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states, out if z is not None else None)
        result = rest[0] if z is not None else out
        if return_last_state:
            ctx.mark_non_differentiable(last := states[:, :, -1, 1::2].float())
            return result, last
        return result

    @staticmethod
    def backward(ctx, dout, *_):
        kernel, _ = load_extension("selective_scan_cuda")
        extra = (None,) if _kernel_takes_cu_seqlens() else ()
        u, delta, A, B, C, D, z, delta_bias, states, out = ctx.saved_tensors
        try:
            du, ddelta, dA, dB, dC, dD, ddelta_bias, *rest = kernel.bwd(
                u, delta, A, B, C, D, z, delta_bias, dout.contiguous(), states, out, None, ctx.delta_softplus,
                False, *extra,
            )
        except RuntimeError as exc:  # this step cannot be saved; later scans use the torch backend
            _record_runtime_failure(exc, "backward")
            raise RuntimeError(f"mamba-ssm's selective-scan backward failed ({type(exc).__name__}: {exc}); "
                               f"scans after this one use the next backend (triton where it runs, else torch) "
                               f"unless {ENV_VAR}=cuda. "
                               f"{CUDA_INSTALL_HINT}") from exc
        dz = rest[0] if ctx.has_z else None
        dB = dB.squeeze(1) if ctx.squeeze_B else dB
        dC = dC.squeeze(1) if ctx.squeeze_C else dC
        return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz,
                ddelta_bias if delta_bias is not None else None, None, None)


def cuda_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                        fallback: bool = True):
    """mamba-ssm's kernel; on its first RuntimeError, the torch scan (see the failure policy above), unless
    `fallback` is False (the caller asked for backend="cuda" by name) or the environment variable says cuda."""
    dtype_in = u.dtype
    try:
        result = _CudaSelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    except RuntimeError as exc:
        _record_runtime_failure(exc, "forward")
        if not fallback:
            raise RuntimeError(f"backend='cuda' was requested, but mamba-ssm's selective-scan kernel failed "
                               f"({type(exc).__name__}: {exc}). {CUDA_INSTALL_HINT}") from exc
        if _cuda_explicitly_requested():
            raise RuntimeError(f"{ENV_VAR}=cuda, but mamba-ssm's selective-scan kernel failed "
                               f"({type(exc).__name__}: {exc}); unset it to fall back to the torch scan. "
                               f"{CUDA_INSTALL_HINT}") from exc
        warnings.warn(f"mamba-ssm's selective-scan kernel failed ({type(exc).__name__}: {exc}); this scan is "
                      f"redone with the torch scan, and later scans in this process use the next backend (triton "
                      f"where it runs, else torch). Set {ENV_VAR}=cuda to make this an error. "
                      f"{CUDA_INSTALL_HINT}", RuntimeWarning, stacklevel=2)
        from .selective_scan import selective_scan_torch

        return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if return_last_state:
        return result[0].to(dtype_in), result[1]
    return result.to(dtype_in)
