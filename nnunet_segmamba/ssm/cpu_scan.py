"""Fused CPU kernels for the Mamba branch: the selective scan and the causal depthwise conv1d + SiLU, each a C++
forward and backward (one extension, compiled at first use), both reading the visiting order in place.

Per batch b, channel c (of d) and state k (of n), visiting the L axis in the order p(0), p(1), ...:

    dt[t] = softplus(delta[p] + delta_bias[c])           (bias and softplus optional)
    h[t]  = exp(dt[t] A[c]) * h[t-1] + dt[t] B[p] u[p]  (h[-1] = 0)
    y[p]  = sum_k C[p, k] h[t, k] + D[c] u[p]
    out[p] = y[p] * silu(z[p])                          (if z is given)

    shapes: u, delta, z, out: (batch, d, L);  A: (d, n);  B, C: (batch, n, L) or (batch, groups, n, L), group g
    serving channels [g d/G, (g+1) d/G);  D, delta_bias: (d,);  last state h[L-1]: (batch, d, n)

The visiting order p(t) is "forward" (p = t), "reverse" (p = L-1-t) or "slice" (p = (t mod S) M + t div S for
S = num_slices, M = L / S: the transpose of the (S, M) view, SegMamba's inter-slice order). The kernels read and
write through p, so the three directions of the tri-orientated mixer need no flipped or permuted copies.

Why a fused kernel: the chunked PyTorch scan (`selective_scan_torch`) materialises (batch, d, L, n) tensors for
the decays and inputs, so on CPU it is bound by memory traffic and by autograd's saved tensors. Here every
(batch, channel) row is one sequential loop with its n states in registers. The step-independent work is taken
out of that loop: softplus, D u and the gate run over whole rows in memory order, and the decays exp(dt A) of a
chunk of steps in one loop of their own, vectorised over the states (GCC turns `#pragma omp simd` over std::exp
into glibc's vector exp, libmvec, given -ffast-math); what is left per step are FMAs and one reduction over n.
Rows run in parallel through ATen's thread pool (OpenMP), so torch.set_num_threads governs them.

What the backward needs is recomputed, as mamba-ssm's GPU kernels do: the forward keeps the state at the start
of every chunk of `CHUNK` steps ((batch, d, L / CHUNK, n)), B and C transposed to (batch, groups, L, n) in
visiting order, and with z the output before the gate (batch, d, L), for z's gradient (mamba-ssm keeps it too).
The backward walks the chunks last to first; for each it recomputes the chunk's states and decays from its
checkpoint into a small buffer (L1-resident), then runs the adjoint backwards through them:

    g[t]  = dy[t] C[t] + exp(dt[t+1] A) g[t+1]                           (dL/dh[t])
    dA   += g[t] h[t-1] exp(dt[t] A) dt[t];   dB[t] += g[t] dt[t] u;   dC[t] += dy[t] h[t]
    ddt   = sum_k g[t] (h[t-1] exp(dt A) A + B[t] u);   du = dy D + dt sum_k g[t] B[t]

(going backwards by dividing by the decay would overflow for strong decay; recomputing from checkpoints does not).
dB and dC sum over the channels of a group: each work item owns a fixed slice of the group's channels and its
own dB / dC buffer, and the buffers are summed in a fixed order afterwards, so the gradients are bitwise the same
for any thread count. dA, dD and delta_bias's gradient are summed over the batch the same way.

The causal conv1d (+ SiLU) gathers each row into visiting order behind K - 1 zeros, convolves it with contiguous
vectorised loops and scatters the result back; its backward recomputes the pre-activation for SiLU's derivative.
Replacing F.conv1d and F.silu on flipped / permuted copies, it removes the mixer's last copies of activations.

The extension is compiled at first use (`cpu_scan_status`) into torch's extension cache, under a name that
hashes the source, the flags and the CPU's model and feature flags, so an edit rebuilds and a cache shared
between different machines is never reused on a CPU it was not built for (-march=native).
"""
from __future__ import annotations

import functools
import hashlib
import math
import platform
from pathlib import Path

import torch

from .orders import ORDER_IDS, slice_geometry
from .torch_scan import check_scan_shapes

__all__ = ["cpu_scan_status", "selective_scan_cpu", "causal_conv1d_cpu", "CHUNK"]

# Steps between the forward's saved states. The backward recomputes one chunk's decays and states into a
# 2 * CHUNK * n buffer (8 KiB for float32, n = 16: L1-resident); the saved states cost n / CHUNK of u's size.
CHUNK = 64
# The kernels keep the n states of a row in stack arrays of this size (`NMAX` in the C++ source).
MAX_STATE = 256

_CPP = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <bit>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// p(t): the memory position of visiting step t
std::vector<int64_t> positions(int64_t L, int64_t mode, int64_t slices) {
  std::vector<int64_t> pos(L);
  if (mode == 0) {
    for (int64_t t = 0; t < L; ++t) pos[t] = t;
  } else if (mode == 1) {
    for (int64_t t = 0; t < L; ++t) pos[t] = L - 1 - t;
  } else {
    const int64_t M = L / slices;
    for (int64_t t = 0; t < L; ++t) pos[t] = (t % slices) * M + t / slices;
  }
  return pos;
}

