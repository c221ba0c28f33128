"""Anderson mixing over the stacked chain, with one set of weights per (step, batch item).

For history entries j = 1..m with iterates X_j and residuals G_j = F(X_j) - X_j, the
weights α minimise ||Σ_j α_j G_j||² subject to Σ_j α_j = 1 (Walker & Ni 2011):
α = H⁻¹1 / 1ᵀH⁻¹1 with H the regularised Gram matrix, and the new iterate is
Σ_j α_j (X_j + d G_j) (d the damping). With ``prefix=True`` the Gram matrix of step s sums those of
steps lo..s (the triangular variant: a step's weights also see the residuals of the
steps that feed it).
"""
from __future__ import annotations

from typing import Sequence

import torch


def anderson_mix(X_hist: Sequence[torch.Tensor], G_hist: Sequence[torch.Tensor],
                 valid: torch.Tensor, *, reg: float = 1e-4, damping: float = 1.0,
                 prefix: bool = False) -> torch.Tensor:
    """Mix the history (oldest first; the last entry is the newest).

    X_hist[j], G_hist[j]: [W, B, ...] over the active window; ``valid``: [m, W] bool,
    False where entry j had not evaluated step s (its weight is forced to 0). The
    Gram matrices and solves run in float64. A non-finite or failed solve falls back
    to the newest entry with plain damping (a Picard step) for that (step, item).
    """
    m = len(G_hist)
    G = torch.stack([g.flatten(2) for g in G_hist])              # [m, W, B, n]
    if m == 1:
        return X_hist[0] + damping * G_hist[0]
    G64 = G.to(torch.float64)
    H = torch.einsum("jwbn,kwbn->wbjk", G64, G64)              # [W, B, m, m]
    if prefix:
        H = H.cumsum(0)
    v = valid.to(torch.float64).transpose(0, 1)[:, None, :]    # [W, 1, m]
    H = H * v[..., :, None] * v[..., None, :]
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    scale = diag.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    # Regularise relative to the largest residual norm, and pin excluded entries
    # with a huge diagonal so their weights vanish.
    H = H + torch.diag_embed(reg * scale + (1.0 - v) * 1e12 * scale)
    ones = torch.ones(H.shape[:-1] + (1,), dtype=H.dtype, device=H.device)
    sol, info = torch.linalg.solve_ex(H, ones)
    alpha = sol.squeeze(-1)
    alpha = alpha / alpha.sum(-1, keepdim=True)
    ok = (info == 0)[..., None] & torch.isfinite(alpha).all(-1, keepdim=True)
    newest = torch.zeros_like(alpha)
    newest[..., -1] = 1.0
    alpha = torch.where(ok, alpha, newest).to(G.dtype)         # [W, B, m]
    Xs = torch.stack([x.flatten(2) for x in X_hist])           # [m, W, B, n]
    mixed = torch.einsum("wbj,jwbn->wbn", alpha, Xs + damping * G)
    return mixed.view_as(X_hist[-1])
