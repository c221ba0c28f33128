"""The whole sampling chain as one fixed-point system X = F(X) (docs/design.md §2.7).

X stacks the states after each step, [S, B, C, H, W], in the chain's basis. A round
takes the inputs U of a window of steps (the carry and the states before each step),
runs the denoiser on all of them in one batched call (``model_term``), then rebuilds the
states with the (linearised) affine scan (``scan``). F is triangular: output i depends
only on states before i.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ._checks import raise_nonfinite
from .chains import Chain, StepCoefficients
from .linearize import Linearization
from .ops import affine_scan, affine_step

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def call_model(model: Model, x: torch.Tensor, t: torch.Tensor, first_step: int,
               batch: int, check_finite: bool = True) -> torch.Tensor:
    """eps = model(x, t), checked: same shape as x and (with ``check_finite``) finite,
    naming the failing step. The parallel solver checks finiteness itself, through
    the residuals it reads back anyway."""
    e = model(x, t)
    if hasattr(e, "sample") and not isinstance(e, torch.Tensor):   # diffusers output
        e = e.sample
    if not isinstance(e, torch.Tensor):
        raise TypeError(f"model must return a tensor, got {type(e).__name__}")
    if e.shape != x.shape:
        raise ValueError(f"model output has shape {tuple(e.shape)} at step {first_step}, "
                         f"expected {tuple(x.shape)} (the input's shape)")
    if check_finite:
        finite = torch.isfinite(e).flatten(1).all(1)
        if not bool(finite.all()):
            raise_nonfinite(int((~finite).nonzero()[0, 0]) // batch + first_step)
    return e.to(x.dtype)


class ChainSystem:
    """F restricted to a window of steps, plus what the solvers need to know."""

    def __init__(self, model: Model, chain: Chain, coeffs: StepCoefficients):
        self.model = model
        self.chain = chain
        self.coeffs = coeffs
        self.batch = coeffs.u0.shape[0]
        self.timesteps = chain.timesteps.to(coeffs.u0.device)

    @property
    def num_steps(self) -> int:
        return self.chain.num_steps

    def residual_scale(self, floor: float) -> torch.Tensor:
        """[S] float64: residuals are measured in units of max(σ_i, floor)."""
        return 1.0 / self.chain.noise_levels.clamp_min(floor)

    def carry(self, X: torch.Tensor, lo: int) -> torch.Tensor:
        """The state entering step ``lo``."""
        return self.coeffs.u0 if lo == 0 else X[lo - 1]

    def eps_bar(self, U: torch.Tensor, lo: int, check_finite: bool = True) -> torch.Tensor:
        """ē for the states U = [W, B, ...] entering steps lo .. lo+W-1 (one model call)."""
        W, B = U.shape[:2]
        x = self.chain.from_basis(U.reshape(W * B, *U.shape[2:]))
        t = self.timesteps[lo:lo + W].repeat_interleave(B)
        e = call_model(self.model, x, t, lo, B, check_finite)
        return self.chain.to_basis(e).view_as(U)

    def inputs(self, X: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """U [hi-lo, B, ...]: the state entering each of steps lo..hi-1."""
        carry = self.carry(X, lo).unsqueeze(0)
        return torch.cat([carry, X[lo:hi - 1]]) if hi - lo > 1 else carry

    def model_term(self, U: torch.Tensor, lo: int) -> torch.Tensor:
        """ē(U): the one batched model call of a round (finiteness is checked by the
        solver through the residuals it reads back anyway)."""
        return self.eps_bar(U, lo, check_finite=False)

    def scan(self, E: torch.Tensor, U: torch.Tensor, lo: int, hi: int,
             J: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The states after steps lo..hi-1 from the carry U[0], with ē lagged at U and
        (with J) linearised around it."""
        c = self.coeffs
        R = None if c.R is None else c.R[lo:hi]
        return affine_scan(c.P[lo:hi], c.Q[lo:hi], E, R, U[0], J, None if J is None else U)

    def evaluate(self, X: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """F(X)[lo:hi] with ē lagged whole (J = 0): the plain fixed-point map."""
        U = self.inputs(X, lo, hi)
        return self.scan(self.model_term(U, lo), U, lo, hi)

    def linearization(self, kind: str) -> Linearization:
        return Linearization(self.chain, self.coeffs, kind)

    def jump_init(self) -> torch.Tensor:
        """Every state set to the one-step DDIM jump from the initial state to its noise
        level: x_i = sqrt(a'_i) x̂0 + sqrt(1 - a'_i) ε̂ with (x̂0, ε̂) the model's
        prediction at step 0 (one model call on B images)."""
        c, chain = self.coeffs, self.chain
        e = self.eps_bar(c.u0.unsqueeze(0), 0)[0]
        a0 = chain.alpha[0].item()
        x0 = (c.u0 - (1 - a0) ** 0.5 * e) / a0 ** 0.5
        an = chain.alpha_next.to(c.u0).view(-1, *([1] * c.u0.dim()))
        return an.sqrt() * x0 + (1 - an).sqrt() * e

    def serial(self, callback: Optional[Callable] = None) -> torch.Tensor:
        """The reference serial sampler: S model calls, one step at a time."""
        c = self.coeffs
        u = c.u0
        states = torch.empty((self.num_steps, *u.shape), dtype=u.dtype, device=u.device)
        for i in range(self.num_steps):
            e = self.eps_bar(u.unsqueeze(0), i)[0]
            u = affine_step(c.P[i], c.Q[i], e, None if c.R is None else c.R[i], u)
            states[i] = u
            if callback is not None:
                callback({"step": i, "t": int(self.chain.timesteps[i]), "num_steps": self.num_steps})
        return states