// torch's softplus (threshold 20) and its derivative, and the sigmoid, written without branches (so that the
// per-row loops over them vectorise) and with exp's argument clamped (-ffast-math assumes no inf)
template <typename T> inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(std::min(std::max(-x, T(-80)), T(80))));
}
template <typename T> inline T softplus(T x) { return x > T(20) ? x : std::log1p(std::exp(std::min(x, T(20)))); }
template <typename T> inline T softplus_grad(T x) { return x > T(20) ? T(1) : sigmoid(x); }

// exp for the decays. float: Cephes' expf (range reduction by ln 2 in two parts, a degree-6 polynomial, the
// exponent added as integer bits), inlined into the vectorised loop: a few ulp, and cheaper than a call into
// libmvec per vector. Arguments below -87 (decays under 1e-38, i.e. none left) give ~1e-38 instead of 0 or a
// denormal. double: std::exp (libmvec's vector exp).
inline float decay_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float fn = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - fn * 0.693359375f) + fn * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(fn) + 127) << 23;
  return p * std::bit_cast<float>(bits);
}
inline double decay_exp(double x) { return std::exp(x); }

// (batch, G, n, L) with any strides -> (batch, G, L, n) contiguous in visiting order
template <typename T>
torch::Tensor to_steps(const torch::Tensor& X, const std::vector<int64_t>& pos) {
  const int64_t batch = X.size(0), G = X.size(1), n = X.size(2), L = X.size(3);
  auto out = torch::empty({batch, G, L, n}, X.options().memory_format(at::MemoryFormat::Contiguous));
  const T* x = X.data_ptr<T>();
  T* o = out.data_ptr<T>();
  const int64_t s0 = X.stride(0), s1 = X.stride(1), s2 = X.stride(2), s3 = X.stride(3);
  at::parallel_for(0, batch * G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bg = begin; bg < end; ++bg) {
      const T* xb = x + (bg / G) * s0 + (bg % G) * s1;
      T* ob = o + bg * L * n;
      for (int64_t t = 0; t < L; ++t)
        for (int64_t k = 0; k < n; ++k) ob[t * n + k] = xb[k * s2 + pos[t] * s3];
    }
  });
  return out;
}

// Per row (batch b, channel c), in memory order so that these loops vectorise: dt = softplus(delta + bias) and
// dt u. The sequential loops then only gather them at p(t).
template <typename T>
inline void step_sizes(const T* dr, const T* ur, T bias, bool sp, int64_t L, T* dtb, T* dxb, T* dspb) {
  if (sp) {
#pragma omp simd
    for (int64_t p = 0; p < L; ++p) {
      const T raw = dr[p] + bias;
      dtb[p] = softplus(raw);
      dxb[p] = dtb[p] * ur[p];
      if (dspb) dspb[p] = softplus_grad(raw);
    }
  } else {
#pragma omp simd
    for (int64_t p = 0; p < L; ++p) {
      dtb[p] = dr[p] + bias;
      dxb[p] = dtb[p] * ur[p];
    }
  }
}

// the decays exp(dt A) of steps [t0, t0 + len) into a (len, n) buffer: one long vectorised loop, kept apart from
// the recurrence so that its FMA chain is not interrupted by calls into libmvec (which clobber every vector
// register)
template <typename T, int NC>
inline void decays(const T* dtb, const int64_t* P, const T* Ap, int64_t t0, int64_t len, int64_t n_rt, T* a) {
  const int64_t n = NC > 0 ? NC : n_rt;
  for (int64_t i = 0; i < len; ++i) {
    const T dt = dtb[P[t0 + i]];
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) a[i * n + k] = decay_exp(dt * Ap[k]);
  }
}

// The per-step loops over the n states. Separate functions with restrict-qualified pointers (GCC keeps that
// knowledge through inlining), and the states in local fixed-size arrays: otherwise every store to an output row
// may alias the states, which are then reloaded from memory inside the recurrence.
constexpr int64_t NMAX = 256;  // the largest d_state of the runtime-n instantiation (MAX_STATE in Python)

template <typename T, int NC>
inline T forward_step(int64_t n_rt, T* __restrict__ h, const T* __restrict__ a, const T* __restrict__ Bs,
                      const T* __restrict__ Cs, T dtx) {
  const int64_t n = NC > 0 ? NC : n_rt;
  T y = T(0);
#pragma omp simd reduction(+ : y)
  for (int64_t k = 0; k < n; ++k) {
    h[k] = a[k] * h[k] + dtx * Bs[k];
    y += Cs[k] * h[k];
  }
  return y;
}

template <typename T, int NC>
inline void recompute_step(int64_t n_rt, const T* __restrict__ hprev, T* __restrict__ hnext,
                           const T* __restrict__ a, const T* __restrict__ Bs, T dtx) {
  const int64_t n = NC > 0 ? NC : n_rt;
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) hnext[k] = a[k] * hprev[k] + dtx * Bs[k];
}

