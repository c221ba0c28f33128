"""Test helpers that need no network: the exact denoiser of a Gaussian-mixture prior."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .schedules import Schedule


class GaussianMixtureDenoiser(torch.nn.Module):
    """The exact eps-prediction for data x0 ~ Σ_k π_k N(μ_k, s² I) (equal weights).

    At timestep t, x_t = sqrt(a) x0 + sqrt(1-a) ε is a mixture of N(sqrt(a) μ_k, v I)
    with v = a s² + 1 - a, so E[ε | x_t] = sqrt(1-a) Σ_k w_k(x_t) (x_t - sqrt(a) μ_k) / v
    with w = softmax_k(-||x_t - sqrt(a) μ_k||² / 2v). Differentiable in x_t and in the
    means (``means`` is a parameter).
    """

    def __init__(self, schedule: Schedule, shape: Sequence[int], components: int = 4,
                 std: float = 0.2, seed: int = 0, means: Optional[torch.Tensor] = None,
                 dtype: torch.dtype = torch.float64):
        super().__init__()
        if means is None:
            gen = torch.Generator().manual_seed(seed)
            # Smooth-ish random images in [-1, 1]: low-resolution noise, upsampled.
            C, H, W = shape
            low = torch.rand((components, C, max(H // 4, 1), max(W // 4, 1)), generator=gen,
                             dtype=torch.float64) * 2 - 1
            means = torch.nn.functional.interpolate(low, size=(H, W), mode="bilinear",
                                                    align_corners=False)
        self.means = torch.nn.Parameter(means.to(dtype))
        self.std = float(std)
        self.register_buffer("alphas_cumprod", schedule.alphas_cumprod.to(dtype))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod.to(x)[t.long()].view(-1, 1, 1, 1)
        v = a * self.std ** 2 + 1 - a
        mu = self.means.to(x)
        diff = x.unsqueeze(1) - a.sqrt().unsqueeze(1) * mu.unsqueeze(0)   # [N, K, C, H, W]
        logits = -(diff ** 2).flatten(2).sum(-1) / (2 * v.view(-1, 1))
        w = torch.softmax(logits, dim=1).view(*logits.shape, 1, 1, 1)
        return (1 - a).sqrt() * (w * diff).sum(1) / v


def readme_problem(kind: str, seed: int, eta: Optional[float] = None):
    """The README's example (GMM prior, 3x32x32, DDRM-100 inpainting) with its random
    draws from ``torch.manual_seed(seed)``, and its DDNM and DDIM (eta 0.5) variants
    (``kind`` "DDRM", "DDNM" or "DDIM"): (model, chain, x_T). ``eta`` replaces the
    chain's eta (DDRM 0.85, DDNM 0.85, DDIM 0.5); with 0, DDNM's chain amplifies float32
    rounding past a grey level (docs/design.md §3d). The stopping rule's calibration
    sweep and its CI subset run these."""
    from . import operators as ops
    from .chains import DDIM, DDNM, DDRM
    from .schedules import timesteps
    torch.manual_seed(seed)
    sched = Schedule.linear(1000, beta_start=1e-4, beta_end=0.02)
    ts = timesteps(sched, 100)
    model = GaussianMixtureDenoiser(sched, (3, 32, 32), dtype=torch.float32)
    op = ops.Inpainting((torch.rand(32, 32) > 0.5).float())
    y = op.A(torch.rand(1, 3, 32, 32) * 2 - 1)
    if kind == "DDRM":
        chain = DDRM(sched, ts, operator=op, y=y, sigma_y=0.0, eta=0.85 if eta is None else eta,
                     eta_b=1.0)
    elif kind == "DDNM":
        chain = DDNM(sched, ts, operator=op, y=y, sigma_y=0.0, eta=0.85 if eta is None else eta)
    else:
        chain = DDIM(sched, ts, eta=0.5 if eta is None else eta)
    return model, chain, torch.randn(1, 3, 32, 32)
