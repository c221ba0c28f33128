"""The chain's affine update u' = P u + Q ē + R and its scan over the step axis.

``affine_scan`` dispatches on ``DEQIR_FAST_BACKEND``: ``reference`` (this file's pure
PyTorch) or ``triton`` (``triton_scan.py``; on CPU it needs ``TRITON_INTERPRET=1`` set
before triton is imported). ``auto`` (the default) is the reference for now: the kernel
matches it exactly in Triton's interpreter but has not yet run on a GPU; flip ``auto`` to
the kernel on CUDA once ``bench/gpu_check.sh`` has validated and timed it there.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

BACKENDS = ("auto", "reference", "triton")


def affine_step(P: torch.Tensor, Q: torch.Tensor, e: torch.Tensor, R: Optional[torch.Tensor],
                u: torch.Tensor) -> torch.Tensor:
    """One step of the chain. The serial sampler and the scan both call this, so the
    parallel solve's fixed point is the serial sampler's result bit for bit."""
    out = P * u + Q * e
    return out if R is None else out + R


def scan_backend(E: torch.Tensor) -> str:
    """The backend ``affine_scan`` uses for E (see the module docstring). The kernel
    indexes with 32-bit offsets, so chains of 2^31 or more values use the reference."""
    forced = os.environ.get("DEQIR_FAST_BACKEND", "auto")
    if forced not in BACKENDS:
        raise ValueError(f"DEQIR_FAST_BACKEND must be one of {BACKENDS}, got {forced!r}")
    if forced == "triton" and E.numel() < 2 ** 31:
        return "triton"
    return "reference"


def affine_scan(P: torch.Tensor, Q: torch.Tensor, E: torch.Tensor, R: Optional[torch.Tensor],
                u0: torch.Tensor) -> torch.Tensor:
    """All states of the recurrence u_{i+1} = P_i u_i + Q_i E_i + R_i from u_0 = ``u0``,
    on the fastest available backend (see ``scan_backend``)."""
    if scan_backend(E) == "triton":
        from .triton_scan import affine_scan_triton
        return affine_scan_triton(P, Q, E, R, u0)
    return affine_scan_reference(P, Q, E, R, u0)


def affine_scan_reference(P: torch.Tensor, Q: torch.Tensor, E: torch.Tensor,
                          R: Optional[torch.Tensor], u0: torch.Tensor) -> torch.Tensor:
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