// the adjoint backwards through one chunk of one channel; carry and dA live in local arrays (registers for
// n = 16) for the whole chunk instead of going through memory every step
template <typename T, int NC, bool FIRST>
inline void adjoint_chunk(int64_t n_rt, int64_t t0, int64_t len, const int64_t* __restrict__ P,
                          const T* __restrict__ Bg, const T* __restrict__ Cg, const T* __restrict__ hb,
                          const T* __restrict__ ab, const T* __restrict__ Ap, T* __restrict__ carry_io,
                          T* __restrict__ dA_io, T* __restrict__ dBg, T* __restrict__ dCg, const T* __restrict__ ur,
                          const T* __restrict__ dt_row, const T* __restrict__ dx_row, const T* __restrict__ dy_row,
                          T* __restrict__ dur, T* __restrict__ ddr) {
  const int64_t n = NC > 0 ? NC : n_rt;
  T carry[NC > 0 ? NC : NMAX], dAc[NC > 0 ? NC : NMAX];
  for (int64_t k = 0; k < n; ++k) { carry[k] = carry_io[k]; dAc[k] = dA_io[k]; }
  for (int64_t i = len - 1; i >= 0; --i) {
    const int64_t t = t0 + i, p = P[t];
    const T x = ur[p], dt = dt_row[p], dy = dy_row[p], dtx = dx_row[p];
    const T *Bs = Bg + t * n, *Cs = Cg + t * n, *hprev = hb + i * n, *hnow = hb + (i + 1) * n, *a = ab + i * n;
    T *dBs = dBg + t * n, *dCs = dCg + t * n;
    T sB = T(0), sA = T(0);
#pragma omp simd reduction(+ : sB, sA)
    for (int64_t k = 0; k < n; ++k) {
      const T gk = dy * Cs[k] + carry[k];
      const T ga = gk * hprev[k] * a[k];
      dAc[k] += ga * dt;
      sA += ga * Ap[k];
      sB += gk * Bs[k];
      // the item's first channel writes its dB / dC buffers, the others add to them
      dBs[k] = (FIRST ? T(0) : dBs[k]) + gk * dtx;
      dCs[k] = (FIRST ? T(0) : dCs[k]) + dy * hnow[k];
      carry[k] = a[k] * gk;
    }
    dur[p] = dt * sB;
    ddr[p] = sA + x * sB;
  }
  for (int64_t k = 0; k < n; ++k) { carry_io[k] = carry[k]; dA_io[k] = dAc[k]; }
}

template <typename T, int NC>
void forward_rows(const torch::Tensor& u, const torch::Tensor& delta, const torch::Tensor& A, const torch::Tensor& Bt,
                  const torch::Tensor& Ct, const T* D, const torch::Tensor* z, const T* bias, bool sp,
                  const std::vector<int64_t>& pos, int64_t chunk, bool save, torch::Tensor& out, torch::Tensor& last,
                  torch::Tensor& ckpt, torch::Tensor& ysave) {
  const int64_t batch = u.size(0), d = u.size(1), L = u.size(2), n = NC > 0 ? NC : A.size(1);
  const int64_t GB = Bt.size(1), GC = Ct.size(1), nchunks = (L + chunk - 1) / chunk;
  const T *U = u.data_ptr<T>(), *DL = delta.data_ptr<T>(), *Z = z ? z->data_ptr<T>() : nullptr;
  const T *AP = A.data_ptr<T>(), *BP = Bt.data_ptr<T>(), *CP = Ct.data_ptr<T>();
  const int64_t usb = u.stride(0), usc = u.stride(1), dsb = delta.stride(0), dsc = delta.stride(1);
  const int64_t zsb = z ? z->stride(0) : 0, zsc = z ? z->stride(1) : 0;
  T *O = out.data_ptr<T>(), *H = last.data_ptr<T>(), *K = save ? ckpt.data_ptr<T>() : nullptr;
  T* Y = save && z ? ysave.data_ptr<T>() : nullptr;
  const int64_t* P = pos.data();
  at::parallel_for(0, batch * d, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> dtb(L), dxb(L), a_buf(chunk * n);
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / d, c = bc % d;
      const T *ur = U + b * usb + c * usc, *dr = DL + b * dsb + c * dsc, *zr = Z ? Z + b * zsb + c * zsc : nullptr;
      const T *Bg = BP + (b * GB + c / (d / GB)) * L * n, *Cg = CP + (b * GC + c / (d / GC)) * L * n;
      T* orow = O + bc * L;
      const T Dc = D ? D[c] : T(0);
      step_sizes<T>(dr, ur, bias ? bias[c] : T(0), sp, L, dtb.data(), dxb.data(), nullptr);
      T h[NC > 0 ? NC : NMAX], Ap[NC > 0 ? NC : NMAX];
      for (int64_t k = 0; k < n; ++k) { h[k] = T(0); Ap[k] = AP[c * n + k]; }
      for (int64_t ci = 0; ci < nchunks; ++ci) {
        if (save)
          for (int64_t k = 0; k < n; ++k) K[(bc * nchunks + ci) * n + k] = h[k];
        const int64_t t0 = ci * chunk, len = std::min(L, t0 + chunk) - t0;
        decays<T, NC>(dtb.data(), P, Ap, t0, len, n, a_buf.data());
        for (int64_t i = 0; i < len; ++i) {
          const int64_t t = t0 + i, p = P[t];
          orow[p] = forward_step<T, NC>(n, h, a_buf.data() + i * n, Bg + t * n, Cg + t * n, dxb[p]);
        }
      }
      for (int64_t k = 0; k < n; ++k) H[bc * n + k] = h[k];
      // D u and the gate, in memory order; the backward's gradient of z needs y before the gate
      if (zr) {
        T* yrow = Y ? Y + bc * L : nullptr;
#pragma omp simd
        for (int64_t p = 0; p < L; ++p) {
          const T y = orow[p] + Dc * ur[p];
          if (yrow) yrow[p] = y;
          orow[p] = y * zr[p] * sigmoid(zr[p]);
        }
      } else {
#pragma omp simd
        for (int64_t p = 0; p < L; ++p) orow[p] += Dc * ur[p];
      }
    }
  });
}

