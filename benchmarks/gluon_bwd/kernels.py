"""The scan backward's main kernel (`triton_scan._bwd_chunk`) in Triton's Gluon, with its layout explicit: tried,
not kept (docs/performance.md, "Not kept"). Same arguments as `_bwd_chunk`, plus:

  SMEM_BC   B, C and flipped C held in shared memory (in the inputs' dtype, or float32 with BC_F32) instead of
            three float32 register tiles;
  SMEM_ACC  the dB / dC sums over channels in shared memory instead of two register tiles;
and the launch's maxnreg. Variants: `_bwd_chunk_gluon` (flips as one lane shuffle), `_bwd_chunk_gluon_pf` (each
channel's rows copied to shared memory with cp.async while the channel before computes), `_bwd_chunk_gluon_u`
(the per-step work in a layout with 2 steps per lane instead of 8 replicated over 4 lanes).
Needs Triton 3.6's Gluon and a CUDA GPU of compute capability 8.0 or more; Triton's interpreter does not run it.
"""
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp

LOG2E = gl.constexpr(1.4426950408889634)
LN2 = gl.constexpr(0.6931471805599453)


@gluon.jit
def _lg2(x):
    return gl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=f,f", [x], dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def _softplus(x):
    e = gl.exp2(x * LOG2E)
    return gl.where(x > 20.0, x, gl.where(x < -15.0, e, _lg2(1.0 + e) * LN2))


@gluon.jit
def _sigmoid(x):
    return 1.0 / (1.0 + gl.exp2(-x * LOG2E))


@gluon.jit
def _linear_combine(a1, b1, a2, b2):
    return a1 * a2, b1 * a2 + b2


@gluon.jit
def _flip8(x):
    """x reversed along its 64 steps, for a layout that gives each lane 8 consecutive steps and 8 lanes a row
    (lane bits 0-2): lane ^ 7 holds the mirrored block, read in reverse register order."""
    xi = x.to(gl.int32, bitcast=True)
    y = gl.inline_asm_elementwise(
        "shfl.sync.bfly.b32 $0, $15, 7, 31, -1;\n\tshfl.sync.bfly.b32 $1, $14, 7, 31, -1;\n\t"
        "shfl.sync.bfly.b32 $2, $13, 7, 31, -1;\n\tshfl.sync.bfly.b32 $3, $12, 7, 31, -1;\n\t"
        "shfl.sync.bfly.b32 $4, $11, 7, 31, -1;\n\tshfl.sync.bfly.b32 $5, $10, 7, 31, -1;\n\t"
        "shfl.sync.bfly.b32 $6, $9, 7, 31, -1;\n\tshfl.sync.bfly.b32 $7, $8, 7, 31, -1;",
        "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r", [xi], dtype=gl.int32, is_pure=True, pack=8)
    return y.to(gl.float32, bitcast=True)


@gluon.jit
def _position(t, L, NS, M, MODE: gl.constexpr):
    if MODE == 1:
        return L - 1 - t
    elif MODE == 2:
        return (t % NS) * M + t // NS
    else:
        return t


