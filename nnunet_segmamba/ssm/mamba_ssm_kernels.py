"""mamba-ssm's compiled kernels: the selective scan (`selective_scan_cuda`) and causal-conv1d's fused conv.

mamba-ssm's package `__init__` imports its generation utilities, which fail with transformers 5.x
(`GreedySearchDecoderOnlyOutput` was removed). The compiled extension `selective_scan_cuda` that the wheel
installs as a top-level module imports fine, so we call it directly through our own autograd function and
never import `mamba_ssm` itself. Nothing here raises at import time: a missing or broken kernel only makes it
unavailable, with the reason kept for `nnunet-segmamba doctor`. When to fall back to another implementation
is decided in `dispatch.py`.
"""
from __future__ import annotations

import functools
import importlib

import torch

__all__ = ["CUDA_INSTALL_HINT", "MambaSelectiveScan", "causal_conv1d_function", "cuda_scan_status",
           "load_extension", "mark_unusable"]

CUDA_INSTALL_HINT = (
    "install the GPU extra: pip install 'nnunet-segmamba[cuda]' (mamba-ssm and causal-conv1d built for your "
    "torch and CUDA), or use scan_backend='triton' (no build needed) or 'torch'"
)


@functools.lru_cache(maxsize=None)
def load_extension(name: str):
    """Import a compiled extension module once. Returns (module or None, reason it is unusable or '')."""
    try:
        return importlib.import_module(name), ""
    except Exception as exc:  # ImportError, OSError (ABI / missing .so), anything a broken build raises
        return None, f"{type(exc).__name__}: {exc}"


# The first failure of the kernel at run time (e.g. "no kernel image is available for execution on the device"
# from a wheel built for another GPU architecture) marks it unusable for the rest of the process, so that later
# scans and `nnunet-segmamba doctor` see the reason (docs/reliability.md).
_runtime_failure: str | None = None


def mark_unusable(exc: BaseException, where: str) -> None:
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


@functools.lru_cache(maxsize=None)
def causal_conv1d_function():
    """causal-conv1d's fused conv + SiLU, or None (with the reason) when it cannot be imported."""
    try:
        from causal_conv1d import causal_conv1d_fn

        return causal_conv1d_fn, ""
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


@functools.lru_cache(maxsize=None)
def _kernel_takes_cu_seqlens() -> bool:
    # mamba-ssm releases after 2.2.6 added a `cu_seqlens` argument to fwd/bwd; count the pybind signature.
    module, _ = load_extension("selective_scan_cuda")
    doc = (module.fwd.__doc__ or "") if module is not None else ""
    return "cu_seqlens" in doc or doc.split("->")[0].count(",") >= 9


class MambaSelectiveScan(torch.autograd.Function):
    """Autograd around mamba-ssm's kernel. It saves the kernel's chunk states and recomputes the rest.

    apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state) with `selective_scan`'s
    shapes; the output comes back in the kernel's dtype (the caller casts it).
    """

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
        except RuntimeError as exc:  # this step cannot be saved; later scans use the next implementation
            mark_unusable(exc, "backward")
            raise RuntimeError(f"mamba-ssm's selective-scan backward failed ({type(exc).__name__}: {exc}); "
                               f"scans after this one use the next backend (triton where it runs, else torch) "
                               f"unless scan_backend='cuda' was asked for. {CUDA_INSTALL_HINT}") from exc
        dz = rest[0] if ctx.has_z else None
        dB = dB.squeeze(1) if ctx.squeeze_B else dB
        dC = dC.squeeze(1) if ctx.squeeze_C else dC
        return (du, ddelta, dA, dB, dC, dD if D is not None else None, dz,
                ddelta_bias if delta_bias is not None else None, None, None)