template <typename T, int NC>
void backward_items(const torch::Tensor& u, const torch::Tensor& delta, const torch::Tensor& A,
                    const torch::Tensor& Bt, const torch::Tensor& Ct, const T* D, const torch::Tensor* z,
                    const T* bias, bool sp, const std::vector<int64_t>& pos, int64_t chunk, const torch::Tensor& ckpt,
                    const torch::Tensor& ysave, const torch::Tensor& dout, int64_t base, int64_t sub,
                    torch::Tensor& du, torch::Tensor& ddelta, torch::Tensor* dz, torch::Tensor& dA_part,
                    torch::Tensor& dD_part, torch::Tensor& dbias_part, torch::Tensor& dB_part, torch::Tensor& dC_part) {
  const int64_t batch = u.size(0), d = u.size(1), L = u.size(2), n = NC > 0 ? NC : A.size(1);
  const int64_t GB = Bt.size(1), GC = Ct.size(1), S = d / base * sub, nchunks = (L + chunk - 1) / chunk;
  const T *U = u.data_ptr<T>(), *DL = delta.data_ptr<T>(), *Z = z ? z->data_ptr<T>() : nullptr;
  const T *AP = A.data_ptr<T>(), *BP = Bt.data_ptr<T>(), *CP = Ct.data_ptr<T>(), *KP = ckpt.data_ptr<T>();
  const T *GO = dout.data_ptr<T>(), *Y = z ? ysave.data_ptr<T>() : nullptr;
  const int64_t usb = u.stride(0), usc = u.stride(1), dsb = delta.stride(0), dsc = delta.stride(1);
  const int64_t zsb = z ? z->stride(0) : 0, zsc = z ? z->stride(1) : 0;
  const int64_t gsb = dout.stride(0), gsc = dout.stride(1);
  T *DU = du.data_ptr<T>(), *DDL = ddelta.data_ptr<T>(), *DZ = dz ? dz->data_ptr<T>() : nullptr;
  T *DA = dA_part.data_ptr<T>(), *DD = dD_part.data_ptr<T>(), *DBI = dbias_part.data_ptr<T>();
  T *DB = dB_part.data_ptr<T>(), *DC = dC_part.data_ptr<T>();
  const int64_t* P = pos.data();
  // one work item: (batch b, slice s) owns the channels [lo, hi) (part `s % sub` of the `base` channels from
  // (s / sub) base, which lie in one group of B and one of C) and the dB / dC buffers dB_part[b, s]
  at::parallel_for(0, batch * S, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> a_buf(chunk * n), h_buf((chunk + 1) * n), dtb(L), dxb(L), dspb(sp ? L : 0), dyb(L);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / S, s = item % S;
      const int64_t lo = (s / sub) * base + (s % sub) * base / sub, hi = (s / sub) * base + (s % sub + 1) * base / sub;
      const T *Bg = BP + (b * GB + lo / (d / GB)) * L * n, *Cg = CP + (b * GC + lo / (d / GC)) * L * n;
      T *dBg = DB + item * L * n, *dCg = DC + item * L * n;
      for (int64_t c = lo; c < hi; ++c) {
        const bool first = c == lo;
        const int64_t bc = b * d + c;
        const T *ur = U + b * usb + c * usc, *dr = DL + b * dsb + c * dsc, *zr = Z ? Z + b * zsb + c * zsc : nullptr;
        const T* gr = GO + b * gsb + c * gsc;
        T *dur = DU + bc * L, *ddr = DDL + bc * L, *dzr = DZ ? DZ + bc * L : nullptr;
        const T Dc = D ? D[c] : T(0);
        step_sizes<T>(dr, ur, bias ? bias[c] : T(0), sp, L, dtb.data(), dxb.data(), sp ? dspb.data() : nullptr);
        // dy = dout silu(z), and the gradient of z from the y the forward kept, in memory order
        if (zr) {
          const T* yrow = Y + bc * L;
#pragma omp simd
          for (int64_t p = 0; p < L; ++p) {
            const T zz = zr[p], sg = sigmoid(zz);
            dyb[p] = gr[p] * zz * sg;
            dzr[p] = gr[p] * yrow[p] * sg * (T(1) + zz * (T(1) - sg));
          }
        } else {
          for (int64_t p = 0; p < L; ++p) dyb[p] = gr[p];
        }
        T carry[NC > 0 ? NC : NMAX], dAc[NC > 0 ? NC : NMAX], Ap[NC > 0 ? NC : NMAX];
        for (int64_t k = 0; k < n; ++k) { carry[k] = T(0); dAc[k] = T(0); Ap[k] = AP[c * n + k]; }
        for (int64_t ci = nchunks - 1; ci >= 0; --ci) {
          const int64_t t0 = ci * chunk, len = std::min(L, t0 + chunk) - t0;
          T *ab = a_buf.data(), *hb = h_buf.data();
          for (int64_t k = 0; k < n; ++k) hb[k] = KP[(bc * nchunks + ci) * n + k];
          // recompute the chunk's decays and states
          decays<T, NC>(dtb.data(), P, Ap, t0, len, n, ab);
          for (int64_t i = 0; i < len; ++i) {
            const int64_t t = t0 + i;
            recompute_step<T, NC>(n, hb + i * n, hb + (i + 1) * n, ab + i * n, Bg + t * n, dxb[P[t]]);
          }
          // the adjoint, backwards through the chunk
          if (first)
            adjoint_chunk<T, NC, true>(n, t0, len, P, Bg, Cg, hb, ab, Ap, carry, dAc, dBg, dCg, ur, dtb.data(),
                                       dxb.data(), dyb.data(), dur, ddr);
          else
            adjoint_chunk<T, NC, false>(n, t0, len, P, Bg, Cg, hb, ab, Ap, carry, dAc, dBg, dCg, ur, dtb.data(),
                                        dxb.data(), dyb.data(), dur, ddr);
        }
        // D's and the softplus's terms, in memory order
        T dD_acc = T(0), dbias_acc = T(0);
#pragma omp simd reduction(+ : dD_acc, dbias_acc)
        for (int64_t p = 0; p < L; ++p) {
          dur[p] += dyb[p] * Dc;
          dD_acc += dyb[p] * ur[p];
          const T dd = sp ? ddr[p] * dspb[p] : ddr[p];
          ddr[p] = dd;
          dbias_acc += dd;
        }
        for (int64_t k = 0; k < n; ++k) DA[bc * n + k] = dAc[k];
        DD[bc] = dD_acc;
        DBI[bc] = dbias_acc;
      }
    }
  });
}