@gluon.jit
def _bwd_chunk_gluon(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, states_ptr, adj_ptr,
                     du_ptr, ddelta_ptr, dz_ptr, dBC_ptr, dparam_ptr,
                     BATCH, D_, G_, N, W, L, M, NS, NCH, D_PER_PROGRAM, D_SPLIT, su, sdelta, sz, sB, sC,
                     NP: gl.constexpr, BL: gl.constexpr, MODE: gl.constexpr, HAS_D: gl.constexpr,
                     HAS_Z: gl.constexpr, HAS_BIAS: gl.constexpr, SOFTPLUS: gl.constexpr,
                     SMEM_BC: gl.constexpr, SMEM_ACC: gl.constexpr, BC_F32: gl.constexpr):
    gl.static_assert(BL == 64)
    gl.static_assert(gl.num_warps() == 1)
    P2: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [1, 1], [1, 0])
    LL: gl.constexpr = gl.SliceLayout(0, P2)
    LN: gl.constexpr = gl.SliceLayout(1, P2)
    pid = gl.program_id(0)
    c = gl.program_id(1)
    split = pid % D_SPLIT
    bg = pid // D_SPLIT
    g = bg % G_
    b = bg // G_
    b64 = b.to(gl.int64)
    s = gl.arange(0, BL, layout=LL)
    t = c * BL + s
    mask = t < L
    p = _position(t, L, NS, M, MODE)
    n = gl.arange(0, NP, layout=LN)
    nmask = n < N
    m2 = nmask[:, None] & mask[None, :]
    nl = g * N * L + n[:, None] * L + p[None, :]
    d0 = g * (D_ // G_) + split * D_PER_PROGRAM
    B_in = gl.load(B_ptr + b64 * sB + nl, mask=m2, other=0.0)
    C_in = gl.load(C_ptr + b64 * sC + nl, mask=m2, other=0.0)
    Bt = B_in.to(gl.float32)
    Ct = C_in.to(gl.float32)
    Cf = _flip8(Ct)
    if SMEM_BC:
        SH: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        if BC_F32:
            B_s = gl.allocate_shared_memory(gl.float32, [NP, BL], SH, Bt)
            C_s = gl.allocate_shared_memory(gl.float32, [NP, BL], SH, Ct)
            Cf_s = gl.allocate_shared_memory(gl.float32, [NP, BL], SH, Cf)
        else:
            B_s = gl.allocate_shared_memory(B_in.dtype, [NP, BL], SH, B_in)
            C_s = gl.allocate_shared_memory(C_in.dtype, [NP, BL], SH, C_in)
            Cf_s = gl.allocate_shared_memory(C_in.dtype, [NP, BL], SH, Cf.to(C_in.dtype))
    dB_acc = gl.zeros([NP, BL], gl.float32, P2)
    dC_acc = gl.zeros([NP, BL], gl.float32, P2)
    if SMEM_ACC:
        SHA: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        dB_s = gl.allocate_shared_memory(gl.float32, [NP, BL], SHA, dB_acc)
        dC_s = gl.allocate_shared_memory(gl.float32, [NP, BL], SHA, dC_acc)
    first = (s == 0)[None, :]
    dt_src = gl.where(s == 0, 0, BL - s)
    for i in range(0, D_PER_PROGRAM):
        d = d0 + i
        bd = b * D_ + d
        row = bd.to(gl.int64) * L
        chan = d.to(gl.int64) * L
        delta = gl.load(delta_ptr + b64 * sdelta + chan + p, mask=mask, other=0.0)
        u = gl.load(u_ptr + b64 * su + chan + p, mask=mask, other=0.0).to(gl.float32)
        dy = gl.load(dout_ptr + row + p, mask=mask, other=0.0).to(gl.float32)
        A2 = gl.load(A_ptr + d * N + n, mask=nmask, other=0.0) * LOG2E
        h0 = gl.load(states_ptr + (bd.to(gl.int64) * (NCH + 1) + c) * N + n, mask=nmask, other=0.0)
        adj = gl.load(adj_ptr + (bd.to(gl.int64) * (NCH + 1) + c + 1) * N + n, mask=nmask, other=0.0)
        Dd = 0.0
        if HAS_D:
            Dd = gl.load(D_ptr + d).to(gl.float32)
        x = delta.to(gl.float32)
        if HAS_BIAS:
            x = x + gl.load(bias_ptr + d)
        dt = x
        if SOFTPLUS:
            dt = _softplus(x)
        dt = gl.where(mask, dt, 0.0)
        if SMEM_BC:
            Bt = B_s.load(P2).to(gl.float32)
        dtu = dt * u
        drive = Bt * dtu[None, :]
        decay = gl.exp2(A2[:, None] * dt[None, :])
        _, h = gl.associative_scan((decay, drive + gl.where(first, decay * h0[:, None], 0.0)), axis=1,
                                   combine_fn=_linear_combine)
        decayed_prev = h - drive
        if HAS_Z:
            if SMEM_BC:
                Ct = C_s.load(P2).to(gl.float32)
            y = gl.sum(h * Ct, 0) + Dd * u
            z = gl.load(z_ptr + b64 * sz + chan + p, mask=mask, other=0.0).to(gl.float32)
            gate = _sigmoid(z)
            gl.store(dz_ptr + row + p, (dy * y * gate * (1.0 + z * (1.0 - gate))).to(dz_ptr.dtype.element_ty),
                     mask=mask)
            dy = dy * z * gate
        if SMEM_ACC:
            dC_s.store(dC_s.load(P2) + h * dy[None, :])
        else:
            dC_acc += h * dy[None, :]
        dt_next_flipped = gl.where(s == 0, 0.0, gl.gather(dt, dt_src, 0))
        if SMEM_BC:
            Cf = Cf_s.load(P2).to(gl.float32)
        _, dh = gl.associative_scan(
            (gl.exp2(A2[:, None] * dt_next_flipped[None, :]),
             Cf * _flip8(dy)[None, :] + gl.where(first, adj[:, None], 0.0)),
            axis=1, combine_fn=_linear_combine)
        dh = _flip8(dh)
        if SMEM_BC:
            Bt = B_s.load(P2).to(gl.float32)
        dh_B = gl.sum(dh * Bt, 0)
        dh_prev = dh * decayed_prev
        du = dh_B * dt + Dd * dy
        ddt = gl.sum(dh_prev * A2[:, None], 0) * LN2 + dh_B * u
        if SOFTPLUS:
            ddt = ddt * _sigmoid(x)
        ddt = gl.where(mask, ddt, 0.0)
        gl.store(du_ptr + row + p, du.to(du_ptr.dtype.element_ty), mask=mask)
        gl.store(ddelta_ptr + row + p, ddt.to(ddelta_ptr.dtype.element_ty), mask=mask)
        part = ((b * NCH + c).to(gl.int64) * D_ + d) * W
        gl.store(dparam_ptr + part + n, gl.sum(dh_prev * dt[None, :], 1), mask=nmask)
        if HAS_D:
            gl.store(dparam_ptr + part + N, gl.sum(dy * u, 0))
        if HAS_BIAS:
            gl.store(dparam_ptr + part + W - 1, gl.sum(ddt, 0))
        if SMEM_ACC:
            dB_s.store(dB_s.load(P2) + dh * dtu[None, :])
        else:
            dB_acc += dh * dtu[None, :]
    if SMEM_ACC:
        dB_acc = dB_s.load(P2)
        dC_acc = dC_s.load(P2)
    dB_row = (((split * 2) * BATCH + b) * G_ + g).to(gl.int64) * N * L
    dC_row = dB_row + BATCH * G_ * N * L
    gl.store(dBC_ptr + dB_row + n[:, None] * L + p[None, :], dB_acc.to(dBC_ptr.dtype.element_ty), mask=m2)
    gl.store(dBC_ptr + dC_row + n[:, None] * L + p[None, :], dC_acc.to(dBC_ptr.dtype.element_ty), mask=m2)


@gluon.jit
def _bwd_chunk_gluon_pf(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, states_ptr, adj_ptr,
                     du_ptr, ddelta_ptr, dz_ptr, dBC_ptr, dparam_ptr,
                     BATCH, D_, G_, N, W, L, M, NS, NCH, D_PER_PROGRAM, D_SPLIT, su, sdelta, sz, sB, sC,
                     NP: gl.constexpr, BL: gl.constexpr, MODE: gl.constexpr, HAS_D: gl.constexpr,
                     HAS_Z: gl.constexpr, HAS_BIAS: gl.constexpr, SOFTPLUS: gl.constexpr,
                     SMEM_BC: gl.constexpr, SMEM_ACC: gl.constexpr, BC_F32: gl.constexpr):
    gl.static_assert(BL == 64)
    gl.static_assert(gl.num_warps() == 1)
    P2: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [1, 1], [1, 0])
    LL: gl.constexpr = gl.SliceLayout(0, P2)
    LN: gl.constexpr = gl.SliceLayout(1, P2)
    pid = gl.program_id(0)
    c = gl.program_id(1)
    split = pid % D_SPLIT
    bg = pid // D_SPLIT
    g = bg % G_
    b = bg // G_
    b64 = b.to(gl.int64)
    s = gl.arange(0, BL, layout=LL)
    t = c * BL + s
    mask = t < L
    p = _position(t, L, NS, M, MODE)
    n = gl.arange(0, NP, layout=LN)
    nmask = n < N
    m2 = nmask[:, None] & mask[None, :]
    nl = g * N * L + n[:, None] * L + p[None, :]
    d0 = g * (D_ // G_) + split * D_PER_PROGRAM
    B_in = gl.load(B_ptr + b64 * sB + nl, mask=m2, other=0.0)
    C_in = gl.load(C_ptr + b64 * sC + nl, mask=m2, other=0.0)
    Bt = B_in.to(gl.float32)
    Ct = C_in.to(gl.float32)
    Cf = _flip8(Ct)
    if SMEM_BC:
        SH: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        if BC_F32:
            B_s = gl.allocate_shared_memory(gl.float32, [NP, BL], SH, Bt)
            C_s = gl.allocate_shared_memory(gl.float32, [NP, BL], SH, Ct)
            Cf_s = gl.allocate_shared_memory(gl.float32, [NP, BL], SH, Cf)
        else:
            B_s = gl.allocate_shared_memory(B_in.dtype, [NP, BL], SH, B_in)
            C_s = gl.allocate_shared_memory(C_in.dtype, [NP, BL], SH, C_in)
            Cf_s = gl.allocate_shared_memory(C_in.dtype, [NP, BL], SH, Cf.to(C_in.dtype))
    dB_acc = gl.zeros([NP, BL], gl.float32, P2)
    dC_acc = gl.zeros([NP, BL], gl.float32, P2)
    if SMEM_ACC:
        SHA: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        dB_s = gl.allocate_shared_memory(gl.float32, [NP, BL], SHA, dB_acc)
        dC_s = gl.allocate_shared_memory(gl.float32, [NP, BL], SHA, dC_acc)
    first = (s == 0)[None, :]
    dt_src = gl.where(s == 0, 0, BL - s)
    # each channel's rows of delta, u, z and dy are copied to shared memory (cp.async) while the channel before
    # computes, in two slots, so that no register holds them while they travel
    R1: gl.constexpr = gl.BlockedLayout([2], [32], [1], [0])
    SR: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    s1 = gl.arange(0, BL, layout=R1)
    t1 = c * BL + s1
    mask1 = t1 < L
    delta_s = gl.allocate_shared_memory(delta_ptr.dtype.element_ty, [2, BL], SR)
    u_s = gl.allocate_shared_memory(u_ptr.dtype.element_ty, [2, BL], SR)
    z_s = gl.allocate_shared_memory(z_ptr.dtype.element_ty, [2, BL], SR)
    dy_s = gl.allocate_shared_memory(dout_ptr.dtype.element_ty, [2, BL], SR)
    chan0 = d0.to(gl.int64) * L
    row0 = (b * D_ + d0).to(gl.int64) * L
    cp.async_copy_global_to_shared(delta_s.index(0), delta_ptr + b64 * sdelta + chan0 + t1, mask=mask1)
    cp.async_copy_global_to_shared(u_s.index(0), u_ptr + b64 * su + chan0 + t1, mask=mask1)
    if HAS_Z:
        cp.async_copy_global_to_shared(z_s.index(0), z_ptr + b64 * sz + chan0 + t1, mask=mask1)
    cp.async_copy_global_to_shared(dy_s.index(0), dout_ptr + row0 + t1, mask=mask1)
    cp.commit_group()
    for i in range(0, D_PER_PROGRAM):
        d = d0 + i
        bd = b * D_ + d
        row = bd.to(gl.int64) * L
        chan = d.to(gl.int64) * L
        slot = i % 2
        nxt = 1 - slot
        live = mask1 & (i + 1 < D_PER_PROGRAM)
        gl.thread_barrier()  # every lane is done reading the slot the next copy overwrites
        cp.async_copy_global_to_shared(delta_s.index(nxt), delta_ptr + b64 * sdelta + chan + L + t1, mask=live)
        cp.async_copy_global_to_shared(u_s.index(nxt), u_ptr + b64 * su + chan + L + t1, mask=live)
        if HAS_Z:
            cp.async_copy_global_to_shared(z_s.index(nxt), z_ptr + b64 * sz + chan + L + t1, mask=live)
        cp.async_copy_global_to_shared(dy_s.index(nxt), dout_ptr + row + L + t1, mask=live)
        cp.commit_group()
        cp.wait_group(1)
        gl.thread_barrier()  # this channel's rows, copied by every lane, are visible to all
        delta = delta_s.index(slot).load(LL)
        u = u_s.index(slot).load(LL).to(gl.float32)
        dy = dy_s.index(slot).load(LL).to(gl.float32)
        A2 = gl.load(A_ptr + d * N + n, mask=nmask, other=0.0) * LOG2E
        h0 = gl.load(states_ptr + (bd.to(gl.int64) * (NCH + 1) + c) * N + n, mask=nmask, other=0.0)
        adj = gl.load(adj_ptr + (bd.to(gl.int64) * (NCH + 1) + c + 1) * N + n, mask=nmask, other=0.0)
        Dd = 0.0
        if HAS_D:
            Dd = gl.load(D_ptr + d).to(gl.float32)
        x = delta.to(gl.float32)
        if HAS_BIAS:
            x = x + gl.load(bias_ptr + d)
        dt = x
        if SOFTPLUS:
            dt = _softplus(x)
        dt = gl.where(mask, dt, 0.0)
        if SMEM_BC:
            Bt = B_s.load(P2).to(gl.float32)
        dtu = dt * u
        drive = Bt * dtu[None, :]
        decay = gl.exp2(A2[:, None] * dt[None, :])
        _, h = gl.associative_scan((decay, drive + gl.where(first, decay * h0[:, None], 0.0)), axis=1,
                                   combine_fn=_linear_combine)
        decayed_prev = h - drive
        if HAS_Z:
            if SMEM_BC:
                Ct = C_s.load(P2).to(gl.float32)
            y = gl.sum(h * Ct, 0) + Dd * u
            z = z_s.index(slot).load(LL).to(gl.float32)
            gate = _sigmoid(z)
            gl.store(dz_ptr + row + p, (dy * y * gate * (1.0 + z * (1.0 - gate))).to(dz_ptr.dtype.element_ty),
                     mask=mask)
            dy = dy * z * gate
        if SMEM_ACC:
            dC_s.store(dC_s.load(P2) + h * dy[None, :])
        else:
            dC_acc += h * dy[None, :]
        dt_next_flipped = gl.where(s == 0, 0.0, gl.gather(dt, dt_src, 0))
        if SMEM_BC:
            Cf = Cf_s.load(P2).to(gl.float32)
        _, dh = gl.associative_scan(
            (gl.exp2(A2[:, None] * dt_next_flipped[None, :]),
             Cf * _flip8(dy)[None, :] + gl.where(first, adj[:, None], 0.0)),
            axis=1, combine_fn=_linear_combine)
        dh = _flip8(dh)
        if SMEM_BC:
            Bt = B_s.load(P2).to(gl.float32)
        dh_B = gl.sum(dh * Bt, 0)
        dh_prev = dh * decayed_prev
        du = dh_B * dt + Dd * dy
        ddt = gl.sum(dh_prev * A2[:, None], 0) * LN2 + dh_B * u
        if SOFTPLUS:
            ddt = ddt * _sigmoid(x)
        ddt = gl.where(mask, ddt, 0.0)
        gl.store(du_ptr + row + p, du.to(du_ptr.dtype.element_ty), mask=mask)
        gl.store(ddelta_ptr + row + p, ddt.to(ddelta_ptr.dtype.element_ty), mask=mask)
        part = ((b * NCH + c).to(gl.int64) * D_ + d) * W
        gl.store(dparam_ptr + part + n, gl.sum(dh_prev * dt[None, :], 1), mask=nmask)
        if HAS_D:
            gl.store(dparam_ptr + part + N, gl.sum(dy * u, 0))
        if HAS_BIAS:
            gl.store(dparam_ptr + part + W - 1, gl.sum(ddt, 0))
        if SMEM_ACC:
            dB_s.store(dB_s.load(P2) + dh * dtu[None, :])
        else:
            dB_acc += dh * dtu[None, :]
    if SMEM_ACC:
        dB_acc = dB_s.load(P2)
        dC_acc = dC_s.load(P2)
    dB_row = (((split * 2) * BATCH + b) * G_ + g).to(gl.int64) * N * L
    dC_row = dB_row + BATCH * G_ * N * L
    gl.store(dBC_ptr + dB_row + n[:, None] * L + p[None, :], dB_acc.to(dBC_ptr.dtype.element_ty), mask=m2)
    gl.store(dBC_ptr + dC_row + n[:, None] * L + p[None, :], dC_acc.to(dBC_ptr.dtype.element_ty), mask=m2)


@gluon.jit
def _bwd_chunk_gluon_u(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, states_ptr, adj_ptr,
                     du_ptr, ddelta_ptr, dz_ptr, dBC_ptr, dparam_ptr,
                     BATCH, D_, G_, N, W, L, M, NS, NCH, D_PER_PROGRAM, D_SPLIT, su, sdelta, sz, sB, sC,
                     NP: gl.constexpr, BL: gl.constexpr, MODE: gl.constexpr, HAS_D: gl.constexpr,
                     HAS_Z: gl.constexpr, HAS_BIAS: gl.constexpr, SOFTPLUS: gl.constexpr,
                     SMEM_BC: gl.constexpr, SMEM_ACC: gl.constexpr, BC_F32: gl.constexpr):
    gl.static_assert(BL == 64)
    gl.static_assert(gl.num_warps() == 1)
    P2: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [1, 1], [1, 0])
    LL: gl.constexpr = gl.SliceLayout(0, P2)
    LN: gl.constexpr = gl.SliceLayout(1, P2)
    pid = gl.program_id(0)
    c = gl.program_id(1)
    split = pid % D_SPLIT
    bg = pid // D_SPLIT
    g = bg % G_
    b = bg // G_
    b64 = b.to(gl.int64)
    s = gl.arange(0, BL, layout=LL)
    t = c * BL + s
    mask = t < L
    p = _position(t, L, NS, M, MODE)
    n = gl.arange(0, NP, layout=LN)
    nmask = n < N
    m2 = nmask[:, None] & mask[None, :]
    nl = g * N * L + n[:, None] * L + p[None, :]
    d0 = g * (D_ // G_) + split * D_PER_PROGRAM
    B_in = gl.load(B_ptr + b64 * sB + nl, mask=m2, other=0.0)
    C_in = gl.load(C_ptr + b64 * sC + nl, mask=m2, other=0.0)
    Bt = B_in.to(gl.float32)
    Ct = C_in.to(gl.float32)
    Cf = _flip8(Ct)
    if SMEM_BC:
        SH: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        if BC_F32:
            B_s = gl.allocate_shared_memory(gl.float32, [NP, BL], SH, Bt)
            C_s = gl.allocate_shared_memory(gl.float32, [NP, BL], SH, Ct)
            Cf_s = gl.allocate_shared_memory(gl.float32, [NP, BL], SH, Cf)
        else:
            B_s = gl.allocate_shared_memory(B_in.dtype, [NP, BL], SH, B_in)
            C_s = gl.allocate_shared_memory(C_in.dtype, [NP, BL], SH, C_in)
            Cf_s = gl.allocate_shared_memory(C_in.dtype, [NP, BL], SH, Cf.to(C_in.dtype))
    dB_acc = gl.zeros([NP, BL], gl.float32, P2)
    dC_acc = gl.zeros([NP, BL], gl.float32, P2)
    if SMEM_ACC:
        SHA: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        dB_s = gl.allocate_shared_memory(gl.float32, [NP, BL], SHA, dB_acc)
        dC_s = gl.allocate_shared_memory(gl.float32, [NP, BL], SHA, dC_acc)
    first = (s == 0)[None, :]
    dt_src = gl.where(s == 0, 0, BL - s)
    # 1-D work on the steps in a layout that gives each lane 2 of them (U), a subset of the 8 it holds in LL, so that
    # LL -> U costs nothing and the softplus, sigmoids and gate math run once per step instead of 4 times
    U: gl.constexpr = gl.DistributedLinearLayout([[1]], [[8], [16], [32], [2], [4]], [], [], [BL])
    sU = gl.arange(0, BL, layout=U)
    tU = c * BL + sU
    maskU = tU < L
    pU = _position(tU, L, NS, M, MODE)
    for i in range(0, D_PER_PROGRAM):
        d = d0 + i
        bd = b * D_ + d
        row = bd.to(gl.int64) * L
        chan = d.to(gl.int64) * L
        xU = gl.load(delta_ptr + b64 * sdelta + chan + pU, mask=maskU, other=0.0).to(gl.float32)
        uU = gl.load(u_ptr + b64 * su + chan + pU, mask=maskU, other=0.0).to(gl.float32)
        u = gl.load(u_ptr + b64 * su + chan + p, mask=mask, other=0.0).to(gl.float32)
        dyU = gl.load(dout_ptr + row + pU, mask=maskU, other=0.0).to(gl.float32)
        A2 = gl.load(A_ptr + d * N + n, mask=nmask, other=0.0) * LOG2E
        h0 = gl.load(states_ptr + (bd.to(gl.int64) * (NCH + 1) + c) * N + n, mask=nmask, other=0.0)
        adj = gl.load(adj_ptr + (bd.to(gl.int64) * (NCH + 1) + c + 1) * N + n, mask=nmask, other=0.0)
        Dd = 0.0
        if HAS_D:
            Dd = gl.load(D_ptr + d).to(gl.float32)
        if HAS_BIAS:
            xU = xU + gl.load(bias_ptr + d)
        dtU = xU
        if SOFTPLUS:
            dtU = _softplus(xU)
        dtU = gl.where(maskU, dtU, 0.0)
        dt = gl.convert_layout(dtU, LL)
        if SMEM_BC:
            Bt = B_s.load(P2).to(gl.float32)
        dtu = dt * u
        drive = Bt * dtu[None, :]
        decay = gl.exp2(A2[:, None] * dt[None, :])
        _, h = gl.associative_scan((decay, drive + gl.where(first, decay * h0[:, None], 0.0)), axis=1,
                                   combine_fn=_linear_combine)
        decayed_prev = h - drive
        if HAS_Z:
            if SMEM_BC:
                Ct = C_s.load(P2).to(gl.float32)
            yU = gl.convert_layout(gl.sum(h * Ct, 0), U) + Dd * uU
            zU = gl.load(z_ptr + b64 * sz + chan + pU, mask=maskU, other=0.0).to(gl.float32)
            gate = _sigmoid(zU)
            gl.store(dz_ptr + row + pU, (dyU * yU * gate * (1.0 + zU * (1.0 - gate))).to(dz_ptr.dtype.element_ty),
                     mask=maskU)
            dyU = dyU * zU * gate
        dy = gl.convert_layout(dyU, LL)
        if SMEM_ACC:
            dC_s.store(dC_s.load(P2) + h * dy[None, :])
        else:
            dC_acc += h * dy[None, :]
        dt_next_flipped = gl.where(s == 0, 0.0, gl.gather(dt, dt_src, 0))
        if SMEM_BC:
            Cf = Cf_s.load(P2).to(gl.float32)
        _, dh = gl.associative_scan(
            (gl.exp2(A2[:, None] * dt_next_flipped[None, :]),
             Cf * _flip8(dy)[None, :] + gl.where(first, adj[:, None], 0.0)),
            axis=1, combine_fn=_linear_combine)
        dh = _flip8(dh)
        if SMEM_BC:
            Bt = B_s.load(P2).to(gl.float32)
        dh_BU = gl.convert_layout(gl.sum(dh * Bt, 0), U)
        dh_prev = dh * decayed_prev
        duU = dh_BU * dtU + Dd * dyU
        ddtU = gl.convert_layout(gl.sum(dh_prev * A2[:, None], 0), U) * LN2 + dh_BU * uU
        if SOFTPLUS:
            ddtU = ddtU * _sigmoid(xU)
        ddtU = gl.where(maskU, ddtU, 0.0)
        gl.store(du_ptr + row + pU, duU.to(du_ptr.dtype.element_ty), mask=maskU)
        gl.store(ddelta_ptr + row + pU, ddtU.to(ddelta_ptr.dtype.element_ty), mask=maskU)
        part = ((b * NCH + c).to(gl.int64) * D_ + d) * W
        gl.store(dparam_ptr + part + n, gl.sum(dh_prev * dt[None, :], 1), mask=nmask)
        if HAS_D:
            gl.store(dparam_ptr + part + N, gl.sum(dyU * uU, 0))
        if HAS_BIAS:
            gl.store(dparam_ptr + part + W - 1, gl.sum(ddtU, 0))
        if SMEM_ACC:
            dB_s.store(dB_s.load(P2) + dh * dtu[None, :])
        else:
            dB_acc += dh * dtu[None, :]
    if SMEM_ACC:
        dB_acc = dB_s.load(P2)
        dC_acc = dC_s.load(P2)
    dB_row = (((split * 2) * BATCH + b) * G_ + g).to(gl.int64) * N * L
    dC_row = dB_row + BATCH * G_ * N * L
    gl.store(dBC_ptr + dB_row + n[:, None] * L + p[None, :], dB_acc.to(dBC_ptr.dtype.element_ty), mask=m2)
    gl.store(dBC_ptr + dC_row + n[:, None] * L + p[None, :], dC_acc.to(dBC_ptr.dtype.element_ty), mask=m2)


