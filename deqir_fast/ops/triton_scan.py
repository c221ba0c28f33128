"""The chain's affine scan as one Triton kernel: each program owns a block of elements
and walks the S steps with the running state in registers, reading P, Q, R, ē once and
writing each state once (the reference in ``scan.py`` launches 3-4 ops per step).

An order-2 chain (``previous``, docs/design.md §2.8) carries the previous step's input
and linearised model term in registers too (``ORDER2``), adding C_i u_{i-1} + D_i e_{i-1}
to R as the reference does.

Run on CPU through Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is
imported); on CUDA compiled. Computes in the inputs' dtype (float32 or float64).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _affine_scan_kernel(P, Q, E, R, J, U, U0, C, D, UP0, EP0, OUT, S, N, n_per_item,
                        p_s, p_b, p_n, q_s, q_b, q_n, r_s, r_b, r_n, j_s, j_b, j_n,
                        c_s, c_b, c_n, d_s, d_b, d_n,
                        HAS_R: tl.constexpr, HAS_J: tl.constexpr, ORDER2: tl.constexpr,
                        INCREMENT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)        # flat (batch, element) index
    mask = offs < N
    b = offs // n_per_item
    k = offs % n_per_item
    u = tl.load(U0 + offs, mask=mask, other=0.0)
    up = tl.zeros_like(u)                           # order 2: the previous step's input
    ep = tl.zeros_like(u)                           # and its linearised model term
    if ORDER2:
        up = tl.load(UP0 + offs, mask=mask, other=0.0)
        ep = tl.load(EP0 + offs, mask=mask, other=0.0)
    for i in range(S):
        p = tl.load(P + i * p_s + b * p_b + k * p_n, mask=mask, other=0.0)
        q = tl.load(Q + i * q_s + b * q_b + k * q_n, mask=mask, other=0.0)
        e = tl.load(E + i * N + offs, mask=mask, other=0.0)
        if HAS_J:   # the linearised scan: e + J (u - U), U the input e was evaluated at
            j = tl.load(J + i * j_s + b * j_b + k * j_n, mask=mask, other=0.0)
            e = e + j * (u - tl.load(U + i * N + offs, mask=mask, other=0.0))
        un = p * u + q * e
        if ORDER2:  # R + C u_{i-1} + D e_{i-1}, summed before it is added (the reference's order)
            t = tl.load(C + i * c_s + b * c_b + k * c_n, mask=mask, other=0.0) * up \
                + tl.load(D + i * d_s + b * d_b + k * d_n, mask=mask, other=0.0) * ep
            if HAS_R:
                t = tl.load(R + i * r_s + b * r_b + k * r_n, mask=mask, other=0.0) + t
            un += t
            up = u
            ep = e
        elif HAS_R:
            un += tl.load(R + i * r_s + b * r_b + k * r_n, mask=mask, other=0.0)
        if INCREMENT:   # P holds P - 1: u + (P u + Q e + R), as the reference
            un = u + un
        u = un
        tl.store(OUT + i * N + offs, u, mask=mask)


def _as_sbn(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A coefficient broadcastable to ``like`` [S, B, ...] as an [S, B, n] view (stride 0
    where it broadcasts; reshape copies only if no such view exists)."""
    S, B = like.shape[:2]
    return t.expand_as(like).reshape(S, B, -1)


def affine_scan_triton(P: torch.Tensor, Q: torch.Tensor, E: torch.Tensor,
                       R: Optional[torch.Tensor], u0: torch.Tensor,
                       J: Optional[torch.Tensor] = None, U: Optional[torch.Tensor] = None,
                       previous: Optional[tuple] = None, block: int = 1024,
                       increment: bool = False) -> torch.Tensor:
    """Same contract as ``scan.affine_scan_reference``: P, Q, J [S, 1 or B, ...],
    E, U [S, B, ...], R [S, 1 or B, ...] or None, u0 [B, ...] -> [S, B, ...]; ``previous``
    = (C, D [S, 1 or B, ...], u_prev, e_prev [B, ...]) for an order-2 chain; ``increment``:
    P holds P - 1."""
    if E.dim() < 3:
        raise ValueError(f"E must be [S, B, ...], got shape {tuple(E.shape)}")
    S, B = E.shape[:2]
    if tuple(u0.shape) != tuple(E.shape[1:]):
        raise ValueError(f"u0 must have shape {tuple(E.shape[1:])}, got {tuple(u0.shape)}")
    if (J is None) != (U is None):
        raise ValueError("J and U are given together or not at all")
    if U is not None and tuple(U.shape) != tuple(E.shape):
        raise ValueError(f"U must have E's shape {tuple(E.shape)}, got {tuple(U.shape)}")
    tensors = {"P": P, "Q": Q, "E": E, "u0": u0} | ({} if R is None else {"R": R}) \
        | ({} if J is None else {"J": J, "U": U})
    if previous is not None:
        C, D, u_prev, e_prev = previous
        for name, t in (("u_prev", u_prev), ("e_prev", e_prev)):
            if tuple(t.shape) != tuple(E.shape[1:]):
                raise ValueError(f"{name} must have shape {tuple(E.shape[1:])}, got {tuple(t.shape)}")
        tensors |= {"C": C, "D": D, "u_prev": u_prev, "e_prev": e_prev}
    for name, t in tensors.items():
        if t.dtype != E.dtype or t.device != E.device:
            raise TypeError(f"{name} must be {E.dtype} on {E.device}, got {t.dtype} on {t.device}")
        if name in ("P", "Q", "R", "J", "C", "D") and (t.shape[0] != S or t.dim() != E.dim()):
            raise ValueError(f"{name} must be [S={S}, 1 or B, ...] like E, got {tuple(t.shape)}")
    n = E[0, 0].numel()
    N = B * n
    Pv, Qv = _as_sbn(P, E), _as_sbn(Q, E)
    Ev = E.reshape(S, N).contiguous()
    Rv = _as_sbn(R, E) if R is not None else Pv       # unused when HAS_R is False
    Jv = _as_sbn(J, E) if J is not None else Pv       # unused when HAS_J is False
    Uv = U.reshape(S, N).contiguous() if U is not None else Ev
    u0v = u0.reshape(N).contiguous()
    if previous is not None:
        Cv, Dv = _as_sbn(C, E), _as_sbn(D, E)
        upv, epv = u_prev.reshape(N).contiguous(), e_prev.reshape(N).contiguous()
    else:                                             # unused when ORDER2 is False
        Cv, Dv, upv, epv = Pv, Pv, u0v, u0v
    out = torch.empty_like(Ev)
    grid = (triton.cdiv(N, block),)
    _affine_scan_kernel[grid](Pv, Qv, Ev, Rv, Jv, Uv, u0v, Cv, Dv, upv, epv, out, S, N, n,
                              *Pv.stride(), *Qv.stride(), *Rv.stride(), *Jv.stride(),
                              *Cv.stride(), *Dv.stride(),
                              HAS_R=R is not None, HAS_J=J is not None,
                              ORDER2=previous is not None, INCREMENT=bool(increment),
                              BLOCK=block)
    return out.view_as(E)