// dB / dC (batch, G, n, L) at the memory positions: the sum, in fixed order, of the slices' buffers
// (batch, S, L, n); group g's channels are those of slices [g S / G, (g + 1) S / G)
template <typename T>
torch::Tensor gather_slices(const torch::Tensor& part, int64_t G, const std::vector<int64_t>& pos) {
  const int64_t batch = part.size(0), S = part.size(1), L = part.size(2), n = part.size(3), per = S / G;
  auto out = torch::empty({batch, G, n, L}, part.options());
  const T* src = part.data_ptr<T>();
  T* o = out.data_ptr<T>();
  at::parallel_for(0, batch * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> acc(n);
    for (int64_t bg = begin; bg < end; ++bg) {
      const T* sb = src + bg * per * L * n;  // slices (b, g per) .. (b, (g + 1) per - 1) follow each other
      T* ob = o + bg * n * L;
      for (int64_t t = 0; t < L; ++t) {
        for (int64_t k = 0; k < n; ++k) acc[k] = sb[t * n + k];
        for (int64_t s = 1; s < per; ++s)
          for (int64_t k = 0; k < n; ++k) acc[k] += sb[(s * L + t) * n + k];
        for (int64_t k = 0; k < n; ++k) ob[k * L + pos[t]] = acc[k];
      }
    }
  });
  return out;
}

template <typename T> const T* ptr_or_null(const c10::optional<torch::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

}  // namespace

// returns out, last state, checkpoints (empty unless save), B and C in visiting order (batch, G, L, n), y before
// the gate (empty unless save and z)
std::vector<torch::Tensor> fwd(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor B,
                               torch::Tensor C, c10::optional<torch::Tensor> D, c10::optional<torch::Tensor> z,
                               c10::optional<torch::Tensor> bias, bool sp, int64_t mode, int64_t slices,
                               int64_t chunk, bool save) {
  const int64_t batch = u.size(0), d = u.size(1), L = u.size(2), n = A.size(1);
  const auto pos = positions(L, mode, slices);
  const int64_t nchunks = (L + chunk - 1) / chunk;
  auto out = torch::empty({batch, d, L}, u.options());
  auto last = torch::empty({batch, d, n}, u.options());
  auto ckpt = save ? torch::empty({batch, d, nchunks, n}, u.options()) : torch::empty({0}, u.options());
  // y before the gate, for the gradient of z
  auto ysave = save && z.has_value() ? torch::empty({batch, d, L}, u.options()) : torch::empty({0}, u.options());
  torch::Tensor Bt, Ct;
  const torch::Tensor* zp = z.has_value() ? &z.value() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "cpu_scan_fwd", [&] {
    Bt = to_steps<scalar_t>(B, pos);
    Ct = to_steps<scalar_t>(C, pos);
    const scalar_t *Dp = ptr_or_null<scalar_t>(D), *bp = ptr_or_null<scalar_t>(bias);
    if (n == 16)
      forward_rows<scalar_t, 16>(u, delta, A, Bt, Ct, Dp, zp, bp, sp, pos, chunk, save, out, last, ckpt, ysave);
    else
      forward_rows<scalar_t, 0>(u, delta, A, Bt, Ct, Dp, zp, bp, sp, pos, chunk, save, out, last, ckpt, ysave);
  });
  return {out, last, ckpt, Bt, Ct, ysave};
}

