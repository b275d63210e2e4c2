"""The selective-scan core, one module per concern:

    torch_scan.py         the readable definition `selective_scan_ref`, the chunked PyTorch scan, the torch conv
    mamba_ssm_kernels.py  mamba-ssm's compiled scan and causal-conv1d's conv (optional GPU extra)
    triton_scan.py        our Triton scan; triton_conv.py our Triton causal conv; triton_common.py what they share
    orders.py             the forward / reverse / inter-slice visiting orders and the one `num_slices` check
    cpu_scan.py           the fused C++ scan and causal conv for CPU tensors, compiled at first use
    dispatch.py           choose an implementation for a device, run it, fall back on failure
    ops.py                the scan and conv as custom ops (nnunet_segmamba::*), which torch.compile traces as one node
    api.py                `selective_scan` (and `selective_scan_packed`) and `causal_conv1d`, what networks call:
                          dispatch.py eagerly, ops.py under torch.compile
"""
from .api import causal_conv1d, selective_scan
from .dispatch import BACKENDS
from .orders import visit
from .torch_scan import selective_scan_ref, selective_scan_torch

__all__ = ["BACKENDS", "causal_conv1d", "selective_scan", "selective_scan_ref", "selective_scan_torch", "visit"]
