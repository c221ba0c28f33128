"""The Jacobian guess of the linearised scan (docs/design.md §3a).

A solver round evaluates ē at the current inputs U and rebuilds every state with the
scan u_{i+1} = P_i u_i + Q_i (E_i + J_i (u_i - U_i)) + R_i. The true Jacobian of step i
is P_i + Q_i ∂ē/∂u; J = 0 lags ē whole (DeqIR, DEQ-DDIM), so where Q is O(1) (DDPM,
DDRM/DDNM with eta, DDNM's range space where P = 0) an error moves one step per round.
A diagonal J close to ∂ē/∂u lets a round carry the error's first-order effect down the
whole chain. Any J keeps the fixed point, so the serial answer is unchanged.

Kinds (``solve(..., linearize=...)``):

- ``"secant"`` (default): start from the Gaussian guess, then after every round fit one
  slope per (step, batch item, coefficient class) by least squares on the last two
  rounds, Σ ΔE·ΔU / Σ ΔU², clamped to [0, 1/sqrt(1-ᾱ)];
- ``"gaussian"``: J_i = sqrt(1-ᾱ_i) / (ᾱ_i v + 1 - ᾱ_i), ∂ε/∂x for a N(0, v) prior;
- ``"paradigms"``: J = (1 - P)/Q, i.e. P + QJ = 1: ParaDiGMS' state-reusing update
  x_{i+1} = x_i + (P - 1) x_i^k + Q ε_i^k + R (0 where Q = 0);
- ``"none"``: J = 0.
"""
from __future__ import annotations

from typing import Optional

import torch

from .ops import CHUNK_ELEMENTS

LINEARIZATIONS = ("secant", "gaussian", "paradigms", "none")

# v of the Gaussian starting guess: 0.3 is the digits' pixel variance on the [-1, 1]
# scale. On the bundled model (DDIM/DDPM/DDRM/DDNM-100) v = 0.1, 0.3 and 1 started the
# secant equally well (rounds to 2/255 within one of each other), measured in an early
# probe of issue #8 whose script was not kept (design.md §3a's table starts from v = 0.3).
PRIOR_VARIANCE = 0.3

# A secant slope needs the inputs to have moved by more than rounding: ΔU² summed over a
# class must exceed (this × the state's norm)², else the previous slope is kept.
_MIN_RELATIVE_MOVE = 1e-6


def check_linearize(kind) -> str:
    if kind not in LINEARIZATIONS:
        raise ValueError(f"linearize must be one of {LINEARIZATIONS}, got {kind!r}")
    return kind


def gaussian_slopes(alpha: torch.Tensor, variance: float = PRIOR_VARIANCE) -> torch.Tensor:
    """∂ε/∂x = sqrt(1-ᾱ)/(ᾱ v + 1 - ᾱ) for data ~ N(μ, v I), per step: [S]."""
    return (1 - alpha).sqrt() / (alpha * variance + 1 - alpha)


