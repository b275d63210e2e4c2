"""The selective scan in Triton: mamba-ssm's semantics, forward and backward, with no CUDA extension to build.

Triton ships with PyTorch on Linux and compiles at run time, so this backend works on any CUDA GPU where torch
does, whatever mamba-ssm's wheels support. It computes what `selective_scan_ref` defines (float32 state and
arithmetic for fp16 / bf16 / fp32 inputs, D, z gating, delta_bias, softplus, grouped B/C).

How the work is cut. The sequence is split into chunks of `BLOCK_L` steps, and every (batch, group of channels
sharing B / C, chunk) gets its own program (or several, each with a slice of the channels, where there are too
few chunks to fill the GPU: `_d_split`), so even one long sequence fills the GPU. A program loads its chunk of B
and C once and walks its channels, loading each channel's inputs while it computes the one before:

  forward   1. per chunk, from a zero state: the chunk's end state S_c and its summed step sizes T_c. Both are
               closed forms (S_c = sum_t exp(A (T_c - cumsum(dt)_t)) dt_t B_t u_t), no scan needed;
            2. per (batch, channel), a scan over chunks: the state entering chunk c is
               h_c = exp(A T_{c-1}) h_{c-1} + S_{c-1} (stored: (batch, d, chunks + 1, n) floats, tiny);
            3. per chunk again, the in-chunk scan from its true entering state (tl.associative_scan), and y.
  backward  the same three steps for the adjoint, which runs the other way: dh_t = C_t dy_t + a_{t+1} dh_{t+1},
            then every gradient from the states recomputed in registers (step 3 once more). Only the chunk
            boundary states are kept between forward and backward, never the (batch, d, L, n) history. The
            in-chunk scans run in rows of 8 steps, a thread's own registers, with no flips (`_scan_rows`), where
            that was timed faster (16-bit inputs, the gate outside the scan: the trainers' compiled layers);
            elsewhere the adjoint is a forward scan over flipped operands (cheaper than a reverse scan in Triton).
            At 32^3 x 192 the backward's main kernel is now faster than mamba-ssm's whole backward kernel and a
            fwd+bwd takes within 1.1x of mamba-ssm's GPU time; a single call adds the host's time on top (Python
            and Triton's launcher: 2-3x mamba-ssm's per call; docs/performance.md).

Index maps. `mode` says in which order the scan visits the (raster-ordered) sequence in memory: "forward"
(p(t) = t), "reverse" (p(t) = L - 1 - t) or "slice" (p(t) = (t mod n) M + t div n for n = num_slices,
M = L / n: the transpose of the (n, M) view, SegMamba's inter-slice order). Inputs are read and outputs written
through p, so the tri-orientated layer needs no flipped or permuted copies of its activations.

Parameter sets. A, D and delta_bias may come as (sets, d, ...): each program reads its batch element's set (set i
serves the i-th block of batch / sets consecutive elements), so several scans with their own parameters, such as
the tri-orientated layer's three directions stacked on the batch, run as one launch of every kernel.

Gradients of B and C sum over the channels of a group. The backward's program for a chunk owns its block of
dB / dC for the channels it walks, so no atomics are needed and the result is deterministic.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from .orders import slice_geometry
from .triton_common import (MODES, TRITON_AVAILABLE, TRITON_IMPORT_ERROR, cdiv, columns, fast_divide, fast_log2, jit,
                            memory_position, next_power_of_2, rows, sum_parts, sum_parts_into_columns, tl)

__all__ = ["selective_scan_triton", "selective_scan_triton_fwd", "selective_scan_triton_bwd", "residual_shapes",
           "TUNING"]

# Launch settings: steps per chunk, warps per program of the forward kernels and of the backward's main kernel,
# and how many programs per multiprocessor `_d_split` aims for by splitting a group's channels, for the chunk
# kernels before the backward's main one and for that one; the carry kernel's states per program (a channel's
# states split over programs: with one program per channel the first stage at 128^3 had 192 programs for 132
# multiprocessors) and its warps; whether the backward's main kernel scans its chunks in rows of 8 steps
# (`_scan_rows`) rather than with tl.associative_scan and flips: True, False, or None for where the rows were timed
# faster (`_bwd_in_rows`); the backward's main kernel is not split where its unsplit grid already gives
# `bwd_unsplit_programs_per_sm` programs per multiprocessor, and where it is split a program walks at most
# `bwd_channels_per_program` channels (`_bwd_split`). benchmarks/bench_scan_gpu.py --tune sweeps them;
# docs/performance.md records the choice.
TUNING = {"block_l": 64, "warps_fwd": 1, "warps_bwd": 1, "fwd_programs_per_sm": 64, "bwd_programs_per_sm": 16,
          "bwd_unsplit_programs_per_sm": 8, "bwd_channels_per_program": 32, "carry_states": 8, "warps_carry": 2,
          "bwd_rows": None}

# The carry kernel scans a row's chunks in tiles of at most this many, each tile starting from the one before's edge
CARRY_TILE = 256


@jit
def _softplus(x):
    # torch's softplus (threshold 20) without log1p, which the interpreter lacks: exp(x) is exact enough below -15;
    # in base 2, as the hardware's special-function unit computes it (_base_2, fast_log2)
    e = tl.exp2(x * 1.4426950408889634)
    return tl.where(x > 20.0, x, tl.where(x < -15.0, e, fast_log2(1.0 + e) * 0.6931471805599453))


@jit
def _base_2(A):
    # tl.exp(x) compiles to a multiply by log2(e) and ex2.approx.f32, which ptxas wraps in a fix-up for denormal
    # results; tl.exp2 is ex2.approx.ftz.f32 alone. With A scaled once per channel every decay exp(A dt) is
    # exp2(A2 dt): one multiply and one special-function op per (state, step). A decay below 2^-126 becomes 0.
    return A.to(tl.float32) * 1.4426950408889634


@jit
def _linear_combine(a1, b1, a2, b2):
    # (a1, b1) then (a2, b2) for h -> a h + b
    return a1 * a2, b1 * a2 + b2


@jit
def _sigmoid_fast(x):
    # tl.sigmoid divides as IEEE does (a reciprocal, then range checks and a correction); the softplus's slope
    # needs no more than 2 ulp
    return fast_divide(1.0, 1.0 + tl.exp2(x * -1.4426950408889634))


@jit
def _groups_scan(alpha, beta, carry, REVERSE: tl.constexpr):
    """What enters each group of 8 steps, from the (NP, G) groups' maps e -> alpha e + beta taken in visiting order
    (the last group first for REVERSE) and `carry` (NP,) entering the first of them. The groups lie across lanes:
    each round combines a group's map with the one k groups before it (a gather, one shuffle a register), for
    k = 1, 2, 4, ...; the last round needs no alpha."""
    NP: tl.constexpr = alpha.shape[0]
    G: tl.constexpr = alpha.shape[1]
    g = tl.arange(0, G)[None, :]
    first = g == (G - 1 if REVERSE else 0)
    beta = tl.where(first, beta + alpha * carry[:, None], beta)
    for level in tl.static_range(16):  # rounds while 2^level < G: chunks up to 2^19 steps
        if (1 << level) < G:
            before = g + (1 << level) if REVERSE else g - (1 << level)  # the group k before, in visiting order
            has = (before < G) if REVERSE else (before >= 0)
            src = tl.broadcast_to(tl.where(has, before, g), (NP, G))
            beta = tl.where(has, beta + alpha * tl.gather(beta, src, 1), beta)
            if (2 << level) < G:
                alpha = tl.where(has, alpha * tl.gather(alpha, src, 1), alpha)
    # exclusive: a group gets what the group before it hands on
    before = g + 1 if REVERSE else g - 1
    src = tl.broadcast_to(tl.where(first, g, before), (NP, G))
    return tl.where(first, carry[:, None], tl.gather(beta, src, 1))


@jit
def _scan_rows(decay, x, carry, REVERSE: tl.constexpr):
    """The linear recurrence along the steps (axis 1) of (NP, BL) float32 tiles (a = decay):

        forward  h_t = a_t h_{t-1} + x_t,      h_{-1} = carry
        REVERSE  h_t = a_{t+1} h_{t+1} + x_t,  a_BL h_BL = carry

    in rows of 8 steps. A thread holds 8 consecutive steps of its states (the tiles' layout as B / C are loaded):
    it scans them in its registers (`columns`), the groups' maps are scanned across lanes (`_groups_scan`), and each
    step adds what entered its group times its decays since. tl.associative_scan works the same way forwards, but
    reverses by flipping its operands and results across lanes (three rounds of shuffles a register each), and
    folding the carry into its first step's input costs a select over the whole tile."""
    NP: tl.constexpr = decay.shape[0]
    BL: tl.constexpr = decay.shape[1]
    G: tl.constexpr = BL // 8
    a = columns(tl.reshape(decay, (NP * G, 8)))
    xs = columns(tl.reshape(x, (NP * G, 8)))
    if REVERSE:
        # ls: from a zero entry; qs[j] = a_{j+1} ... a_7, what the entering value is decayed by at step j
        ls = (xs[7],)
        qs = (tl.full(xs[7].shape, 1.0, tl.float32),)
        for k in tl.static_range(7):
            ls = (xs[6 - k] + a[7 - k] * ls[0],) + ls
            qs = (a[7 - k] * qs[0],) + qs
        alpha = a[0] * qs[0]  # the group hands on a_0 h_0
        beta = a[0] * ls[0]
    else:
        # qs[j] = a_0 ... a_j
        ls = (xs[0],)
        qs = (a[0],)
        for j in tl.static_range(1, 8):
            ls = ls + (a[j] * ls[j - 1] + xs[j],)
            qs = qs + (qs[j - 1] * a[j],)
        alpha = qs[7]  # the group hands on h_7
        beta = ls[7]
    e = tl.reshape(_groups_scan(tl.reshape(alpha, (NP, G)), tl.reshape(beta, (NP, G)), carry, REVERSE), (NP * G,))
    h = ()
    for j in tl.static_range(8):
        h = h + (ls[j] + qs[j] * e,)
    return tl.reshape(rows(h), (NP, BL))


@jit
def _step_sizes(delta, bias, mask, PADDED: tl.constexpr, SOFTPLUS: tl.constexpr):
    """dt = softplus(delta + bias) (or delta + bias), 0 past the sequence's end, and delta + bias.

    A padded step's dt must be 0: the forward's chunk summary adds it up, and in the backward its decay exp(A dt)
    multiplies the adjoint's zeros, which an overflowing decay (dt < 0 without the softplus) would turn into NaNs.
    The select is compiled in only where the sequence has such steps (`PADDED`: its length not a multiple of the
    chunk, never at SegMamba's stages)."""
    x = delta.to(tl.float32) + bias
    dt = x
    if SOFTPLUS:
        dt = _softplus(x)
    if PADDED:
        dt = tl.where(mask, dt, 0.0)
    return dt, x


@jit
def _group_chunk(D_, G_, N, L, M, NS, D_SPLIT, D_PER_PROGRAM, SET_BATCH,
                 NP: tl.constexpr, BL: tl.constexpr, MODE: tl.constexpr):
    """What every (batch, group, channel split; chunk) program of the chunk kernels starts with: its coordinates,
    the first of its channels, the positions p(t) of its steps and their masks, and the offsets of its group's rows
    of B / C (before the batch stride), which it loads once for all its channels (`_group_tile`); and the first row
    of its batch element's parameter set (A, D, delta_bias as (sets, D_, ...): each set serves SET_BATCH consecutive
    batch elements)."""
    pid = tl.program_id(0)
    c = tl.program_id(1)
    split = pid % D_SPLIT
    bg = pid // D_SPLIT
    g = bg % G_
    b = bg // G_
    s = tl.arange(0, BL)
    t = c * BL + s
    mask = t < L
    p = memory_position(t, L, NS, M, MODE)
    n = tl.arange(0, NP)
    nmask = n < N
    m2 = nmask[:, None] & mask[None, :]
    nl = g * N * L + n[:, None] * L + p[None, :]
    d0 = g * (D_ // G_) + split * D_PER_PROGRAM
    return b, b.to(tl.int64), g, split, c, d0, s, p, mask, n, nmask, m2, nl, (b // SET_BATCH) * D_


@jit
def _group_tile(ptr, b64, stride, nl, m2):
    """The program's (NP, BL) tile of B or C (its group's rows at its chunk's steps; `nl`, `m2` from `_group_chunk`)
    in float32: loaded once, before the channel loop, and read by every channel the program walks."""
    return tl.load(ptr + b64 * stride + nl, mask=m2, other=0.0).to(tl.float32)


@jit
def _channel_loads(delta_ptr, A_ptr, bias_ptr, row_ptr, z_ptr, b64, d, live, N, L, p, mask, n, nmask, sdelta, srow,
                   sz, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Channel d's inputs as stored: delta, its row of `row_ptr` (u, or dy), z, its A row and bias; nothing where
    `live` is False (past the program's last channel).

    The chunk kernels walk their channels loading each channel's inputs one iteration ahead: a warp waits for a
    load at the first instruction that uses it, not at the load, so the loads' latency overlaps the previous
    channel's arithmetic (the scan 17-21 % faster at SegMamba's first stage; docs/performance.md). Hence no
    arithmetic on them here."""
    chan = d.to(tl.int64) * L
    m = mask & live
    delta = tl.load(delta_ptr + b64 * sdelta + chan + p, mask=m, other=0.0)
    row = tl.load(row_ptr + b64 * srow + chan + p, mask=m, other=0.0)
    z = 0.0
    if HAS_Z:
        z = tl.load(z_ptr + b64 * sz + chan + p, mask=m, other=0.0)
    A = tl.load(A_ptr + d * N + n, mask=nmask & live, other=0.0)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=live, other=0.0)
    return delta, row, z, A, bias


@jit
def _fwd_chunk_summary(u_ptr, delta_ptr, A_ptr, B_ptr, bias_ptr, T_ptr, S_ptr,
                       D_, G_, N, L, M, NS, NCH, D_PER_PROGRAM, D_SPLIT, SET_BATCH, su, sdelta, sB,
                       NP: tl.constexpr, BL: tl.constexpr, MODE: tl.constexpr,
                       HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, PADDED: tl.constexpr):
    """Per channel: the chunk's end state from a zero start, S_c, and its summed step sizes, T_c."""
    b, b64, g, split, c, d0, s, p, mask, n, nmask, m2, nl, row0 = _group_chunk(
        D_, G_, N, L, M, NS, D_SPLIT, D_PER_PROGRAM, SET_BATCH, NP, BL, MODE)
    A_ptr += row0 * N
    bias_ptr += row0
    Bt = _group_tile(B_ptr, b64, sB, nl, m2)
    delta, u, no_z, A, bias = _channel_loads(delta_ptr, A_ptr, bias_ptr, u_ptr, u_ptr, b64, d0, True, N, L, p, mask,
                                          n, nmask, sdelta, su, 0, False, HAS_BIAS)
    for i in range(0, D_PER_PROGRAM):
        d = d0 + i
        bd = (b * D_ + d).to(tl.int64)
        delta_n, u_n, no_z, A_n, bias_n = _channel_loads(delta_ptr, A_ptr, bias_ptr, u_ptr, u_ptr, b64, d + 1,
                                                      i + 1 < D_PER_PROGRAM, N, L, p, mask, n, nmask, sdelta,
                                                      su, 0, False, HAS_BIAS)
        dt, _ = _step_sizes(delta, bias, mask, PADDED, SOFTPLUS)
        total = tl.sum(dt, 0)
        after = total - tl.cumsum(dt, 0)  # step sizes still to come in this chunk
        S = tl.sum(tl.exp2(_base_2(A)[:, None] * after[None, :]) * Bt * (dt * u.to(tl.float32))[None, :], 1)
        tl.store(S_ptr + (bd * NCH + c) * N + n, S, mask=nmask)
        tl.store(T_ptr + bd * NCH + c, total)
        delta, u, A, bias = delta_n, u_n, A_n, bias_n


@jit
def _chunk_carry(T_ptr, X_ptr, A_ptr, out_ptr, D_, N, NCH, SET_BATCH,
                 NP: tl.constexpr, CB: tl.constexpr, REVERSE: tl.constexpr):
    """Scan over chunks. Forward: out[c + 1] = exp(A T_c) out[c] + X_c, out[0] = 0 (states entering chunks).
    Reverse: out[c] = X_c + exp(A T_c) out[c + 1], out[NCH] = 0 (adjoint entering each chunk from its right)."""
    bd = tl.program_id(0)
    d = bd % D_ + (bd // D_ // SET_BATCH) * D_  # the channel's row of its batch element's parameter set
    n = tl.program_id(1) * NP + tl.arange(0, NP)  # this program's states
    nmask = n < N
    A2 = _base_2(tl.load(A_ptr + d * N + n, mask=nmask, other=0.0))
    base_in = bd.to(tl.int64) * NCH
    base_out = bd.to(tl.int64) * (NCH + 1)
    carry = tl.zeros([NP], dtype=tl.float32)
    edge = NCH if REVERSE else 0
    tl.store(out_ptr + (base_out + edge) * N + n, carry, mask=nmask)
    num_tiles = tl.cdiv(NCH, CB)
    col = tl.arange(0, CB)
    for i in range(0, num_tiles):
        # reverse: the tiles from the last, each loaded with its chunks in reverse order across the lanes, so that
        # one forward scan over the lanes serves both directions (tl.associative_scan(reverse=True) flips both
        # operands and both results across the lanes)
        if REVERSE:
            c = (num_tiles - 1 - i) * CB + (CB - 1 - col)
        else:
            c = i * CB + col
        cmask = c < NCH
        m2 = nmask[:, None] & cmask[None, :]
        # padding chunks are the identity (decay 1, input 0): they sit before the real ones in a reversed tile and
        # after them in a forward one, so in both the tile's last lane is the carry out
        T = tl.load(T_ptr + base_in + c, mask=cmask, other=0.0)
        X = tl.load(X_ptr + (base_in + c)[None, :] * N + n[:, None], mask=m2, other=0.0)
        P = tl.exp2(A2[:, None] * T[None, :])
        Pc, H = tl.associative_scan((P, X), axis=1, combine_fn=_linear_combine)
        H = H + Pc * carry[:, None]
        dest = c if REVERSE else c + 1
        tl.store(out_ptr + (base_out + dest)[None, :] * N + n[:, None], H, mask=m2)
        carry = tl.sum(tl.where((col == CB - 1)[None, :], H, 0.0), 1)


@jit
def _fwd_chunk_output(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, states_ptr, out_ptr,
                      D_, G_, N, L, M, NS, NCH, D_PER_PROGRAM, D_SPLIT, SET_BATCH, su, sdelta, sz, sB, sC,
                      NP: tl.constexpr, BL: tl.constexpr, MODE: tl.constexpr, HAS_D: tl.constexpr,
                      HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, PADDED: tl.constexpr):
    b, b64, g, split, c, d0, s, p, mask, n, nmask, m2, nl, row0 = _group_chunk(
        D_, G_, N, L, M, NS, D_SPLIT, D_PER_PROGRAM, SET_BATCH, NP, BL, MODE)
    A_ptr += row0 * N
    bias_ptr += row0
    D_ptr += row0
    Bt = _group_tile(B_ptr, b64, sB, nl, m2)
    Ct = _group_tile(C_ptr, b64, sC, nl, m2)
    first = (s == 0)[None, :]  # the entering state, folded into the first step's input
    # each iteration loads the next channel's inputs before its own arithmetic, so that their latency overlaps it
    delta, u, z, A, bias = _channel_loads(delta_ptr, A_ptr, bias_ptr, u_ptr, z_ptr, b64, d0, True, N, L, p, mask,
                                          n, nmask, sdelta, su, sz, HAS_Z, HAS_BIAS)
    for i in range(0, D_PER_PROGRAM):
        d = d0 + i
        bd = (b * D_ + d).to(tl.int64)
        h0 = tl.load(states_ptr + (bd * (NCH + 1) + c) * N + n, mask=nmask, other=0.0)
        Dd = 0.0
        if HAS_D:
            Dd = tl.load(D_ptr + d).to(tl.float32)
        delta_n, u_n, z_n, A_n, bias_n = _channel_loads(delta_ptr, A_ptr, bias_ptr, u_ptr, z_ptr, b64, d + 1,
                                                        i + 1 < D_PER_PROGRAM, N, L, p, mask, n, nmask, sdelta,
                                                        su, sz, HAS_Z, HAS_BIAS)
        dt, _ = _step_sizes(delta, bias, mask, PADDED, SOFTPLUS)
        A2 = _base_2(A)
        u = u.to(tl.float32)
        decay = tl.exp2(A2[:, None] * dt[None, :])
        _, h = tl.associative_scan((decay, Bt * (dt * u)[None, :] + tl.where(first, decay * h0[:, None], 0.0)),
                                   axis=1, combine_fn=_linear_combine)
        y = tl.sum(h * Ct, 0) + Dd * u
        if HAS_Z:
            z = z.to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(out_ptr + bd * L + p, y.to(out_ptr.dtype.element_ty), mask=mask)
        delta, u, z, A, bias = delta_n, u_n, z_n, A_n, bias_n


@jit
def _bwd_chunk_summary(delta_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, dout_ptr, R_ptr,
                       D_, G_, N, L, M, NS, NCH, D_PER_PROGRAM, D_SPLIT, SET_BATCH, sdelta, sz, sC,
                       NP: tl.constexpr, BL: tl.constexpr, MODE: tl.constexpr, HAS_Z: tl.constexpr,
                       HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, PADDED: tl.constexpr):
    """Per channel: R_c = sum_t exp(A cumsum(dt)_t) C_t dy_t, the adjoint a chunk hands to its left neighbour from
    a zero start."""
    b, b64, g, split, c, d0, s, p, mask, n, nmask, m2, nl, row0 = _group_chunk(
        D_, G_, N, L, M, NS, D_SPLIT, D_PER_PROGRAM, SET_BATCH, NP, BL, MODE)
    A_ptr += row0 * N
    bias_ptr += row0
    Ct = _group_tile(C_ptr, b64, sC, nl, m2)
    # dy is contiguous: its batch stride is D * L
    delta, dy, z, A, bias = _channel_loads(delta_ptr, A_ptr, bias_ptr, dout_ptr, z_ptr, b64, d0, True, N, L, p,
                                           mask, n, nmask, sdelta, D_ * L, sz, HAS_Z, HAS_BIAS)
    for i in range(0, D_PER_PROGRAM):
        d = d0 + i
        bd = (b * D_ + d).to(tl.int64)
        delta_n, dy_n, z_n, A_n, bias_n = _channel_loads(delta_ptr, A_ptr, bias_ptr, dout_ptr, z_ptr, b64, d + 1,
                                                         i + 1 < D_PER_PROGRAM, N, L, p, mask, n, nmask, sdelta,
                                                         D_ * L, sz, HAS_Z, HAS_BIAS)
        dt, _ = _step_sizes(delta, bias, mask, PADDED, SOFTPLUS)
        dy = dy.to(tl.float32)
        if HAS_Z:
            z = z.to(tl.float32)
            dy = dy * z * tl.sigmoid(z)
        R = tl.sum(tl.exp2(_base_2(A)[:, None] * tl.cumsum(dt, 0)[None, :]) * Ct * dy[None, :], 1)
        tl.store(R_ptr + (bd * NCH + c) * N + n, R, mask=nmask)
        delta, dy, z, A, bias = delta_n, dy_n, z_n, A_n, bias_n


@jit
def _bwd_chunk(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, states_ptr, adj_ptr,
               du_ptr, ddelta_ptr, dz_ptr, dBC_ptr, dparam_ptr,
               BATCH, D_, G_, N, W, L, M, NS, NCH, D_PER_PROGRAM, D_SPLIT, SET_BATCH, su, sdelta, sz, sB, sC,
               s_ddelta, s_dBC_split, s_dBC_batch, s_dBC_C, NP: tl.constexpr, BL: tl.constexpr,
               MODE: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
               SOFTPLUS: tl.constexpr, ROWS: tl.constexpr, PADDED: tl.constexpr):
    b, b64, g, split, c, d0, s, p, mask, n, nmask, m2, nl, row0 = _group_chunk(
        D_, G_, N, L, M, NS, D_SPLIT, D_PER_PROGRAM, SET_BATCH, NP, BL, MODE)
    A_ptr += row0 * N
    bias_ptr += row0
    D_ptr += row0
    Bt = _group_tile(B_ptr, b64, sB, nl, m2)
    Ct = _group_tile(C_ptr, b64, sC, nl, m2)
    dB_acc = tl.zeros([NP, BL], dtype=tl.float32)
    dC_acc = tl.zeros([NP, BL], dtype=tl.float32)
    # each iteration loads the next channel's inputs before its own arithmetic, so that their latency overlaps it
    delta, u, z, A, bias = _channel_loads(delta_ptr, A_ptr, bias_ptr, u_ptr, z_ptr, b64, d0, True, N, L, p, mask,
                                          n, nmask, sdelta, su, sz, HAS_Z, HAS_BIAS)
    dy = tl.load(dout_ptr + (b * D_ + d0).to(tl.int64) * L + p, mask=mask, other=0.0)
    # ddelta at its own batch stride: a (batch, d, L) tensor, or the first rows of delta | B | C's gradient; shifted
    # here so that the loop addresses it by the row of the contiguous gradients (fewer instructions in the loop)
    ddelta_ptr += b64 * s_ddelta - b64 * D_ * L
    for i in range(0, D_PER_PROGRAM):
        d = d0 + i
        bd = b * D_ + d
        row = bd.to(tl.int64) * L  # the gradients, allocated contiguous
        h0 = tl.load(states_ptr + (bd.to(tl.int64) * (NCH + 1) + c) * N + n, mask=nmask, other=0.0)
        adj = tl.load(adj_ptr + (bd.to(tl.int64) * (NCH + 1) + c + 1) * N + n, mask=nmask, other=0.0)
        Dd = 0.0
        if HAS_D:
            Dd = tl.load(D_ptr + d).to(tl.float32)
        live = i + 1 < D_PER_PROGRAM
        delta_n, u_n, z_n, A_n, bias_n = _channel_loads(delta_ptr, A_ptr, bias_ptr, u_ptr, z_ptr, b64, d + 1, live,
                                                        N, L, p, mask, n, nmask, sdelta, su, sz, HAS_Z, HAS_BIAS)
        dy_n = tl.load(dout_ptr + row + L + p, mask=mask & live, other=0.0)
        dt, x = _step_sizes(delta, bias, mask, PADDED, SOFTPLUS)
        u = u.to(tl.float32)
        A2 = _base_2(A)
        dy = dy.to(tl.float32)
        # the forward states of this chunk, recomputed from the stored entering state (folded into the first
        # step's input, or into the groups' scan in rows); what the backward needs of them is taken at once, so that
        # neither the states nor the scan's input stay live through the adjoint's scan (fewer registers spilled)
        dtu = dt * u
        drive = Bt * dtu[None, :]
        decay = tl.exp2(A2[:, None] * dt[None, :])
        if ROWS:
            h = _scan_rows(decay, drive, h0, False)
        else:
            _, h = tl.associative_scan((decay, drive + tl.where((s == 0)[None, :], decay * h0[:, None], 0.0)),
                                       axis=1, combine_fn=_linear_combine)
        decayed_prev = h - drive  # a_t h_{t-1}, without dividing by a_t (which underflows)
        if HAS_Z:
            y = tl.sum(h * Ct, 0) + Dd * u
            z = z.to(tl.float32)
            gate = tl.sigmoid(z)
            tl.store(dz_ptr + row + p, (dy * y * gate * (1.0 + z * (1.0 - gate))).to(dz_ptr.dtype.element_ty),
                     mask=mask)
            dy = dy * z * gate
        dC_acc += h * dy[None, :]
        if ROWS:
            # the adjoint dh_t = C_t dy_t + a_{t+1} dh_{t+1}, what enters from the chunks to the right (adj) at the
            # last step, with the forward's decays
            dh = _scan_rows(decay, Ct * dy[None, :], adj, True)
        else:
            # a_{t+1} carries the adjoint from step t+1 back to t (0 past the end); the chunk's last step gets it from
            # the carry instead. Flipped: dt_{t+1} at j = BL - 1 - t is dt[BL - j], gathered from the step sizes
            # already loaded (a second load and softplus of the shifted positions took 73 more loop instructions)
            dt_next_flipped = tl.where(s == 0, 0.0, tl.gather(dt, tl.where(s == 0, 0, BL - s), 0))
            # the adjoint dh_t = C_t dy_t + a_{t+1} dh_{t+1}, with what enters from the chunks to the right folded into
            # the chunk's last step. tl.associative_scan(reverse=True) flips both operands and both results across the
            # lanes (more shuffles than the scan itself); flipping the 1-D operands, C (the same for every channel)
            # and the result alone took the loop from 3057 to 2040 instructions (bf16, Triton 3.6; docs/performance.md)
            _, dh = tl.associative_scan(
                (tl.exp2(A2[:, None] * dt_next_flipped[None, :]),
                 tl.flip(Ct, 1) * tl.flip(dy, 0)[None, :] + tl.where((s == 0)[None, :], adj[:, None], 0.0)),
                axis=1, combine_fn=_linear_combine)
            dh = tl.flip(dh, 1)
        dh_B = tl.sum(dh * Bt, 0)
        dh_prev = dh * decayed_prev
        du = dh_B * dt + Dd * dy
        ddt = tl.sum(dh_prev * A2[:, None], 0) * 0.6931471805599453 + dh_B * u  # ln(2): A2 back to A
        if SOFTPLUS:
            ddt = ddt * (_sigmoid_fast(x) if ROWS else tl.sigmoid(x))
        if PADDED:
            ddt = tl.where(mask, ddt, 0.0)
        tl.store(du_ptr + row + p, du.to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(ddelta_ptr + row + p, ddt.to(ddelta_ptr.dtype.element_ty), mask=mask)
        # per-(batch, chunk) partial sums of dA | dD | dbias, side by side in rows of W, added up into the three
        # gradients by one launch (`sum_parts_into_columns`)
        part = ((b * NCH + c).to(tl.int64) * D_ + d) * W
        tl.store(dparam_ptr + part + n, tl.sum(dh_prev * dt[None, :], 1), mask=nmask)
        if HAS_D:
            tl.store(dparam_ptr + part + N, tl.sum(dy * u, 0))
        if HAS_BIAS:
            tl.store(dparam_ptr + part + W - 1, tl.sum(ddt, 0))
        dB_acc += dh * dtu[None, :]
        delta, u, z, A, bias, dy = delta_n, u_n, z_n, A_n, bias_n, dy_n
    # dB and dC of each channel split: one buffer (split, 2, batch, group, n, L), in the inputs' dtype when there
    # is one split, else float32 partial sums to add up (`sum_parts`); with packed gradients, the last rows of
    # delta | B | C's gradient (one split and group) or partial sums in their order, (split, batch, 2 n, L)
    # (strides in elements: between splits, batch elements, and from dB to dC)
    dB_row = split.to(tl.int64) * s_dBC_split + b64 * s_dBC_batch + (g * N).to(tl.int64) * L
    dC_row = dB_row + s_dBC_C
    tl.store(dBC_ptr + dB_row + n[:, None] * L + p[None, :], dB_acc.to(dBC_ptr.dtype.element_ty), mask=m2)
    tl.store(dBC_ptr + dC_row + n[:, None] * L + p[None, :], dC_acc.to(dBC_ptr.dtype.element_ty), mask=m2)


# ---- host side ---------------------------------------------------------------------------------------------------
def _block_length(length: int, block_l: int | None) -> int:
    if block_l is not None:
        if block_l < 16 or block_l & (block_l - 1):
            raise ValueError(f"block_l must be a power of two >= 16, got {block_l}")
        return block_l
    return min(TUNING["block_l"], max(16, next_power_of_2(length)))


def _carry_tile(chunks: int) -> int:
    return min(CARRY_TILE, max(16, next_power_of_2(chunks)))


def _carry(chunk_sum, X, A32, out, batch: int, dim: int, n: int, NP: int, chunks: int, set_batch: int,
           reverse: bool) -> None:
    """The scan over chunks (`_chunk_carry`) of every (batch, channel) row, its n states (NP padded) split over
    programs."""
    states = min(TUNING["carry_states"], NP)
    _chunk_carry[(batch * dim, cdiv(n, states))](chunk_sum, X, A32, out, dim, n, chunks, set_batch, NP=states,
                                                 CB=_carry_tile(chunks), REVERSE=reverse,
                                                 num_warps=TUNING["warps_carry"])


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _d_split(batch: int, groups: int, chunks: int, d_per_group: int, device: torch.device,
             programs_per_sm: int, max_channels: int | None = None) -> int:
    """Each (batch, group, chunk) program of a chunk kernel walks the group's channels; they are split over this
    many programs (the fewest that give `programs_per_sm` programs per multiprocessor, and leave each program at
    most `max_channels` channels where given) when there are too few (batch, chunk) pairs to fill the GPU. Cached: a
    scan's forward and backward ask for the same splits, and the search is a Python loop over up to d_per_group
    divisors, on the host's path of every eager call."""
    target = programs_per_sm * (_sm_count(device.index or 0) if device.type == "cuda" else 1)
    split = 1
    for s in range(1, d_per_group + 1):
        if d_per_group % s == 0:
            split = s
            if batch * groups * chunks * s >= target and (max_channels is None or d_per_group // s <= max_channels):
                break
    return split


def _bwd_split(batch: int, groups: int, chunks: int, d_per_group: int, device: torch.device) -> int:
    """The channel split of the backward's main kernel: `_d_split` at TUNING["bwd_programs_per_sm"], except none where
    the unsplit grid already gives TUNING["bwd_unsplit_programs_per_sm"] programs per multiprocessor. Beyond one split
    the kernel writes float32 partial sums of dB and dC, which one more kernel adds up; where the unsplit grid nearly
    fills the GPU (the hippocampus patch's first stage: 2016 programs, split in two for 16 per multiprocessor) they
    cost more than the extra programs gain (docs/performance.md). Where it is split, a program walks at most
    TUNING["bwd_channels_per_program"] channels: the directions stacked on the batch reach the programs per
    multiprocessor with fewer, longer programs (the hippocampus patch's second stage: 756 programs, split in three for
    64 channels each), which the finer split of the directions one by one ran faster (docs/performance.md)."""
    target = TUNING["bwd_unsplit_programs_per_sm"] * (_sm_count(device.index or 0) if device.type == "cuda" else 1)
    if batch * groups * chunks >= target:
        return 1
    return _d_split(batch, groups, chunks, d_per_group, device, TUNING["bwd_programs_per_sm"],
                    TUNING["bwd_channels_per_program"])


def _bwd_in_rows(u: torch.Tensor, z: torch.Tensor | None) -> bool:
    """Whether the backward's main kernel scans its chunks in rows of 8 steps: TUNING["bwd_rows"], where None means
    where the rows were timed faster than the flips, 16-bit inputs with the gate outside the scan (the trainers'
    compiled layers); with the gate in the scan or in float32 the rows compile to more spilled registers, and the
    flips stay (docs/performance.md)."""
    setting = TUNING["bwd_rows"]
    if setting is None:
        return z is None and u.dtype in (torch.float16, torch.bfloat16)
    return bool(setting)


def _rows_along_L(t: torch.Tensor) -> torch.Tensor:
    """The kernels index (batch, rows, L) as batch * stride(0) + row * L + t: any batch stride (e.g. x and z as
    halves of one in_proj output, B and C as slices of one x_proj output) is read in place."""
    if t.stride(-1) == 1 and t.stride(-2) == t.shape[-1] and (t.dim() == 3 or t.stride(1) == t.shape[2] * t.shape[3]):
        return t
    return t.contiguous()


def _batch_strides(u, delta, z, B, C):
    return u.stride(0), delta.stride(0), (z if z is not None else u).stride(0), B.stride(0), C.stride(0)


def _geometry(length: int, mode: str, num_slices: int | None) -> tuple[int, int, int]:
    """(MODE, M, n) of the index map p(t)."""
    n, m = slice_geometry(mode, length, num_slices, "mode")
    # the other orders ignore n and M: fixed values avoid compiling a kernel variant per length
    return (MODES[mode], m, n) if mode == "slice" else (MODES[mode], 1, 1)


class _Prepared(NamedTuple):
    """The inputs as the kernels read them, and the launch geometry."""
    u: torch.Tensor
    delta: torch.Tensor
    A32: torch.Tensor
    B: torch.Tensor  # (batch, groups, n, L), rows along L, expanded to the common grouping of B and C
    C: torch.Tensor
    z: torch.Tensor | None
    groups_B: int  # the callers' group counts, to sum dB / dC back
    groups_C: int
    squeeze_B: bool  # B / C were given as (batch, n, L)
    squeeze_C: bool
    mode_id: int
    M: int
    NS: int
    BL: int
    chunks: int
    set_batch: int  # batch elements per parameter set (A of shape (sets, d, n)); the batch with one set

    @property
    def sets(self) -> int:
        return self.u.shape[0] // self.set_batch

    @property
    def padded(self) -> bool:
        """Whether the last chunk has steps past the sequence's end (the kernels' `PADDED`)."""
        return self.chunks * self.BL != self.u.shape[-1]


def _prepare(u, delta, A, B, C, z, mode: str, num_slices: int | None, block_l: int | None) -> _Prepared:
    batch, length = u.shape[0], u.shape[-1]
    sets = A.shape[0] if A.dim() == 3 else 1
    mode_id, M, NS = _geometry(length, mode, num_slices)
    squeeze_B, squeeze_C = B.dim() == 3, C.dim() == 3
    B = _rows_along_L(B.unsqueeze(1) if squeeze_B else B)
    C = _rows_along_L(C.unsqueeze(1) if squeeze_C else C)
    # the kernels take one group count for B and C: both are expanded to the finer common grouping (the lcm of
    # the two divides d); Mamba uses 1 for both, which costs nothing
    groups_B, groups_C = B.shape[1], C.shape[1]
    groups = math.lcm(groups_B, groups_C)
    B = B.repeat_interleave(groups // groups_B, dim=1) if groups_B != groups else B
    C = C.repeat_interleave(groups // groups_C, dim=1) if groups_C != groups else C
    BL = _block_length(length, block_l)
    return _Prepared(_rows_along_L(u), _rows_along_L(delta), _params_32(A), B, C,
                     _rows_along_L(z) if z is not None else None, groups_B, groups_C, squeeze_B, squeeze_C,
                     mode_id, M, NS, BL, cdiv(length, BL), batch // sets)


def _params_32(A: torch.Tensor) -> torch.Tensor:
    """A as the kernels read it: float32 rows (sets x d, n), each set's d rows after the one before's."""
    return A.float().reshape(-1, A.shape[-1]).contiguous()


def residual_shapes(u_shape, d_state: int, block_l: int | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of what the forward keeps for the backward: the chunk-entering states (batch, d, chunks + 1, n) and
    the chunks' summed step sizes (batch, d, chunks), both float32."""
    batch, dim, length = u_shape
    chunks = cdiv(length, _block_length(length, block_l))
    return (batch, dim, chunks + 1, d_state), (batch, dim, chunks)


def _step_size_flags(p: _Prepared, delta_bias, softplus: bool) -> dict:
    """The constexpr flags of how every chunk kernel turns delta into its step sizes (bias, softplus, padded tail)."""
    return dict(HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(softplus), PADDED=p.padded)


def _forward(p: _Prepared, D, delta_bias, softplus: bool):
    """-> out (u's dtype), states, chunk_sum (the residuals of `_backward`)."""
    u, delta, A32, B, C, z = p.u, p.delta, p.A32, p.B, p.C, p.z
    batch, dim, length = u.shape
    n, groups, chunks = A32.shape[1], B.shape[1], p.chunks
    NP = max(next_power_of_2(n), 2)
    f32 = dict(device=u.device, dtype=torch.float32)
    chunk_sum = torch.empty(batch, dim, chunks, **f32)
    chunk_end = torch.empty(batch, dim, chunks, n, **f32)
    states = torch.empty(batch, dim, chunks + 1, n, **f32)
    out = torch.empty(u.shape, device=u.device, dtype=u.dtype)
    dummy = A32
    flags = _step_size_flags(p, delta_bias, softplus)
    d_split = _d_split(batch, groups, chunks, dim // groups, u.device, TUNING["fwd_programs_per_sm"])
    grid = (batch * groups * d_split, chunks)
    per_program = dim // groups // d_split
    _fwd_chunk_summary[grid](u, delta, A32, B, delta_bias if delta_bias is not None else dummy, chunk_sum,
                             chunk_end, dim, groups, n, length, p.M, p.NS, chunks, per_program, d_split,
                             p.set_batch, u.stride(0), delta.stride(0), B.stride(0), NP=NP, BL=p.BL, MODE=p.mode_id,
                             num_warps=TUNING["warps_fwd"], **flags)
    _carry(chunk_sum, chunk_end, A32, states, batch, dim, n, NP, chunks, p.set_batch, reverse=False)
    _fwd_chunk_output[grid](u, delta, A32, B, C, D if D is not None else dummy, z if z is not None else u,
                            delta_bias if delta_bias is not None else dummy, states, out, dim, groups, n, length,
                            p.M, p.NS, chunks, per_program, d_split, p.set_batch, *_batch_strides(u, delta, z, B, C),
                            NP=NP, BL=p.BL, MODE=p.mode_id, num_warps=TUNING["warps_fwd"], HAS_D=D is not None,
                            HAS_Z=z is not None, **flags)
    return out, states, chunk_sum


def _backward(p: _Prepared, A, D, delta_bias, softplus: bool, dout, states, chunk_sum, packed: bool = False):
    """Gradients of (u, delta, A, B, C, D, z, delta_bias) in the callers' shapes and dtypes (None where absent).

    With `packed` (B and C of shape (batch, n, L)), the gradients of delta, B and C come as one (batch, d + 2 n, L)
    tensor, delta | B | C stacked on the rows, in delta's dtype, in place of the three: the gradient of the one
    projection that gives all three (`TriOrientedMamba.scan_inputs`), which the kernel writes in place where
    nothing is added up after it (one channel split, all three of one dtype).
    """
    if packed and not (p.squeeze_B and p.squeeze_C):
        raise ValueError(f"packed gradients need B and C of shape (batch, n, L), got B of {tuple(p.B.shape)} and C "
                         f"of {tuple(p.C.shape)} (as (batch, groups, n, L)): pass packed=False for grouped B / C")
    u, delta, A32, B, C, z = p.u, p.delta, p.A32, p.B, p.C, p.z
    batch, dim, length = u.shape
    n, groups, chunks = A32.shape[1], B.shape[1], p.chunks
    NP = max(next_power_of_2(n), 2)
    dout = dout.contiguous()
    f32 = dict(device=u.device, dtype=torch.float32)
    dummy = A32
    flags = _step_size_flags(p, delta_bias, softplus)
    z_arg = z if z is not None else u
    bias_arg = delta_bias if delta_bias is not None else dummy
    adjoint_in = torch.empty(batch, dim, chunks, n, **f32)
    summary_split = _d_split(batch, groups, chunks, dim // groups, u.device, TUNING["fwd_programs_per_sm"])
    _bwd_chunk_summary[(batch * groups * summary_split, chunks)](
        delta, A32, C, z_arg, bias_arg, dout, adjoint_in, dim, groups, n, length, p.M, p.NS, chunks,
        dim // groups // summary_split, summary_split, p.set_batch, delta.stride(0), z_arg.stride(0), C.stride(0),
        NP=NP, BL=p.BL, MODE=p.mode_id, num_warps=TUNING["warps_fwd"], HAS_Z=z is not None, **flags)
    adjoint = torch.empty(batch, dim, chunks + 1, n, **f32)
    _carry(chunk_sum, adjoint_in, A32, adjoint, batch, dim, n, NP, chunks, p.set_batch, reverse=True)
    d_split = _bwd_split(batch, groups, chunks, dim // groups, u.device)
    du = torch.empty(u.shape, device=u.device, dtype=u.dtype)
    dz = torch.empty(z.shape, device=u.device, dtype=z.dtype) if z is not None else None
    # dB and dC in one buffer; the kernel writes them in the inputs' dtype when nothing is added up after it (one
    # channel split, B and C of one dtype and grouping), else float32 partial sums, added up below
    same_kind = B.dtype == C.dtype and p.groups_B == p.groups_C == groups
    in_place = packed and d_split == 1 and B.dtype == C.dtype == delta.dtype
    if packed:
        d_delta_B_C = torch.empty(batch, dim + 2 * n, length, device=u.device, dtype=delta.dtype)
        ddelta = d_delta_B_C[:, :dim]
    else:
        ddelta = torch.empty(delta.shape, device=u.device, dtype=delta.dtype)
    if in_place:
        dBC = d_delta_B_C[:, dim:]
        dBC_strides = (0, dBC.stride(0), n * length)
    elif packed:  # float32 partial sums (split, batch, dB | dC rows, L): each split's in the packed gradient's order
        dBC = torch.empty(d_split, batch, 2 * n, length, **f32)
        dBC_strides = (dBC.stride(0), dBC.stride(1), n * length)
    else:
        dBC = torch.empty(d_split, 2, batch, groups, n, length, device=u.device,
                          dtype=B.dtype if d_split == 1 and same_kind else torch.float32)
        dBC_strides = (dBC.stride(0), dBC.stride(2), dBC.stride(1))
    width = n + (D is not None) + (delta_bias is not None)  # dA | dD | dbias
    dparams = torch.empty(batch, chunks, dim, width, **f32)
    _bwd_chunk[(batch * groups * d_split, chunks)](
        u, delta, A32, B, C, D if D is not None else dummy, z_arg, bias_arg, dout, states, adjoint,
        du, ddelta, dz if dz is not None else du, dBC, dparams,
        batch, dim, groups, n, width, length, p.M, p.NS, chunks, dim // groups // d_split, d_split, p.set_batch,
        *_batch_strides(u, delta, z, B, C), ddelta.stride(0), *dBC_strides,
        NP=NP, BL=p.BL, MODE=p.mode_id, HAS_D=D is not None, HAS_Z=z is not None, ROWS=_bwd_in_rows(u, z),
        num_warps=TUNING["warps_bwd"], **flags)
    # added up over (batch, chunk) straight into three tensors, each in its parameter's dtype
    dA = torch.empty(A.shape, device=u.device, dtype=A.dtype)
    dD = torch.empty(D.shape, device=u.device, dtype=D.dtype) if D is not None else None
    dbias = torch.empty(delta_bias.shape, device=u.device, dtype=delta_bias.dtype) if delta_bias is not None else None
    # each parameter set's (batch, chunk) rows follow the set before's
    sum_parts_into_columns(dparams.view(p.sets, p.set_batch * chunks, dim, width),
                           [g.view(p.sets, dim, -1) for g in (dA, dD, dbias) if g is not None])
    if in_place:
        return du, d_delta_B_C, dA, dD, dz, dbias
    if packed:  # the splits' summed into the rows after delta's, in their dtype
        sum_parts(dBC.flatten(2), d_delta_B_C[:, dim:].flatten(1))
        return du, d_delta_B_C, dA, dD, dz, dbias
    if d_split == 1:
        dBC = dBC[0]  # in B's dtype where same_kind
    else:  # one buffer for both, in B's dtype where same_kind
        summed = torch.empty(dBC.shape[1:], device=u.device, dtype=B.dtype if same_kind else torch.float32)
        sum_parts(dBC.view(d_split, 1, -1), summed.view(1, -1))
        dBC = summed
    dB, dC = dBC.unbind(0)
    if p.groups_B != groups:
        dB = dB.reshape(batch, p.groups_B, groups // p.groups_B, n, length).sum(2)
    if p.groups_C != groups:
        dC = dC.reshape(batch, p.groups_C, groups // p.groups_C, n, length).sum(2)
    dB, dC = dB.to(B.dtype), dC.to(C.dtype)  # no-ops where done above
    if p.squeeze_B:
        dB = dB.squeeze(1)
    if p.squeeze_C:
        dC = dC.squeeze(1)
    return du, ddelta, dA, dB, dC, dD, dz, dbias


class _TritonSelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, mode, num_slices,
                block_l):
        p = _prepare(u, delta, A, B, C, z, mode, num_slices, block_l)
        out, states, chunk_sum = _forward(p, D, delta_bias, delta_softplus)
        ctx.save_for_backward(p.u, p.delta, A, p.B, p.C, D, p.z, delta_bias, states, chunk_sum)
        ctx.prepared = p._replace(u=None, delta=None, A32=None, B=None, C=None, z=None)
        ctx.softplus = bool(delta_softplus)
        if return_last_state:
            last = states[:, :, -1]
            ctx.mark_non_differentiable(last)
            return out, last
        return out

    @staticmethod
    def backward(ctx, dout, *_):
        u, delta, A, B, C, D, z, delta_bias, states, chunk_sum = ctx.saved_tensors
        p = ctx.prepared._replace(u=u, delta=delta, A32=_params_32(A), B=B, C=C, z=z)
        grads = _backward(p, A, D, delta_bias, ctx.softplus, dout, states, chunk_sum)
        return (*grads, None, None, None, None, None)


def selective_scan_triton_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, mode: str = "forward",
                              num_slices: int | None = None):
    """The forward without autograd, for the custom op (`ops.py`): (out, last_state, states, chunk_sum), the last
    two being what `selective_scan_triton_bwd` needs (shapes: `residual_shapes`)."""
    out, states, chunk_sum = _forward(_prepare(u, delta, A, B, C, z, mode, num_slices, None), D, delta_bias,
                                      delta_softplus)
    return out, states[:, :, -1], states, chunk_sum


def selective_scan_triton_bwd(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, states, chunk_sum,
                              mode: str = "forward", num_slices: int | None = None, packed: bool = False):
    """Gradients of (u, delta, A, B, C, D, z, delta_bias) (None where absent) from the forward's residuals; with
    `packed`, of (u, delta | B | C as one tensor, A, D, z, delta_bias) (see `_backward`)."""
    return _backward(_prepare(u, delta, A, B, C, z, mode, num_slices, None), A, D, delta_bias, delta_softplus,
                     dout, states, chunk_sum, packed)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, mode: str = "forward", num_slices: int | None = None,
                          block_l: int | None = None):
    """The selective scan with Triton kernels; arguments as `selective_scan`, plus the visiting order.

    Args:
        mode: "forward", "reverse" or "slice": the scan visits the sequence (stored in raster order) in this
            order, and the output is written back in raster order (see the module docstring).
        num_slices: for mode="slice", the slice count n (a divisor of L).
        block_l: steps per chunk (power of two >= 16); None picks TUNING's (smaller for short sequences).

    Returns out (batch, d, L) in u's dtype, or (out, last_state (batch, d, n) float32) with `return_last_state`
    (the state after the last step in visiting order; no gradient flows through it).
    """
    if not TRITON_AVAILABLE:
        raise RuntimeError(f"the triton scan backend needs the triton package ({TRITON_IMPORT_ERROR}); it ships with "
                           f"PyTorch on Linux: pip install triton")
    return _TritonSelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                      mode, num_slices, block_l)
