"""Fixed-point solvers for the stacked chain (docs/design.md §3).

Every solver shares one loop (``fixed_point_solve``) and differs only in its update rule,
looked up by name in ``SOLVERS`` (add one with ``@register_solver("name")``). A round:

1. U = the inputs of the active window of steps [lo, hi); E = the model term at U (one
   batched model call);
2. the linearisation refits its Jacobian guess J from (U, E) (``linearize.py``);
3. F(X) = the linearised scan from the carry; per-step residual max|F(X) - X| in noise
   units, i.e. divided by max(σ_i, floor), σ_i the noise std of state i (the round's one
   host sync);
4. stop when every active step meets ``tol`` (the window's states become F(X));
   otherwise freeze the leading steps whose inputs have met ``tol * freeze_ratio``, at
   their F(X) values (at least the first, whose input is exact, so S rounds always reach
   the serial answer), update the rest with the solver's rule and slide the window.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from ._checks import raise_nonfinite
from .ops import anderson_mix, step_residuals

# Leading steps freeze once the steps before them meet FREEZE_RATIO * tol. Freezing at
# tol itself locks in errors that the chain then carries to x0: on the bundled model,
# DDIM-100 with the Gaussian J stopped 2.3e-2 off serial (over 2/255) at tol 3e-3.
# (bench/RESULTS.md, "Stopping rule").
FREEZE_RATIO = 0.01

# The linearisation guard: a round whose largest residual exceeds GUARD_GROWTH times the
# previous round's (same steps) switches J off (J = 0) for the rest of the solve. Healthy
# secant runs on the bundled model grow by at most 3x between rounds (bench/RESULTS.md).
GUARD_GROWTH = 10.0

SOLVERS: Dict[str, Callable[..., "Update"]] = {}


def register_solver(name: str):
    """Class decorator: make an update rule available as ``solve(..., solver=name)``."""
    def add(factory):
        SOLVERS[name] = factory
        return factory
    return add


def check_solver(name) -> str:
    if name not in SOLVERS:
        raise ValueError(f"solver must be one of {tuple(SOLVERS)}, got {name!r}")
    return name


class Update:
    """An update rule: ``__call__(X, FX, G)`` gives the window's next iterate from the
    current one X, F(X) and G = F(X) - X (all [W, B, ...]); ``drop(n)`` forgets the first
    n steps (frozen); ``forget()`` clears any history (after a divergence restart)."""

    def __init__(self, **options):
        pass

    def __call__(self, X: torch.Tensor, FX: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def drop(self, n: int) -> None:
        pass

    def forget(self) -> None:
        pass


@register_solver("picard")
class Picard(Update):
    """X <- F(X) (Jacobi; exact after at most S rounds)."""

    def __call__(self, X, FX, G):
        return FX


@register_solver("anderson")
class Anderson(Update):
    """Anderson acceleration with one set of weights per (step, batch item): history
    ``history``, regularisation ``anderson_reg`` (relative to the largest residual
    norm), damping ``anderson_damping`` (Walker & Ni 2011; DeqIR, DEQ-DDIM)."""

    prefix = False

    def __init__(self, history: int = 4, anderson_reg: float = 1e-4,
                 anderson_damping: float = 1.0, **options):
        self.history, self.reg, self.damping = history, anderson_reg, anderson_damping
        self.X_hist: List[torch.Tensor] = []
        self.G_hist: List[torch.Tensor] = []

    def __call__(self, X, FX, G):
        W = X.shape[0]
        self.X_hist = (self.X_hist + [X.clone()])[-self.history:]
        self.G_hist = (self.G_hist + [G])[-self.history:]
        # Entries recorded before new steps entered the window are shorter: their
        # missing steps are zero and excluded.
        valid = torch.stack([torch.arange(W, device=X.device) < g.shape[0] for g in self.G_hist])
        new = anderson_mix(_pad_history(self.X_hist, W), _pad_history(self.G_hist, W), valid,
                           reg=self.reg, damping=self.damping, prefix=self.prefix)
        new[0] = FX[0]                  # the first active step's input is exact
        return new

    def drop(self, n):
        self.X_hist = [x[n:] for x in self.X_hist]
        self.G_hist = [g[n:] for g in self.G_hist]

    def forget(self):
        self.X_hist, self.G_hist = [], []


@register_solver("triangular_anderson")
class TriangularAnderson(Anderson):
    """Anderson whose Gram matrix at step s sums those of steps lo..s (ParaTAA, Tang et
    al. 2024): a step's weights also see the residuals of the steps that feed it."""

    prefix = True


