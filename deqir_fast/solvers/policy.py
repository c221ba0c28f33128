"""The policy of the solver loop that every engine shares: the freeze and stop rule (one
definition, evaluated on the host or on the device), the linearisation guard, the round
records and statistics, and the serial shadow (docs/design.md §3, §3d)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from .options import FREEZE_RATIO

__all__ = ["FREEZE_RATIO", "GUARD_GROWTH", "SolverStats", "freeze_count", "freeze_levels",
           "steps_to_freeze",
           "guard_tripped", "switch_off_jacobian", "record_round", "enter_steps",
           "SerialShadow", "begin_exact_restart", "note_deviation", "shadow_applies"]

# The linearisation guard: a round whose largest residual exceeds GUARD_GROWTH times the
# previous round's (same steps) switches J off (J = 0) for the rest of the solve. Healthy
# secant runs on the bundled model grow by at most 3x between rounds (bench/RESULTS.md).
GUARD_GROWTH = 10.0


@dataclass
class SolverStats:
    iterations: int = 0
    nfe: int = 0                 # step evaluations (each is one model call on B images)
    converged: bool = False
    residuals: List[torch.Tensor] = field(default_factory=list)  # per round: [S], NaN = frozen
    guard_fallback: bool = False  # the linearisation guard switched J off
    linearization: object = field(default=None, repr=False)   # its final J (for the adjoint)
    graph_rounds: int = 0         # rounds replayed from a CUDA graph (cuda_graph=True)
    graph_error: Optional[str] = None   # why capture failed, when it did
    # the step whose frozen state the serial shadow found off the serial sampler's by more
    # than tol (docs/design.md §3d); the solve then went on freezing exact states only
    serial_mismatch: Optional[int] = None
    # the largest deviation of a frozen state from the shadow's serial one (noise units);
    # NaN when the shadow compared nothing
    shadow_deviation: float = float("nan")
    # the steps whose frozen state the shadow compared, in order: step p is reached in
    # round p + 1 and compared when it was frozen before that round
    shadow_checked: List[int] = field(default_factory=list)
    sharding: Optional[object] = None   # a sharded solve's per-rank ShardStats
    plan: Optional[object] = None       # window="auto": the planner's PlanStats

    @property
    def residual_trace(self) -> torch.Tensor:
        """[rounds, S] per-step residuals in noise units (NaN where a step was frozen)."""
        if not self.residuals:
            return torch.empty(0)
        return torch.stack(self.residuals)


def guard_tripped(r: torch.Tensor, prev_row: Optional[torch.Tensor], lo: int, hi: int) -> bool:
    """The linearisation guard: this round's largest residual grew more than GUARD_GROWTH
    times over last round's, on the steps both rounds measured."""
    if prev_row is None:
        return False
    seen = prev_row[lo:hi]
    both = torch.isfinite(seen) & torch.isfinite(r)       # NaN: frozen (check_every rows)
    return bool(both.any()) and float(r[both].max()) > GUARD_GROWTH * float(seen[both].max())


def switch_off_jacobian(lin, stats: "SolverStats") -> None:
    """The guard's fallback: J = 0 (the plain map) for the rest of the solve."""
    if lin.active:
        lin.disable()
        stats.guard_fallback = True


def record_round(stats: "SolverStats", r: torch.Tensor, lo: int, hi: int, S: int) -> torch.Tensor:
    """Count the round in ``stats`` and append its residual row ([S], NaN outside the
    window); returns the row."""
    stats.iterations += 1
    stats.nfe += hi - lo
    row = torch.full((S,), float("nan"), dtype=torch.float64)
    row[lo:hi] = r
    stats.residuals.append(row)
    return row


def freeze_count(r: torch.Tensor, frozen: torch.Tensor, thr: float, accept: float) -> torch.Tensor:
    """How many leading steps of the window are frozen after a round with residuals r
    ([W]), ``frozen`` of them being frozen before it (an int64 tensor): W when every
    step meets ``accept``, else the leading steps whose inputs are exact, at least one
    more than before. Tensor ops only, so the device-side rounds of ``check_every`` run
    it without a host sync; ``steps_to_freeze`` is the host's call of the same rule."""
    W = r.shape[0]
    pos = torch.arange(W, device=r.device)
    met = (r <= thr) | (pos < frozen)
    lead = torch.cumprod(met[:-1].to(torch.int64), 0).sum() if W > 1 else frozen * 0
    return torch.where((r <= accept).all(), torch.full_like(frozen, W),
                       torch.clamp(torch.maximum(1 + lead, frozen + 1), max=W))


def freeze_levels(tol: float, freeze_ratio: float, last: bool):
    """(thr, accept) of ``freeze_count``: a step freezes once the steps before it meet
    thr = tol * freeze_ratio; the whole window is accepted at tol when it ends the chain
    (``last``: the stopping rule), else only at thr."""
    thr = tol * freeze_ratio
    return thr, (tol if last else thr)


def steps_to_freeze(r: torch.Tensor, tol: float, freeze_ratio: float, last: bool = True) -> int:
    """How many leading steps of the window freeze at F(X) after a round with residuals r
    (on the host).

    All of them when every step meets tol and the window ends the chain (``last``: the
    stopping rule), or every step meets tol * freeze_ratio (a window with steps after it:
    accepting it at tol would freeze tol-sized errors that the steps after it amplify,
    1.2e-2 off serial on DDIM-100 with a window of 20 and the extended start, RESULTS
    §8 "Sliding windows"). Else the leading steps whose inputs are exact: F(X)[j] is
    exact when every input before it was (the window's first input is frozen), i.e.
    within tol * freeze_ratio once the residuals of the steps before j are. A step's own
    small residual proves nothing: an iterate can be consistent with a wrong input. At
    least one step freezes per round."""
    thr, accept = freeze_levels(tol, freeze_ratio, last)
    return int(freeze_count(r, torch.zeros((), dtype=torch.int64, device=r.device), thr, accept))


