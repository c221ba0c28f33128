"""Fixed-point solvers for the stacked chain (DESIGN.md §3).

Every solver has one signature, ``solver(system, X, *, tol, max_iter, window, ...)``,
and returns ``(X, SolverStats)``. They share one loop:

1. evaluate F on the active window of steps [lo, hi) (one batched model call);
2. per-step residual max|F(X) - X| in noise units: divided by max(σ_i, floor), σ_i the
   noise std of state i; ``floor`` bounds the scale of the nearly noise-free last states;
3. update the window: Picard takes F(X); Anderson mixes the history; the first active
   step always takes F(X), which is exact because its input is frozen;
4. freeze the leading steps whose inputs have converged, at their F(X) values (at
   least the first, so S rounds always reach the serial answer), and slide the window
   (ParaDiGMS): new steps start from the last computed state. The solve ends when every
   step is frozen.

Convergence is read back once per round (one host sync); on a GPU that is the only one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from .ops import anderson_mix, step_residuals
from .system import raise_nonfinite

SOLVERS = ("picard", "anderson", "triangular_anderson")


@dataclass
class SolverStats:
    iterations: int = 0
    nfe: int = 0                 # step evaluations (each is one model call on B images)
    converged: bool = False
    residuals: List[torch.Tensor] = field(default_factory=list)  # per round: [S], NaN = frozen

    @property
    def residual_trace(self) -> torch.Tensor:
        """[rounds, S] per-step residuals in noise units (NaN where a step was frozen)."""
        if not self.residuals:
            return torch.empty(0)
        return torch.stack(self.residuals)


def fixed_point_solve(system, X: torch.Tensor, *, solver: str = "triangular_anderson",
                      tol: float = 3e-3, floor: float = 0.1, max_iter: Optional[int] = None,
                      window: Optional[int] = None, history: int = 4, lam: float = 1e-4,
                      beta: float = 1.0, callback: Optional[Callable] = None,
                      initial_nfe: int = 0):
    """Solve X = F(X) for a triangular system: a ``ChainSystem`` (the sampler) or an
    ``AdjointSystem`` (its gradient), anything with ``num_steps``,
    ``residual_scale(floor)`` and ``evaluate(X, lo, hi)``. X: [S, B, ...], updated in
    place and returned with the ``SolverStats``."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    S = system.num_steps
    max_iter = S if max_iter is None else max_iter
    w = S if window is None else min(window, S)
    scale = system.residual_scale(floor)                          # [S] float64, host
    stats = SolverStats(nfe=initial_nfe)       # evaluations spent on the initial guess
    lo, hi = 0, w
    X_hist: list = []
    G_hist: list = []
    while stats.iterations < max_iter:
        FX = system.evaluate(X, lo, hi)                            # [hi-lo, B, ...]
        G = FX - X[lo:hi]
        r = step_residuals(G).to("cpu", torch.float64) * scale[lo:hi]   # the round's sync
        bad = ~torch.isfinite(r)
        if bool(bad.any()):
            k = int(bad.nonzero()[0, 0])
            if k == 0:                   # the first active step's input is exact
                raise_nonfinite(lo)
            # Divergence guard: a not-yet-converged iterate grew until the model or the
            # scan overflowed (the iterates of unconverged steps need not stay bounded,
            # e.g. for a denoiser whose eps grows with |x|). Restart those steps from
            # the last finite state and forget the mixing history.
            FX[k:] = FX[k - 1]
            G = FX - X[lo:hi]
            r[k:] = float("inf")
            X_hist, G_hist = [], []
        stats.iterations += 1
        stats.nfe += hi - lo
        row = torch.full((S,), float("nan"), dtype=torch.float64)
        row[lo:hi] = r
        stats.residuals.append(row)

        if solver == "picard":
            new = FX
        else:
            # History entries cover steps lo .. lo+len-1 (older ones are shorter when
            # the window has grown since); missing steps are zero and excluded.
            X_hist = (X_hist + [X[lo:hi].clone()])[-history:]
            G_hist = (G_hist + [G])[-history:]
            valid = torch.stack([torch.arange(hi - lo, device=X.device) < g.shape[0]
                                 for g in G_hist])
            new = anderson_mix(_pad_history(X_hist, hi - lo), _pad_history(G_hist, hi - lo),
                               valid, lam=lam, beta=beta, prefix=solver == "triangular_anderson")
            new[0] = FX[0]
        met = r <= tol
        # Freeze the leading steps at their F(X) values: F(X)[j] is exact when every
        # input before it was (step lo's input is frozen), i.e. when the residuals of
        # steps lo..j-1 meet tol. A step's own small residual proves nothing: an
        # iterate can be consistent with a wrong input. So at least one step freezes
        # per round, and S rounds reach the serial answer.
        n_done = 1
        while n_done < hi - lo and bool(met[n_done - 1]):
            n_done += 1
        X[lo:hi] = new
        X[lo:lo + n_done] = FX[:n_done]
        if callback is not None:
            callback({"iteration": stats.iterations, "window": (lo, hi), "residuals": row,
                      "nfe": stats.nfe})
        if n_done == hi - lo and hi == S:
            stats.converged = True
            break
        new_lo = lo + n_done
        new_hi = min(new_lo + w, S)
        if new_hi > hi:                  # steps entering the window start from the last state
            X[hi:new_hi] = X[hi - 1]
        if solver != "picard":
            X_hist = [x[n_done:] for x in X_hist]
            G_hist = [g[n_done:] for g in G_hist]
        lo, hi = new_lo, new_hi
    return X, stats


def _pad_history(hist, length):
    """Left-align older entries to the current window: entries shorter than the window
    (recorded before new steps entered) get zero rows for the missing steps."""
    out = []
    for h in hist:
        if h.shape[0] < length:
            pad = h.new_zeros((length - h.shape[0], *h.shape[1:]))
            h = torch.cat([h, pad])
        out.append(h)
    return out
