"""The selective-scan core, one module per concern:

    torch_scan.py         the readable definition `selective_scan_ref`, the chunked PyTorch scan, the torch conv
    mamba_ssm_kernels.py  mamba-ssm's compiled scan and causal-conv1d's conv (optional GPU extra)
    triton_scan.py        our Triton scan; triton_conv.py our Triton causal conv; triton_common.py what they share
    orders.py             the forward / reverse / inter-slice visiting orders and the one `num_slices` check
    dispatch.py           `selective_scan` and `causal_conv1d`: choose an implementation, fall back on failure
    ops.py                the same two as custom ops (nnunet_segmamba::*), which torch.compile traces as one node
"""
from .dispatch import BACKENDS, causal_conv1d, selective_scan
from .orders import visit
from .torch_scan import selective_scan_ref, selective_scan_torch

__all__ = ["BACKENDS", "causal_conv1d", "selective_scan", "selective_scan_ref", "selective_scan_torch", "visit"]