// returns du, ddelta, dz (empty without z), dA, dB, dC (batch, G, n, L), dD and ddelta_bias (per batch: (batch, d))
std::vector<torch::Tensor> bwd(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor Bt,
                               torch::Tensor Ct, c10::optional<torch::Tensor> D, c10::optional<torch::Tensor> z,
                               c10::optional<torch::Tensor> bias, bool sp, int64_t mode, int64_t slices,
                               int64_t chunk, torch::Tensor ckpt, torch::Tensor ysave, torch::Tensor dout, int64_t base,
                               int64_t sub) {
  const int64_t batch = u.size(0), d = u.size(1), L = u.size(2), n = A.size(1), S = d / base * sub;
  const auto pos = positions(L, mode, slices);
  auto du = torch::empty({batch, d, L}, u.options());
  auto ddelta = torch::empty({batch, d, L}, u.options());
  torch::Tensor dz = z.has_value() ? torch::empty({batch, d, L}, u.options()) : torch::empty({0}, u.options());
  auto dA_part = torch::empty({batch, d, n}, u.options());
  auto dD_part = torch::empty({batch, d}, u.options());
  auto dbias_part = torch::empty({batch, d}, u.options());
  auto dB_part = torch::empty({batch, S, L, n}, u.options());  // every element is written (see `first`)
  auto dC_part = torch::empty({batch, S, L, n}, u.options());
  const torch::Tensor* zp = z.has_value() ? &z.value() : nullptr;
  torch::Tensor* dzp = z.has_value() ? &dz : nullptr;
  torch::Tensor dB, dC;
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "cpu_scan_bwd", [&] {
    const scalar_t *Dp = ptr_or_null<scalar_t>(D), *bp = ptr_or_null<scalar_t>(bias);
    if (n == 16)
      backward_items<scalar_t, 16>(u, delta, A, Bt, Ct, Dp, zp, bp, sp, pos, chunk, ckpt, ysave, dout, base, sub,
                                   du, ddelta, dzp, dA_part, dD_part, dbias_part, dB_part, dC_part);
    else
      backward_items<scalar_t, 0>(u, delta, A, Bt, Ct, Dp, zp, bp, sp, pos, chunk, ckpt, ysave, dout, base, sub,
                                  du, ddelta, dzp, dA_part, dD_part, dbias_part, dB_part, dC_part);
    dB = gather_slices<scalar_t>(dB_part, Bt.size(1), pos);
    dC = gather_slices<scalar_t>(dC_part, Ct.size(1), pos);
  });
  return {du, ddelta, dz, dA_part.sum(0), dB, dC, dD_part.sum(0), dbias_part.sum(0)};
}

// ---- causal depthwise conv1d (+ SiLU) along the visiting order ----------------------------------------------
// Each row is gathered into visiting order behind K - 1 zeros (the causal padding), so that the convolution itself
// is a contiguous, vectorised loop; results are scattered back to the memory positions.
namespace {
template <typename T>
void conv_fwd_rows(const torch::Tensor& x, const T* W, const T* bias, int64_t K, bool silu,
                   const std::vector<int64_t>& pos, torch::Tensor& out) {
  const int64_t batch = x.size(0), d = x.size(1), L = x.size(2), xsb = x.stride(0), xsc = x.stride(1);
  const T* X = x.data_ptr<T>();
  T* O = out.data_ptr<T>();
  const int64_t* P = pos.data();
  at::parallel_for(0, batch * d, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> xv(L + K - 1, T(0)), acc(L);
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / d, c = bc % d;
      const T* xr = X + b * xsb + c * xsc;
      const T* w = W + c * K;
      for (int64_t t = 0; t < L; ++t) xv[K - 1 + t] = xr[P[t]];
      const T b0 = bias ? bias[c] : T(0);
#pragma omp simd
      for (int64_t t = 0; t < L; ++t) acc[t] = b0;
      for (int64_t k = 0; k < K; ++k) {
        const T wk = w[k];
        const T* src = xv.data() + k;
#pragma omp simd
        for (int64_t t = 0; t < L; ++t) acc[t] += wk * src[t];
      }
      if (silu) {
#pragma omp simd
        for (int64_t t = 0; t < L; ++t) acc[t] *= sigmoid(acc[t]);
      }
      T* orow = O + bc * L;
      for (int64_t t = 0; t < L; ++t) orow[P[t]] = acc[t];
    }
  });
}

template <typename T>
void conv_bwd_rows(const torch::Tensor& x, const T* W, const T* bias, int64_t K, bool silu,
                   const std::vector<int64_t>& pos, const torch::Tensor& dout, torch::Tensor& dx,
                   torch::Tensor& dW_part, torch::Tensor& dbias_part) {
  const int64_t batch = x.size(0), d = x.size(1), L = x.size(2), xsb = x.stride(0), xsc = x.stride(1);
  const int64_t gsb = dout.stride(0), gsc = dout.stride(1);
  const T *X = x.data_ptr<T>(), *GO = dout.data_ptr<T>();
  T *DX = dx.data_ptr<T>(), *DW = dW_part.data_ptr<T>(), *DBI = dbias_part.data_ptr<T>();
  const int64_t* P = pos.data();
  at::parallel_for(0, batch * d, 1, [&](int64_t begin, int64_t end) {
    // g: the gradient of the pre-activation, in visiting order, followed by K - 1 zeros (steps past the end)
    std::vector<T> xv(L + K - 1, T(0)), g(L + K - 1, T(0)), dxv(L);
    for (int64_t bc = begin; bc < end; ++bc) {
      const int64_t b = bc / d, c = bc % d;
      const T *xr = X + b * xsb + c * xsc, *gr = GO + b * gsb + c * gsc;
      const T* w = W + c * K;
      for (int64_t t = 0; t < L; ++t) { xv[K - 1 + t] = xr[P[t]]; g[t] = gr[P[t]]; }
      if (silu) {  // recompute the pre-activation for SiLU's derivative
        const T b0 = bias ? bias[c] : T(0);
        std::fill(dxv.begin(), dxv.end(), b0);
        for (int64_t k = 0; k < K; ++k) {
          const T wk = w[k];
          const T* src = xv.data() + k;
#pragma omp simd
          for (int64_t t = 0; t < L; ++t) dxv[t] += wk * src[t];
        }
#pragma omp simd
        for (int64_t t = 0; t < L; ++t) {
          const T a = dxv[t], sg = sigmoid(a);
          g[t] *= sg * (T(1) + a * (T(1) - sg));
        }
      }
      T gsum = T(0);
#pragma omp simd reduction(+ : gsum)
      for (int64_t t = 0; t < L; ++t) gsum += g[t];
      DBI[bc] = gsum;
      // out[t] = sum_k w[k] xv[t + k]  =>  dW[k] = sum_t g[t] xv[t + k];  dx[s] = sum_k w[k] g[s + K - 1 - k]
      for (int64_t k = 0; k < K; ++k) {
        const T* src = xv.data() + k;
        T acc = T(0);
#pragma omp simd reduction(+ : acc)
        for (int64_t t = 0; t < L; ++t) acc += g[t] * src[t];
        DW[bc * K + k] = acc;
      }
      std::fill(dxv.begin(), dxv.end(), T(0));
      for (int64_t k = 0; k < K; ++k) {
        const T wk = w[k];
        const T* src = g.data() + K - 1 - k;
#pragma omp simd
        for (int64_t s = 0; s < L; ++s) dxv[s] += wk * src[s];
      }
      T* dxr = DX + bc * L;
      for (int64_t s = 0; s < L; ++s) dxr[P[s]] = dxv[s];
    }
  });
}
}  // namespace

