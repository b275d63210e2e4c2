"""The selective-scan core: `selective_scan` (dispatching to the CUDA kernel or the chunked PyTorch scan), the
readable reference `selective_scan_ref`, and the causal depthwise convolution that precedes it."""
from .causal_conv import causal_conv1d
from .selective_scan import selective_scan, selective_scan_ref, selective_scan_torch

__all__ = ["causal_conv1d", "selective_scan", "selective_scan_ref", "selective_scan_torch"]