@dataclass
class SolverStats:
    iterations: int = 0
    nfe: int = 0                 # step evaluations (each is one model call on B images)
    converged: bool = False
    residuals: List[torch.Tensor] = field(default_factory=list)  # per round: [S], NaN = frozen
    guard_fallback: bool = False  # the linearisation guard switched J off
    linearization: object = field(default=None, repr=False)   # its final J (for the adjoint)

    @property
    def residual_trace(self) -> torch.Tensor:
        """[rounds, S] per-step residuals in noise units (NaN where a step was frozen)."""
        if not self.residuals:
            return torch.empty(0)
        return torch.stack(self.residuals)


def fixed_point_solve(system, X: torch.Tensor, *, solver: str = "picard",
                      linearize: str = "secant", tol: float = 3e-3, floor: float = 0.1,
                      max_iter: Optional[int] = None, window: Optional[int] = None,
                      freeze_ratio: float = FREEZE_RATIO, callback: Optional[Callable] = None,
                      initial_nfe: int = 0, **options):
    """Solve X = F(X) for a triangular system: a ``ChainSystem`` (the sampler) or an
    ``AdjointSystem`` (its gradient), anything with ``num_steps``, ``residual_scale``,
    ``inputs``, ``model_term``, ``scan`` and ``linearization``. X: [S, B, ...], updated
    in place and returned with the ``SolverStats``. ``options`` go to the update rule
    (``history``, ``anderson_reg``, ``anderson_damping``)."""
    update = SOLVERS[check_solver(solver)](**options)
    lin = system.linearization(linearize)
    S = system.num_steps
    max_iter = S if max_iter is None else max_iter
    w = S if window is None else min(window, S)
    scale = system.residual_scale(floor)                          # [S] float64, host
    stats = SolverStats(nfe=initial_nfe, linearization=lin)   # nfe: the initial guess's
    lo, hi = 0, w
    prev_r: Optional[torch.Tensor] = None                         # last round's, by step
    while stats.iterations < max_iter:
        U = system.inputs(X, lo, hi)
        E = system.model_term(U, lo)
        lin.observe(lo, hi, U, E)
        FX = system.scan(E, U, lo, hi, lin.jacobian(lo, hi))       # [hi-lo, B, ...]
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
            # the last finite state, forget the mixing history and switch J off.
            FX[k:] = FX[k - 1]
            G = FX - X[lo:hi]
            r[k:] = float("inf")
            update.forget()
            if lin.active:
                lin.disable()
                stats.guard_fallback = True
        elif lin.active and prev_r is not None:
            seen = prev_r[lo:hi]
            both = torch.isfinite(seen)
            if bool(both.any()) and float(r[both].max()) > GUARD_GROWTH * float(seen[both].max()):
                lin.disable()
                stats.guard_fallback = True
        stats.iterations += 1
        stats.nfe += hi - lo
        row = torch.full((S,), float("nan"), dtype=torch.float64)
        row[lo:hi] = r
        stats.residuals.append(row)
        prev_r = row

        if bool((r <= tol).all()):
            # Every active step meets tol: the window is accepted at F(X).
            n_done = hi - lo
        else:
            # Freeze the leading steps at their F(X) values: F(X)[j] is exact when every
            # input before it was (step lo's input is frozen), i.e. within
            # tol * freeze_ratio once the residuals of steps lo..j-1 are. A step's own
            # small residual proves nothing: an iterate can be consistent with a wrong
            # input. At least one step freezes per round.
            met = r <= tol * freeze_ratio
            n_done = 1
            while n_done < hi - lo and bool(met[n_done - 1]):
                n_done += 1
        X[lo:hi] = update(X[lo:hi], FX, G) if n_done < hi - lo else FX
        X[lo:lo + n_done] = FX[:n_done]
        if callback is not None:
            callback({"iteration": stats.iterations, "window": (lo, hi), "residuals": row,
                      "nfe": stats.nfe, "state": X})
        if n_done == hi - lo and hi == S:
            stats.converged = True
            break
        new_lo = lo + n_done
        new_hi = min(new_lo + w, S)
        if new_hi > hi:                  # steps entering the window start from the last state
            X[hi:new_hi] = X[hi - 1]
        update.drop(n_done)
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