torch::Tensor conv_fwd(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias, bool silu,
                       int64_t mode, int64_t slices) {
  const auto pos = positions(x.size(2), mode, slices);
  auto out = torch::empty({x.size(0), x.size(1), x.size(2)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cpu_conv_fwd", [&] {
    conv_fwd_rows<scalar_t>(x, weight.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(bias), weight.size(1), silu,
                            pos, out);
  });
  return out;
}

// returns dx, dweight (d, K), dbias (d,)
std::vector<torch::Tensor> conv_bwd(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias,
                                    bool silu, int64_t mode, int64_t slices, torch::Tensor dout) {
  const int64_t batch = x.size(0), d = x.size(1), L = x.size(2), K = weight.size(1);
  const auto pos = positions(L, mode, slices);
  auto dx = torch::empty({batch, d, L}, x.options());
  auto dW_part = torch::empty({batch, d, K}, x.options());
  auto dbias_part = torch::empty({batch, d}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cpu_conv_bwd", [&] {
    conv_bwd_rows<scalar_t>(x, weight.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(bias), K, silu, pos, dout, dx,
                            dW_part, dbias_part);
  });
  return {dx, dW_part.sum(0), dbias_part.sum(0)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &fwd, "fused selective scan, forward (CPU)");
  m.def("bwd", &bwd, "fused selective scan, backward (CPU)");
  m.def("conv_fwd", &conv_fwd, "causal depthwise conv1d (+ SiLU) along a visiting order, forward (CPU)");
  m.def("conv_bwd", &conv_bwd, "causal depthwise conv1d (+ SiLU) along a visiting order, backward (CPU)");
}
"""

# -O3 and -march=native: the state loops are vectorised for the widest vectors of this CPU (the build is cached
# per machine, see the module docstring). -ffast-math is what makes glibc's <math.h> declare the vector variants of
# exp and log1p (libmvec), so `#pragma omp simd` loops over softplus, the sigmoid and float64's decays vectorise
# (float32's decays use the inlined expf, `decay_exp`), and lets the reductions over the states be reordered. It
# is passed to the compiler only, never to the linker, so loading the library does not switch the process to
# flush-to-zero (crtfastmath.o). It also lets the compiler assume no NaN or inf: the kernels clamp exp's arguments,
# but NaN inputs need not propagate as they do in torch. -fopenmp: ATen's parallel_for is OpenMP-based and is
# inlined into this module.
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]
LDFLAGS = ["-fopenmp"]


def _cpu_fingerprint() -> str:
    """The CPU's model and feature flags: part of the build's name, as -march=native ties it to them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def _load():
    """Compile (or load the cached build of) the extension once per process: (module or None, reason)."""
    try:
        from torch.utils.cpp_extension import load_inline

        key = hashlib.sha256("\n".join([_CPP, *CFLAGS, *LDFLAGS, torch.__version__, _cpu_fingerprint()]).encode())
        module = load_inline(name=f"nnunet_segmamba_cpu_scan_{key.hexdigest()[:16]}", cpp_sources=[_CPP],
                             extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, verbose=False)
        return module, ""
    except Exception as exc:  # no compiler, a failed build, a read-only cache: the kernel is just unavailable
        return None, f"{type(exc).__name__}: {exc}"


def cpu_scan_status() -> tuple[bool, str]:
    """Whether the fused CPU scan can be used, and why not. Compiles the extension on the first call."""
    module, reason = _load()
    if module is None:
        return False, f"fused CPU scan unavailable (building the C++ extension failed): {reason}"
    return True, "fused CPU selective scan (nnunet_segmamba.ssm.cpu_scan)"


