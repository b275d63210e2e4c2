"""VMamba's 2D selective scan (SS2D) and its four scan orders, the mixer of MedMamba's SS-Conv-SSM block.

Parameter names follow the authors' code (`x_proj_weight`, `dt_projs_weight`, `A_logs`, `Ds`, `out_norm`, ...),
so MedMamba checkpoints load with strict=True.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ssm.api import selective_scan
from ..ssm.dispatch import BACKENDS
from .mamba import dt_projection_init

__all__ = ["SS2D", "merge_scan_orders", "scan_orders"]


def scan_orders(x: torch.Tensor) -> torch.Tensor:
    """The four scan orders of VMamba's cross-scan.

    Args:
        x: (B, d, H, W).
    Returns:
        (B, 4, d, L), L = H W: s0 row-major (position h W + w), s1 column-major (position w H + h),
        s2 = s0 reversed, s3 = s1 reversed.
    """
    b, d, h, w = x.shape
    rows = x.reshape(b, d, h * w)
    cols = x.transpose(2, 3).reshape(b, d, h * w)
    s01 = torch.stack([rows, cols], dim=1)  # (B, 2, d, L)
    return torch.cat([s01, s01.flip(-1)], dim=1)


def merge_scan_orders(ys: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `scan_orders` on each order, summed (VMamba's cross-merge).

    Args:
        ys: (B, 4, d, L) outputs in the four scan orders, L = height * width.
    Returns:
        (B, d, L) in row-major order: y0 + y1 + y2 + y3 with each y_k moved back to row-major positions.
    """
    b, k, d, length = ys.shape
    if k != 4 or length != height * width:
        raise ValueError(f"expected ys of shape (B, 4, d, {height} * {width}), got {tuple(ys.shape)}")
    ys = ys[:, :2] + ys[:, 2:].flip(-1)  # undo the reversals: (B, 2, d, L) row- and column-major
    cols = ys[:, 1].reshape(b, d, width, height).transpose(2, 3).reshape(b, d, length)
    return ys[:, 0] + cols


class SS2D(nn.Module):
    """VMamba's 2D selective scan (Liu et al., "VMamba: Visual State Space Model", NeurIPS 2024), as used by
    MedMamba's SS-Conv-SSM block.

    in_proj -> (x, z); x -> depthwise conv + SiLU -> four scan orders (`scan_orders`) -> one selective scan per
    order with its own x_proj, dt_proj, A and D -> `merge_scan_orders` (a plain sum) -> LayerNorm -> * silu(z)
    -> out_proj.

    The four directions run as ONE call of `nnunet_segmamba.ssm.selective_scan` with the directions stacked on
    the channel axis (4 d_inner channels; B and C as (B, 4, d_state, L) groups, group k serving the channels of
    direction k), as VMamba does: one CUDA kernel launch instead of four, and on the PyTorch backend a quarter
    of the Python steps of the chunked scan.

    Args:
        d_model: input and output channels.
        d_state: SSM state size (16).
        d_conv: kernel size of the depthwise 2D convolution (3).
        expand: d_inner = expand * d_model (2).
        dt_rank: rank of the delta projection; "auto" = ceil(d_model / 16).
        dt_min, dt_max, dt_init_floor, dt_scale: Mamba's dt initialisation.
        dropout: dropout after out_proj (0; MedMamba passes attn_drop_rate = 0).
        conv_bias: bias of the depthwise convolution (True).
        bias: bias of in_proj and out_proj (False).
        scan_backend: selective-scan implementation, see `nnunet_segmamba.ssm.dispatch`.

    Shapes:
        forward(x (B, H, W, d_model)) -> (B, H, W, d_model)
    """

    num_directions = 4

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 3, expand: int = 2,
                 dt_rank: int | str = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, dt_scale: float = 1.0, dropout: float = 0.0, conv_bias: bool = True,
                 bias: bool = False, scan_backend: str = "auto") -> None:
        super().__init__()
        if d_model < 1 or d_state < 1 or d_conv < 1 or expand < 1:
            raise ValueError(f"d_model, d_state, d_conv and expand must be positive, got "
                             f"{d_model}, {d_state}, {d_conv}, {expand}")
        if d_conv % 2 != 1:
            raise ValueError(f"d_conv must be odd so that the depthwise conv keeps the size, got {d_conv}")
        self.d_model, self.d_state, self.expand = d_model, d_state, expand
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        if scan_backend not in BACKENDS:
            raise ValueError(f"scan_backend must be one of {BACKENDS}, got {scan_backend!r}")
        self.scan_backend = scan_backend
        k, d_inner = self.num_directions, self.d_inner

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=conv_bias)
        self.act = nn.SiLU()
        # per direction, stacked: (K, dt_rank + 2 d_state, d_inner); nn.Linear's default init, as the reference
        # builds four nn.Linear and stacks their weights
        x_proj = torch.empty(k, self.dt_rank + 2 * d_state, d_inner)
        for w in x_proj:
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        self.x_proj_weight = nn.Parameter(x_proj)
        dt_weight, dt_bias = zip(*(dt_projection_init(self.dt_rank, d_inner, dt_min, dt_max, dt_init_floor, dt_scale)
                                   for _ in range(k)))
        self.dt_projs_weight = nn.Parameter(torch.stack(dt_weight))  # (K, d_inner, dt_rank)
        self.dt_projs_bias = nn.Parameter(torch.stack(dt_bias))  # (K, d_inner)
        self.dt_projs_bias._no_reinit = True
        # S4D-real: A = -(1, ..., d_state) for every channel of every direction; D = 1
        self.A_logs = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(k * d_inner, 1))
        self.A_logs._no_weight_decay = True
        self.Ds = nn.Parameter(torch.ones(k * d_inner))
        self.Ds._no_weight_decay = True
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward_core(self, x: torch.Tensor) -> torch.Tensor:
        """The four-direction selective scan.

        Args:
            x: (B, d_inner, H, W), after the depthwise conv and SiLU.
        Returns:
            (B, d_inner, L) float32 (float64 for float64 input), the four directions merged in row-major order.
        """
        b, d, h, w = x.shape
        length, k = h * w, self.num_directions
        xs = scan_orders(x)  # (B, K, d, L)
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)  # (B, K, dt_rank + 2 n, L)
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)  # (B, K, d, L)
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        ys = selective_scan(
            xs.reshape(b, k * d, length).to(dtype),
            dts.reshape(b, k * d, length).to(dtype),
            -torch.exp(self.A_logs.to(dtype)),  # (K d, n)
            Bs.to(dtype).contiguous(), Cs.to(dtype).contiguous(),  # (B, K, n, L): group k -> direction k
            self.Ds.to(dtype),
            delta_bias=self.dt_projs_bias.reshape(-1).to(dtype),
            delta_softplus=True,
            backend=self.scan_backend,
        )
        return merge_scan_orders(ys.reshape(b, k, d, length), h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        x, z = self.in_proj(x).chunk(2, dim=-1)  # (B, H, W, d_inner) each
        x = self.act(self.conv2d(x.permute(0, 3, 1, 2).contiguous()))  # (B, d_inner, H, W)
        y = self.forward_core(x).transpose(1, 2).reshape(b, h, w, self.d_inner)
        y = self.out_norm(y.to(z.dtype)) * F.silu(z)
        return self.dropout(self.out_proj(y))
