"""The fused solver round as one Triton kernel (``fused_round.py`` has the contract and
the reference). Each program owns a block of (batch item, element) pairs, loads their
singular values and ȳ once, and walks the W steps with the running state in registers:
per step it reads E, the next input U (which is also the old state the residual is
measured against), the noise draw and one J slope per class, computes P, Q, kY, kZ and
the class in-kernel from the step's scalars (the sampler is a ``tl.constexpr``: one
kernel, three specialisations), writes the new state and the block's max |u' - X_old|.
The per-step maximum over blocks is a [W, programs] partial table reduced by one
``amax`` afterwards (deterministic; NaN-sticky like the reference).

On CUDA compiled; on a CPU only through Triton's interpreter (``TRITON_INTERPRET=1``
set before triton is imported), where bf16 is unreliable: the kernel computes in the
state dtype, float32 or float64. Offsets are 64-bit, so there is no 2^31 limit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import layout as L

# The fused round's layout (``layout.py``, the one definition the reference and the C++/
# CUDA kernels also read) as compile-time constants: the sampler ids the ``SAMPLER``
# flag takes, the table's row length and its columns. tests/test_layout.py checks that
# each name here carries layout.py's value of the same name.
DDIM = tl.constexpr(L.SAMPLERS["ddim"])
DDRM = tl.constexpr(L.SAMPLERS["ddrm"])
DDNM = tl.constexpr(L.SAMPLERS["ddnm"])
NS = tl.constexpr(L.NS)
C_P0 = tl.constexpr(L.C_P0)
C_Q0 = tl.constexpr(L.C_Q0)
C_Z0 = tl.constexpr(L.C_Z0)
C_P2 = tl.constexpr(L.C_P2)
C_Q2 = tl.constexpr(L.C_Q2)
C_REB = tl.constexpr(L.C_REB)
C_KYA = tl.constexpr(L.C_KYA)
C_KSNSY = tl.constexpr(L.C_KSNSY)
C_PA = tl.constexpr(L.C_PA)
C_QA = tl.constexpr(L.C_QA)
C_R = tl.constexpr(L.C_R)
C_SN = tl.constexpr(L.C_SN)
C_SN2 = tl.constexpr(L.C_SN2)
C_SYEB = tl.constexpr(L.C_SYEB)
C_SY = tl.constexpr(L.C_SY)
C_KEEP = tl.constexpr(L.C_KEEP)
C_ETA = tl.constexpr(L.C_ETA)
C_RSY = tl.constexpr(L.C_RSY)


@triton.jit
def _fused_round_kernel(TABLE, E, U, XL, S_, YB, Z, J, OUT, PART,
                        W, N, n, yb_b, j_s, j_b, nprog,
                        SAMPLER: tl.constexpr, HAS_J: tl.constexpr, K: tl.constexpr,
                        HAS_Y: tl.constexpr, HAS_Z: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)        # flat (batch, element)
    mask = offs < N
    b = offs // n
    k = offs % n
    dt = OUT.dtype.element_ty
    zero = tl.zeros([BLOCK], dtype=dt)
    one = zero + 1.0
    s = zero
    inv_s = zero
    yb = zero
    if SAMPLER != DDIM:
        s = tl.load(S_ + k, mask=mask, other=0.0)
        inv_s = tl.where(s > 0, one / tl.where(s > 0, s, one), zero)
    if HAS_Y:
        yb = tl.load(YB + b * yb_b + k, mask=mask, other=0.0)
    u = tl.load(U + offs, mask=mask, other=0.0)
    uin = u                                      # U_i: the input ē_i was evaluated at
    at = offs                                    # i * N + offs in 64 bits (W·N may pass 2^31)
    for i in range(W):
        row = TABLE + i * NS
        P0 = tl.load(row + C_P0).to(dt)
        Q0 = tl.load(row + C_Q0).to(dt)
        Z0 = tl.load(row + C_Z0).to(dt)
        cls = tl.zeros([BLOCK], dtype=tl.int32)
        P = zero + P0
        Q = zero + Q0
        kY = zero
        kZ = zero + Z0
        if SAMPLER == DDRM:                      # DDRM (chains.DDRM._k)
            sn = tl.load(row + C_SN).to(dt)
            sy = tl.load(row + C_SY).to(dt)
            pos = s > 0
            before = pos & (s * sn > sy)         # noisier than y: class 2
            after = pos & (s * sn < sy)          # less noisy than y: class 1
            c0a = 1.0 - tl.load(row + C_KSNSY).to(dt) * s
            P = tl.where(before, tl.load(row + C_P2).to(dt),
                         tl.where(after, tl.load(row + C_PA).to(dt) * c0a, P))
            Q = tl.where(before, tl.load(row + C_Q2).to(dt),
                         tl.where(after, -(tl.load(row + C_QA).to(dt) * c0a), Q))
            kY = tl.where(before, tl.load(row + C_REB).to(dt) * inv_s,
                          tl.where(after, zero + tl.load(row + C_KYA).to(dt), zero))
            w = tl.load(row + C_SYEB).to(dt) * inv_s
            sp = tl.load(row + C_SN2).to(dt) - w * w
            sp = tl.where(sp > 0, sp, zero)
            kZ = tl.where(before, tl.load(row + C_R).to(dt) * tl.sqrt(sp), kZ)
            cls = tl.where(before, 2, tl.where(after, 1, 0))
        if SAMPLER == DDNM:                      # DDNM / DDNM+ (chains.DDNM._k)
            sn = tl.load(row + C_SN).to(dt)
            rsy = tl.load(row + C_RSY).to(dt)
            r = tl.load(row + C_R).to(dt)
            pos = s > 0
            yn = rsy * inv_s                     # noise std of sqrt(a') A⁺y
            full = pos & (sn >= yn)              # λ = 1: class 1
            part = pos & (sn < yn)               # λ < 1: class 2
            lam = (sn * s) / tl.where(rsy != 0, zero + rsy, one)
            c0 = 1.0 - lam
            g = tl.load(row + C_SN2).to(dt) - yn * yn
            g = tl.sqrt(tl.where(g > 0, g, zero))
            P = tl.where(full, zero, tl.where(part, tl.load(row + C_PA).to(dt) * c0, P))
            Q = tl.where(full, g * tl.load(row + C_KEEP).to(dt),
                         tl.where(part, -(tl.load(row + C_QA).to(dt) * c0), Q))
            kY = tl.where(full, r * inv_s, tl.where(part, (r * lam) * inv_s, zero))
            kZ = tl.where(full, g * tl.load(row + C_ETA).to(dt), tl.where(part, zero, kZ))
            cls = tl.where(full, 1, tl.where(part, 2, 0))
        e = tl.load(E + at, mask=mask, other=0.0)
        if HAS_J:   # linearised: e + J_class (u - U_i)
            if K == 1:
                j = tl.load(J + i * j_s + b * j_b, mask=mask, other=0.0)
            else:
                j = tl.load(J + i * j_s + b * j_b + cls, mask=mask, other=0.0)
            e = e + j * (u - uin)
        un = P * u + Q * e
        if HAS_Y:
            if HAS_Z:
                un = un + (kY * yb + kZ * tl.load(Z + at, mask=mask, other=0.0))
            else:
                un = un + kY * yb
        else:
            if HAS_Z:
                un = un + kZ * tl.load(Z + at, mask=mask, other=0.0)
        tl.store(OUT + at, un, mask=mask)
        # X_old_i: U_{i+1} (kept as the next step's input), or x_last after the last step
        nxt = tl.load(U + at + N, mask=mask & (i + 1 < W), other=0.0)
        last = tl.load(XL + offs, mask=mask & (i + 1 >= W), other=0.0)
        old = tl.where(i + 1 < W, nxt, last)
        d = tl.where(mask, tl.abs(un - old), zero)
        isnan = d != d
        m = tl.max(tl.where(isnan, zero, d), axis=0)
        bad = tl.max(isnan.to(tl.int32), axis=0)
        tl.store(PART + i * nprog + pid, tl.where(bad > 0, float("nan"), m))
        u = un
        uin = nxt
        at += N


def fused_round_triton(sampler_id: int, table, E, U, x_last, scale, s, ybar, noise, slopes,
                       block: int = 1024, num_warps: int = 4):
    """The kernel on the normalised layout of ``fused_round._normalise``; returns
    (states [W, B, n], residuals [W] float64)."""
    W, B, n = E.shape
    N = B * n
    nprog = triton.cdiv(N, block)
    out = torch.empty_like(E)
    part = torch.empty((W, nprog), dtype=E.dtype, device=E.device)
    K = 1 if slopes is None else slopes.shape[2]
    j_s = 0 if slopes is None else slopes.shape[1] * K
    j_b = 0 if slopes is None or slopes.shape[1] == 1 else K
    yb_b = 0 if ybar is None or ybar.shape[0] == 1 else n
    dummy = E                                         # never read when its flag is off
    _fused_round_kernel[(nprog,)](
        table, E, U, x_last, dummy if s is None else s, dummy if ybar is None else ybar,
        dummy if noise is None else noise, dummy if slopes is None else slopes, out, part,
        W, N, n, yb_b, j_s, j_b, nprog,
        SAMPLER=sampler_id, HAS_J=slopes is not None, K=K, HAS_Y=ybar is not None,
        HAS_Z=noise is not None, BLOCK=block, num_warps=num_warps)
    return out, part.amax(1).to(torch.float64) * scale