class Linearization:
    """J for the steps of a window, and its secant update after each model call.

    ``slopes`` [S, B, K] holds one slope per (step, batch item, class) of
    ``chain.jacobian_classes``; ``jacobian(lo, hi)`` expands them to the elements."""

    def __init__(self, chain, coeffs, kind: str = "secant"):
        self.kind = check_linearize(kind)
        self.chain = chain
        self.like = coeffs.u0
        S, B = chain.num_steps, coeffs.u0.shape[0]
        self.num_classes = chain.num_jacobian_classes
        alpha = chain.alpha.to(self.like)
        # ∂ε/∂x of a denoiser lies in [0, 1/sqrt(1-ᾱ)] wherever the posterior is no wider
        # than the noise (Tweedie); the clamp also keeps P + QJ between P and the chain's
        # most contracting slope, so no J can make the scan blow up.
        self.cap = (1 - alpha).rsqrt().view(S, 1, 1)
        self.slopes: Optional[torch.Tensor] = None
        self.fixed: Optional[torch.Tensor] = None
        if kind in ("secant", "gaussian"):
            self.slopes = gaussian_slopes(alpha).view(S, 1, 1).expand(S, B, self.num_classes).clone()
        elif kind == "paradigms":
            P, Q = coeffs.P, coeffs.Q
            ok = Q != 0
            self.fixed = torch.where(ok, (1 - P) / torch.where(ok, Q, torch.ones_like(Q)),
                                     torch.zeros_like(Q))
        self.active = kind != "none"
        self._prev_U: Optional[torch.Tensor] = None
        self._prev_E: Optional[torch.Tensor] = None
        self._seen: Optional[torch.Tensor] = None

    def disable(self) -> None:
        """The guard's fallback: J = 0 from now on."""
        self.active = False

    def forget_rounds(self) -> None:
        """Drop the secant's round history (keep the slopes): the next refit of a step
        waits for two new rounds. A solve restarted after the serial shadow's step does
        this (its steps may change ranks in a sharded solve)."""
        if self._seen is not None:
            self._seen.zero_()

    def reserve_history(self, like: torch.Tensor) -> None:
        """Allocate the secant's round history ([S, *like.shape]) now, as ``observe``
        would: a rank of a sharded solve may receive steps' history before its own first
        model call."""
        if self.kind == "secant" and self._prev_U is None:
            S = self.chain.num_steps
            self._prev_U = like.new_zeros((S, *like.shape))
            self._prev_E = like.new_zeros((S, *like.shape))
            self._seen = torch.zeros(S, dtype=torch.bool, device=like.device)

    def moves_with_steps(self) -> bool:
        """Whether steps carry secant state when they change ranks (a learning secant)."""
        return self.kind == "secant" and self.active and self._prev_U is not None

    def export_steps(self, s0: int, s1: int, dtype: torch.dtype):
        """The secant state of steps s0..s1-1 (round history and slopes) as tensors of
        ``dtype``, for a step moving to another rank; [] when nothing moves."""
        if not self.moves_with_steps():
            return []
        return [self._prev_U[s0:s1], self._prev_E[s0:s1], self.slopes[s0:s1],
                self._seen[s0:s1].to(dtype)]

    def import_steps(self, s0: int, s1: int, tensors) -> None:
        """``export_steps``'s tensors into steps s0..s1-1."""
        if not tensors:
            return
        self._prev_U[s0:s1] = tensors[0]
        self._prev_E[s0:s1] = tensors[1]
        self.slopes[s0:s1] = tensors[2]
        self._seen[s0:s1] = tensors[3] != 0

    def jacobian(self, lo: int, hi: int) -> Optional[torch.Tensor]:
        """J for steps lo..hi-1, broadcastable to the window [hi-lo, B, ...], or None."""
        if not self.active:
            return None
        if self.fixed is not None:
            return self.fixed[lo:hi]
        slopes = self.slopes[lo:hi]                                # [W, B, K]
        pad = (1,) * (self.like.dim() - 1)
        if self.num_classes == 1:
            return slopes.view(*slopes.shape[:2], *pad)
        ids = self.chain.jacobian_classes(lo, hi, self.like)
        J = None
        for k in range(self.num_classes):
            slope = slopes[..., k].reshape(*slopes.shape[:2], *pad)
            J = slope * (ids == k) if J is None else torch.where(ids == k, slope, J)
        return J

    def slope_table(self, lo: int, hi: int) -> Optional[torch.Tensor]:
        """J of steps lo..hi-1 as the fused round reads it: one slope per (step, batch
        item, class), [hi-lo, B, K] (a view), the class of each element being computed
        in-kernel with the rules of ``chain.jacobian_classes``; None when J is off.
        ``"paradigms"`` has no such table (its J varies per element): ValueError."""
        if not self.active:
            return None
        if self.fixed is not None:
            raise ValueError("the 'paradigms' Jacobian is per element, not a slope table")
        return self.slopes[lo:hi]

    def observe(self, lo: int, hi: int, U: torch.Tensor, E: torch.Tensor) -> None:
        """Record the round's inputs U and ē(U) [hi-lo, B, ...]; with ``"secant"``, refit
        the slopes of the steps whose inputs moved since their last evaluation. No host
        synchronisation (the refit is masked by which steps were seen, not skipped), so
        a round that calls it can be captured in a CUDA graph."""
        if self.kind != "secant" or not self.active:
            return
        if self._prev_U is None:
            S = self.chain.num_steps
            self._prev_U = U.new_zeros((S, *U.shape[1:]))
            self._prev_E = E.new_zeros((S, *E.shape[1:]))
            self._seen = torch.zeros(S, dtype=torch.bool, device=U.device)
        self._refit(lo, hi, U, E)
        self._record(lo, hi, U, E)

    def _refit(self, lo: int, hi: int, U: torch.Tensor, E: torch.Tensor) -> None:
        """The secant slope per (step, batch item, class) from the last two rounds,
        clamped to [0, cap]; kept where the state barely moved or was never seen."""
        num = torch.empty_like(self.slopes[lo:hi])          # [W, B, K]
        den = torch.empty_like(num)
        norm2 = torch.empty_like(num[..., :1])
        # in chunks of steps: the differences and products are temporaries of a few MB,
        # not of the window (2 stacked states less at the peak; bench/round.py --memory)
        per = max(1, CHUNK_ELEMENTS // max(1, U[0].numel()))
        for c in range(0, hi - lo, per):
            e = min(c + per, hi - lo)
            dU = U[c:e] - self._prev_U[lo + c:lo + e]
            dE = E[c:e] - self._prev_E[lo + c:lo + e]
            num[c:e] = self._class_sums(dU * dE, lo + c, lo + e)
            den[c:e] = self._class_sums(dU.square_(), lo + c, lo + e)
            norm2[c:e] = U[c:e].flatten(2).pow(2).sum(-1, keepdim=True)
        scale = norm2 * _MIN_RELATIVE_MOVE ** 2
        moved = (den > scale) & self._seen[lo:hi].view(-1, 1, 1)
        slope = torch.minimum((num / torch.where(moved, den, torch.ones_like(den))).clamp_min(0),
                              self.cap[lo:hi])
        self.slopes[lo:hi] = torch.where(moved, slope, self.slopes[lo:hi])

    def _record(self, lo: int, hi: int, U: torch.Tensor, E: torch.Tensor) -> None:
        self._prev_U[lo:hi] = U
        self._prev_E[lo:hi] = E
        self._seen[lo:hi] = True

    def _class_sums(self, values: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Σ over the elements of each class: [W, B, ...] -> [W, B, K]."""
        if self.num_classes == 1:
            return values.flatten(2).sum(-1, keepdim=True)
        ids = self.chain.jacobian_classes(lo, hi, self.like)
        return torch.stack([torch.where(ids == k, values, torch.zeros_like(values)).flatten(2).sum(-1)
                            for k in range(self.num_classes)], -1)