def enter_steps(system, X: torch.Tensor, e_last: Optional[torch.Tensor], hi: int, new_hi: int) -> None:
    """Start values of the steps hi..new_hi-1 entering a sliding window: the system's
    ``extend`` (the scan with the window's last model output held, docs/design.md §3c)
    where it gives one, else a copy of the last state (ParaDiGMS' start)."""
    extend = getattr(system, "extend", None)
    start = None if (extend is None or e_last is None) else extend(X, e_last, hi, new_hi)
    # a non-finite last model output (a round the divergence guard restarts) falls back to
    # the copy elementwise, on the device (no host sync)
    X[hi:new_hi] = X[hi - 1] if start is None else torch.where(torch.isfinite(start), start, X[hi - 1])


class SerialShadow:
    """The serial sampler run alongside a solve, one step per round, in the round's own
    model call (docs/design.md §3d).

    Round k (0-based) evaluates the shadow's state entering step k with the window and
    steps it, so after the round it holds the serial sampler's state after step k. A
    round freezes at least one step, so step k is frozen by round k + 1 whenever the
    window has moved past it: ``deviation`` then compares the frozen state with the
    serial one. Only the current state is kept (one item state, [B, ...]); for an
    order-2 chain also the previous one and its model output (``u_prev``, ``e_prev``)."""

    def __init__(self, system, X: torch.Tensor, scale_dev: torch.Tensor):
        self.system = system
        self.u = system.carry(X, 0).clone()          # the serial state entering step p
        self.p = torch.zeros(1, dtype=torch.int64, device=X.device)
        self.scale = scale_dev
        self.order = getattr(system, "order", 1)
        if self.order == 2:      # zeros at p = 0, where the order-2 coefficients are 0
            self.u_prev, self.e_prev = torch.zeros_like(self.u), torch.zeros_like(self.u)

    def inputs_and_model_term(self, X: torch.Tensor, lo: int, hi: int):
        """(U, ē(U), ē of the shadow's state) for the window [lo, hi): one model call."""
        return self.system.inputs_and_model_term_with_shadow(X, lo, hi, self.u, self.p)

    def step(self, e: torch.Tensor) -> None:
        """Take the shadow's step p with its model output e and move p on."""
        # in place, so that a captured round (cuda_graph) reads and writes the same buffers
        if self.order == 2:
            u = self.system.shadow_step(self.u, e, self.p, (self.u_prev, self.e_prev))
            self.u_prev.copy_(self.u)
            self.e_prev.copy_(e)
            self.u.copy_(u)
        else:
            self.u.copy_(self.system.shadow_step(self.u, e, self.p))
        self.p += 1

    def deviation(self, X: torch.Tensor, p: int, serial: torch.Tensor) -> torch.Tensor:
        """max|X[i] - serial[i - p]| for the n = len(serial) steps i = p .. p+n-1, in noise
        units of each step, measured as the residuals are (DDNM's derived range elements
        weighted, docs/design.md §3b): [n] float64, on the device."""
        n = serial.shape[0]
        return self.system.residuals(X[p:p + n] - serial, p, p + n, self.scale[p:p + n])

    def advance(self, e: torch.Tensor, X: torch.Tensor, p: int, compare: bool) -> torch.Tensor:
        """``step`` (the shadow is at step p), then, with ``compare``, the ``deviation`` of
        X's state at p from the shadow's (0 without): [1] float64 on the device (no host
        sync), NaN when the shadow's state is not finite (the serial sampler's own step p
        fails)."""
        self.step(e)
        d = self.deviation(X, p, self.u[None]) if compare else self.u.new_zeros(1, dtype=torch.float64)
        return torch.where(torch.isfinite(self.u).all(), d, torch.full_like(d, float("nan")))


def begin_exact_restart(stats: "SolverStats", lin, step: int) -> None:
    """What the loop does first (in every engine) when the serial shadow finds frozen
    state ``step`` off the serial one: record it and drop the secant's round history (its
    last two rounds straddle the restart; the slopes stay). The loop then puts the
    shadow's state(s) in, restarts the window after the last of them with a fresh update
    rule and tol = 0, i.e. freezes exact states only (docs/design.md §3d)."""
    stats.serial_mismatch = step
    lin.forget_rounds()


def note_deviation(stats: "SolverStats", step: int, deviation: float) -> None:
    """Record that the shadow compared frozen state ``step`` (``stats.shadow_checked``)
    and keep the largest deviation it measured (``stats.shadow_deviation``)."""
    stats.shadow_checked.append(step)
    if math.isnan(stats.shadow_deviation) or deviation > stats.shadow_deviation:
        stats.shadow_deviation = deviation


def shadow_applies(system, tol: float, freeze_ratio: float, serial_shadow: bool) -> bool:
    """Whether a solve runs the serial shadow: a chain system (the adjoint has none), and a
    freeze rule that can freeze inexact states (tol * freeze_ratio > 0; at 0 every frozen
    state is the serial one already)."""
    return bool(serial_shadow) and tol * freeze_ratio > 0 and hasattr(system, "shadow_step")
