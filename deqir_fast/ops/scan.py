"""The chain's affine update u' = P u + Q ē + R and its scan over the step axis."""
from __future__ import annotations

from typing import Optional

import torch


def affine_step(P: torch.Tensor, Q: torch.Tensor, e: torch.Tensor, R: Optional[torch.Tensor],
                u: torch.Tensor) -> torch.Tensor:
    """One step of the chain. The serial sampler and the scan both call this, so the
    parallel solve's fixed point is the serial sampler's result bit for bit."""
    out = P * u + Q * e
    return out if R is None else out + R


def affine_scan(P: torch.Tensor, Q: torch.Tensor, E: torch.Tensor, R: Optional[torch.Tensor],
                u0: torch.Tensor) -> torch.Tensor:
    """All states of the recurrence u_{i+1} = P_i u_i + Q_i E_i + R_i from u_0 = ``u0``.

    P, Q: [S, 1 or B, ...]; E: [S, B, ...]; R: [S, 1 or B, ...] or None; u0: [B, ...].
    Returns [S, B, ...]: state i is the output of step i.
    """
    out = torch.empty_like(E)
    u = u0
    for i in range(E.shape[0]):
        u = affine_step(P[i], Q[i], E[i], None if R is None else R[i], u)
        out[i] = u
    return out


def step_residuals(G: torch.Tensor) -> torch.Tensor:
    """max |G| over everything but the leading step axis: [S, ...] -> [S]."""
    return G.abs().flatten(1).amax(1)
