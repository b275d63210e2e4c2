"""The selective-scan core: `selective_scan` (dispatching to mamba-ssm's CUDA kernel, our Triton kernels or the
chunked PyTorch scan), the readable reference `selective_scan_ref`, the causal depthwise convolution that precedes
it, and `visit`, the reverse / inter-slice visiting orders."""
from .causal_conv import causal_conv1d
from .selective_scan import selective_scan, selective_scan_ref, selective_scan_torch, visit

__all__ = ["causal_conv1d", "selective_scan", "selective_scan_ref", "selective_scan_torch", "visit"]
