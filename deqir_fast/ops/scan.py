"""The chain's affine update u' = P u + Q ē + R and its scan over the step axis, in its
linearised form (docs/design.md §3a):

    u_{i+1} = P_i u_i + Q_i (E_i + J_i (u_i - U_i)) + R_i,

where E_i = ē(U_i) was evaluated at the previous iterate's input U_i of step i and J_i is
a diagonal guess of ∂ē/∂u. J = None is the plain scan (ē lagged whole). At a fixed point
u_i = U_i, so the correction vanishes and every J has the serial sampler's fixed point;
at the first step u_0 = U_0 (the carry), so its correction is exactly 0.

``affine_scan`` is the generic scan (any P, Q, J tensors): the adjoint system, chains
without a kernel spec and ParaDiGMS' per-element J. DDIM, DDRM and DDNM solves run the
fused round instead (``fused_round.py``). Its backend follows ``DEQIR_FAST_BACKEND``
(read once; ``backends.scan_backend`` chooses): ``triton`` runs ``triton_scan.py`` (on
CPU only with ``TRITON_INTERPRET=1`` set before triton is imported); everything else,
``auto`` included, runs this file's pure PyTorch, until ``bench/gpu_check.sh`` has timed the
Triton scan on a GPU. There is no native generic scan.
"""
from __future__ import annotations

from typing import Optional

import torch

from .backends import scan_backend     # the choice lives with the others (also ops.scan_backend)

BACKENDS = ("auto", "reference", "torch", "native", "triton")   # accepted settings


def affine_step(P: torch.Tensor, Q: torch.Tensor, e: torch.Tensor, R: Optional[torch.Tensor],
                u: torch.Tensor, increment: bool = False,
                previous: Optional[tuple] = None) -> torch.Tensor:
    """One step of the chain. The serial sampler and the scan both call this, so the
    parallel solve's fixed point is the serial sampler's result bit for bit.
    ``increment``: P holds P - 1 and the step is u + (P u + Q e + R) (``Chain.increment_form``).
    ``previous`` = (C, D, u_prev, e_prev): an order-2 step, C u_prev + D e_prev added to R."""
    if previous is not None:
        C, D, u_prev, e_prev = previous
        T = C * u_prev + D * e_prev
        R = T if R is None else R + T
    out = P * u + Q * e
    out = out if R is None else out + R
    return u + out if increment else out


def affine_scan(P: torch.Tensor, Q: torch.Tensor, E: torch.Tensor, R: Optional[torch.Tensor],
                u0: torch.Tensor, J: Optional[torch.Tensor] = None,
                U: Optional[torch.Tensor] = None, previous: Optional[tuple] = None,
                increment: bool = False) -> torch.Tensor:
    """All states of the (linearised) recurrence from u_0 = ``u0``, on the fastest
    available backend (see ``scan_backend``); arguments as ``affine_scan_reference``.
    The kernels have no backward: when autograd needs the result's graph (phantom
    gradients, an adjoint through the scan), the reference computes it."""
    needs_graph = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (P, Q, E, R, u0, J, U, *(previous or ())))
    if not needs_graph and scan_backend(E) == "triton":
        from .triton_scan import affine_scan_triton
        return affine_scan_triton(P, Q, E, R, u0, J, U, previous, increment=increment)
    return affine_scan_reference(P, Q, E, R, u0, J, U, previous, increment)


def affine_scan_reference(P: torch.Tensor, Q: torch.Tensor, E: torch.Tensor,
                          R: Optional[torch.Tensor], u0: torch.Tensor,
                          J: Optional[torch.Tensor] = None,
                          U: Optional[torch.Tensor] = None,
                          previous: Optional[tuple] = None,
                          increment: bool = False) -> torch.Tensor:
    """All states of u_{i+1} = P_i u_i + Q_i e_i + R_i from u_0 = ``u0``, with the
    linearised model term e_i = E_i + J_i (u_i - U_i).

    P, Q: [S, 1 or B, ...]; E: [S, B, ...]; R: [S, 1 or B, ...] or None; u0: [B, ...];
    J: [S, 1 or B, ...] (any broadcastable shape) or None; U: [S, B, ...], the inputs E
    was evaluated at (needed with J; U[0] is u0's value). Returns [S, B, ...]: state i
    is the output of step i.

    ``previous`` = (C, D, u_prev, e_prev): an order-2 chain (docs/design.md §2.8), whose
    step also adds C_i u_{i-1} + D_i e_{i-1}, the previous step's input and linearised
    model term as the scan runs them (the 2x2 block recurrence on (u_i, u_{i-1}), run
    one step at a time); C, D: [S, 1, ...]; (u_prev, e_prev): the input of the step
    before step 0 and its model term, fixed. The serial sampler's step adds the same
    C u_{i-1} + D e_{i-1} to R, so at the fixed point (e_i = E_i) both do the same
    arithmetic. ``increment``: P holds P - 1 (``affine_step``).
    """
    if (J is None) != (U is None):
        raise ValueError("J and U are given together or not at all")
    out = torch.empty_like(E)
    u = u0
    if previous is not None:
        C, D, u_prev, e_prev = previous
    for i in range(E.shape[0]):
        e = E[i] if J is None else E[i] + J[i] * (u - U[i])
        pair = None if previous is None else (C[i], D[i], u_prev, e_prev)
        u_next = affine_step(P[i], Q[i], e, None if R is None else R[i], u, increment, pair)
        if previous is not None:
            u_prev, e_prev = u, e
        u = out[i] = u_next
    return out


def step_residuals(G: torch.Tensor) -> torch.Tensor:
    """max |G| over everything but the leading step axis: [S, ...] -> [S]."""
    return G.abs().flatten(1).amax(1)
