"""The selective scan in plain PyTorch: the readable definition and the chunked scan, plus the causal conv.

All backends compute, per batch b, channel d and state n (Gu & Dao 2023, Algorithm 2):

    delta = softplus(delta + delta_bias)                 (each step optional)
    h[t]  = exp(delta[t] * A) * h[t-1] + delta[t] * B[t] * u[t]
    y[t]  = sum_n C[t, n] * h[t, n] + D * u[t]
    out   = y * silu(z)                                  (if z is given)

with the shapes of mamba-ssm's `selective_scan_fn`:
    u, delta, z: (batch, d, L);  A: (d, n);  B, C: (batch, n, L) or (batch, groups, n, L);  D, delta_bias: (d,)

`selective_scan_ref` is the definition, one step at a time; `selective_scan_torch` is the same arithmetic cut
into chunks so that it runs in 2 sqrt(L) Python steps on any device (the fallback where no kernel runs).
`nnunet_segmamba.ssm.selective_scan` (`api.py`, through `dispatch.py`) picks among these and the kernels, and is
what networks call.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["check_scan_shapes", "causal_conv1d_torch", "selective_scan_ref", "selective_scan_torch"]


def check_scan_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, d, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must have the shape of u {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() not in (2, 3) or A.shape[-2] != dim or batch % (A.shape[0] if A.dim() == 3 else 1):
        raise ValueError(f"A must be (d={dim}, d_state), or parameter sets (sets, d, d_state) with sets dividing the "
                         f"batch ({batch}), got shape {tuple(A.shape)}")
    for name, t in (("B", B), ("C", C)):
        if t.dim() not in (3, 4) or t.shape[0] != batch or t.shape[-1] != length or t.shape[-2] != A.shape[-1]:
            raise ValueError(
                f"{name} must be (batch={batch}, d_state={A.shape[-1]}, L={length}) or "
                f"(batch, groups, d_state, L), got shape {tuple(t.shape)}"
            )
        if t.dim() == 4 and dim % t.shape[1] != 0:
            raise ValueError(f"{name} has {t.shape[1]} groups, which does not divide d={dim}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != A.shape[:-1]:
            raise ValueError(f"{name} must be {tuple(A.shape[:-1])} (A's sets and d), got shape {tuple(t.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have the shape of u {tuple(u.shape)}, got {tuple(z.shape)}")


def _per_channel(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(batch, n, L) or (batch, groups, n, L) -> (batch, d or 1, n, L): group g serves channels [g*d/G, (g+1)*d/G)."""
    if t.dim() == 3:
        return t.unsqueeze(1)
    return t.repeat_interleave(dim // t.shape[1], dim=1)


def _prepare(u, delta, A, B, C, delta_bias, delta_softplus):
    """The step-independent part, in float32 (or float64 when given): discretised decay and input, as (b, d, L, n)."""
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta, A = u.to(dtype), delta.to(dtype), A.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    dim = u.shape[1]
    Bd = _per_channel(B.to(dtype), dim).transpose(-1, -2)  # (b, d|1, L, n)
    Cd = _per_channel(C.to(dtype), dim).transpose(-1, -2)  # (b, d|1, L, n)
    log_decay = delta.unsqueeze(-1) * A[:, None, :]  # (b, d, L, n), <= 0 for A < 0
    drive = (delta * u).unsqueeze(-1) * Bd  # (b, d, L, n)
    return u, log_decay, drive, Cd


def _finish(y, u, D, z, dtype_out):
    if D is not None:
        y = y + u * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(dtype_out)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """The definition: one step at a time (a Python loop over L). For tests and reading, not for training.

    Returns out (batch, d, L) in u's dtype, and with `return_last_state` also h[L-1] (batch, d, n).
    """
    check_scan_shapes(u, delta, A, B, C, D, z, delta_bias)
    dtype_out = u.dtype
    u, log_decay, drive, Cd = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        h = torch.exp(log_decay[:, :, t]) * h + drive[:, :, t]
        ys.append((h * Cd[:, :, t]).sum(-1))
    y = torch.stack(ys, dim=2)
    out = _finish(y, u, D, z, dtype_out)
    return (out, h) if return_last_state else out


def _chunk_length(length: int) -> int:
    # The scan below runs about 2 * chunk + L / chunk Python steps; ~sqrt(L) balances them.
    return int(min(max(2 ** round(math.log2(max(length, 1)) / 2), 8), 1024))


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False, chunk: int | None = None):
    """Chunked two-pass scan in pure PyTorch: differentiable by autograd, any device, memory linear in L.

    The sequence is cut into `num_chunks` chunks of T steps, and every step of the loops below advances all
    chunks at once:
      1. a T-step recurrence from a zero state gives each chunk's final state on its own;
      2. a num_chunks-step recurrence over those (decay over a whole chunk = exp(A * sum of its deltas)) gives
         the true state entering each chunk;
      3. the T-step recurrence again, now from the true entering states, gives every state and the output.
    That is 2 T + L / T Python steps instead of L. Each step's decay exp(delta A) and input delta B u are formed
    from per-step slices, so no (batch, d, L, d_state) tensor is built in a single pass over memory: on CPU
    that traffic, not arithmetic, is the cost. The arithmetic is that of the definition up to rounding.
    """
    check_scan_shapes(u, delta, A, B, C, D, z, delta_bias)
    dtype_out = u.dtype
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    batch, dim, length = u.shape
    n = A.shape[1]
    u, delta, A = u.to(dtype), delta.to(dtype), A.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)

    T = chunk or _chunk_length(length)
    num_chunks = -(-length // T)
    pad = num_chunks * T - length

    def steps(t):
        # (b, c, L) -> T tensors (b, c, chunks, 1); (b, g, n, L) -> T tensors (b, g, chunks, n). Padded steps
        # have delta = 0: they neither decay nor add input, so the final state is kept.
        t = F.pad(t, (0, pad))
        if t.dim() == 3:
            return t.reshape(batch, t.shape[1], num_chunks, T).permute(3, 0, 1, 2).unsqueeze(-1).contiguous().unbind(0)
        return t.reshape(batch, t.shape[1], n, num_chunks, T).permute(4, 0, 1, 3, 2).contiguous().unbind(0)

    delta_steps, du_steps = steps(delta), steps(delta * u)
    B_steps, C_steps = steps(_per_channel(B.to(dtype), dim)), steps(_per_channel(C.to(dtype), dim))
    A_ = A[:, None, :]  # (d, 1, n), broadcasts against (b, d, chunks, 1)

    # pass 1: each chunk from a zero state
    decays, inputs = [], []
    h = u.new_zeros(batch, dim, num_chunks, n)
    for t in range(T):
        decays.append(torch.exp(delta_steps[t] * A_))
        inputs.append(du_steps[t] * B_steps[t])
        h = decays[t] * h + inputs[t]
    # pass 2: the state entering each chunk
    chunk_decay = torch.exp(F.pad(delta, (0, pad)).reshape(batch, dim, num_chunks, T).sum(-1, keepdim=True) * A_)
    chunk_decay, chunk_end = chunk_decay.unbind(2), h.unbind(2)  # each (b, d, n)
    starts = [torch.zeros_like(chunk_end[0])]
    for c in range(num_chunks - 1):
        starts.append(chunk_decay[c] * starts[-1] + chunk_end[c])
    last_state = chunk_decay[-1] * starts[-1] + chunk_end[-1]
    # pass 3: every state from the true entering states, and the output
    h = torch.stack(starts, dim=2)  # (b, d, chunks, n)
    ys = []
    for t in range(T):
        h = decays[t] * h + inputs[t]
        ys.append((h * C_steps[t]).sum(-1))  # (b, d, chunks)
    y = torch.stack(ys, dim=-1).reshape(batch, dim, num_chunks * T)[:, :, :length]
    out = _finish(y, u, D, z, dtype_out)
    return (out, last_state) if return_last_state else out


def causal_conv1d_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        silu: bool = True) -> torch.Tensor:
    """Depthwise causal convolution along L: out[t] = sum_k weight[:, k] x[t - (K-1) + k] (zeros before the
    start), then SiLU. x: (batch, d, L); weight: (d, K); bias: (d,) or None. Returns x's shape and dtype."""
    length, width = x.shape[-1], weight.shape[-1]
    out = F.conv1d(x, weight.unsqueeze(1).to(x.dtype), bias.to(x.dtype) if bias is not None else None,
                   padding=width - 1, groups=x.shape[1])[..., :length]
    return F.silu(out) if silu else out