def _slices(batch: int, dim: int, groups_B: int, groups_C: int) -> tuple[int, int]:
    """The backward's work items: (batch, channel slice). Runs of `base` channels lie in one group of B and one
    of C; each is cut into `sub` slices, so that about 16 items keep any thread count busy. Both depend only on
    the shapes, never on the threads, so the order in which dB and dC are summed does not either."""
    base = math.gcd(dim // groups_B, dim // groups_C)
    return base, max(1, min(base, -(-16 // (batch * dim // base))))


class _CpuSelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, mode, num_slices, save):
        module, _ = _load()
        out, last, ckpt, Bt, Ct, ysave = module.fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, mode,
                                                    num_slices, CHUNK, save)
        ctx.settings = (delta_softplus, mode, num_slices, B.shape, C.shape)
        if save:
            ctx.save_for_backward(u, delta, A, Bt, Ct, D, z, delta_bias, ckpt, ysave)
        ctx.mark_non_differentiable(last)
        return out, last

    @staticmethod
    def backward(ctx, dout, _dlast):
        module, _ = _load()
        delta_softplus, mode, num_slices, B_shape, C_shape = ctx.settings
        u, delta, A, Bt, Ct, D, z, delta_bias, ckpt, ysave = ctx.saved_tensors
        batch, dim, _ = u.shape
        du, ddelta, dz, dA, dB, dC, dD, dbias = module.bwd(
            u, delta, A, Bt, Ct, D, z, delta_bias, delta_softplus, mode, num_slices, CHUNK, ckpt, ysave,
            dout.contiguous() if dout.stride(-1) != 1 else dout, *_slices(batch, dim, Bt.shape[1], Ct.shape[1]))
        return (du, ddelta, dA, dB.reshape(B_shape), dC.reshape(C_shape), dD if D is not None else None,
                dz if z is not None else None, dbias if delta_bias is not None else None, None, None, None, None)


def _rows(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in the compute dtype with unit stride along L (the kernels take any batch and channel strides)."""
    t = t.to(dtype)
    return t if t.stride(-1) == 1 else t.contiguous()


def selective_scan_cpu(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, order: str = "forward", num_slices: int | None = None):
    """The selective scan of `selective_scan` (mamba-ssm's semantics) by the fused CPU kernel.

    Args: as `nnunet_segmamba.ssm.selective_scan`; `order` ("forward", "reverse" or "slice" with `num_slices`)
    is read through index arithmetic inside the kernel, and the output comes back in the inputs' order.
    Computes in float32 (float64 for float64 u); returns out (batch, d, L) in u's dtype, and with
    `return_last_state` also the final state (batch, d, n), through which no gradient flows (as in mamba-ssm).
    Raises RuntimeError when the extension is unavailable (`cpu_scan_status`).
    """
    check_scan_shapes(u, delta, A, B, C, D, z, delta_bias)
    tensors = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    for name, t in tensors.items():
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"selective_scan_cpu needs CPU tensors, got {name} on {t.device}")
    num_slices, _ = slice_geometry(order, u.shape[-1], num_slices)
    if A.shape[1] > MAX_STATE:
        raise ValueError(f"A has d_state={A.shape[1]}; the CPU kernel supports up to {MAX_STATE}")
    usable, reason = cpu_scan_status()
    if not usable:
        raise RuntimeError(reason)
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    Bk = B.unsqueeze(1) if B.dim() == 3 else B
    Ck = C.unsqueeze(1) if C.dim() == 3 else C
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors.values())
    out, last = _CpuSelectiveScan.apply(
        _rows(u, dtype), _rows(delta, dtype), A.to(dtype).contiguous(), Bk.to(dtype), Ck.to(dtype),
        D.to(dtype).contiguous() if D is not None else None, _rows(z, dtype) if z is not None else None,
        delta_bias.to(dtype).contiguous() if delta_bias is not None else None, bool(delta_softplus),
        ORDER_IDS[order], num_slices, save)
    out = out.to(u.dtype)
    return (out, last) if return_last_state else out


class _CpuCausalConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, silu, mode, num_slices):
        module, _ = _load()
        ctx.settings = (silu, mode, num_slices)
        ctx.save_for_backward(x, weight, bias)
        return module.conv_fwd(x, weight, bias, silu, mode, num_slices)

    @staticmethod
    def backward(ctx, dout):
        module, _ = _load()
        silu, mode, num_slices = ctx.settings
        x, weight, bias = ctx.saved_tensors
        dx, dweight, dbias = module.conv_bwd(x, weight, bias, silu, mode, num_slices,
                                             dout if dout.stride(-1) == 1 else dout.contiguous())
        return dx, dweight, dbias if bias is not None else None, None, None, None


def causal_conv1d_cpu(x, weight, bias=None, silu: bool = True, order: str = "forward",
                      num_slices: int | None = None):
    """`nnunet_segmamba.ssm.causal_conv1d` (out[t] = bias + sum_k w[k] x[t - (K-1) + k], zero left padding, then
    SiLU) by the fused CPU kernel, running along `order` read in place; the output comes back in x's order.

    Args: x (batch, d, L) (any batch / channel strides); weight (d, K) or (d, 1, K); bias (d,) or None.
    Computes in float32 (float64 for float64 x); returns (batch, d, L) in x's dtype.
    """
    weight = weight if weight.dim() == 2 else weight.squeeze(1)
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, d, L), got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"weight must be (d={x.shape[1]}, K) or (d, 1, K), got shape {tuple(weight.shape)}")
    if bias is not None and bias.shape != (x.shape[1],):
        raise ValueError(f"bias must be (d={x.shape[1]},), got shape {tuple(bias.shape)}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"causal_conv1d_cpu needs CPU tensors, got {name} on {t.device}")
    num_slices, _ = slice_geometry(order, x.shape[-1], num_slices)
    usable, reason = cpu_scan_status()
    if not usable:
        raise RuntimeError(reason)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = _CpuCausalConv.apply(_rows(x, dtype), weight.to(dtype).contiguous(),
                               bias.to(dtype).contiguous() if bias is not None else None, bool(silu), ORDER_IDS[order],
                               num_slices)
    return out.to(x.dtype)
