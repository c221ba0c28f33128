"""The solver loop: one skeleton that owns the policy (docs/design.md §3).

``FixedPointLoop`` keeps the window [lo, hi), the update rule, the linearisation, the
round records, the guards, the serial shadow and its restart, the freeze rule, window
sliding and acceptance, stopping and ``converged``. It drives a round engine that only
knows how to evaluate a window and apply an update:

- ``EagerEngine`` (``engines.py``): one round at a time, its residuals read back every
  round, every decision taken on the host (``round``);
- ``ReadbackEngine``: ``check_every`` rounds on the device, the freeze rule evaluated
  there by the same ``freeze_count``, the records read back once per batch and reviewed
  here (``batch``); optionally replayed from a CUDA graph;
- ``distributed.ShardedEngine``: one round at a time with the window's steps split over
  the ranks of a process group (collectives only; the decisions are this loop's).

A round: U = the inputs of the active steps, E = the model term at U (one batched model
call, with the shadow's state as one more row); the linearisation refits its J from (U,
E); F(X) = the linearised scan from the carry and the per-step residual max|F(X) - X| in
noise units. Stop when every step meets ``tol`` (the window's states become F(X));
otherwise freeze the leading steps whose inputs met ``tol * freeze_ratio`` at their F(X)
(at least the first, whose input is exact, so S rounds always reach the serial answer),
update the rest with the rule and slide the window.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .._checks import raise_nonfinite
from .options import DEFAULT_TOL, SolveOptions
from .policy import (SerialShadow, SolverStats, begin_exact_restart, guard_tripped,
                     note_deviation, record_round, shadow_applies, steps_to_freeze,
                     switch_off_jacobian)
from .planner import SERIAL, as_planner
from .rules import RoundContext, make_rule, takes_context


def plan_regime(solver, linearize, tol: float, options: SolveOptions) -> tuple:
    """What besides the model and the chain sets the front's advance per round: the
    planner remembers rounds per regime (``Planner.start``)."""
    return (str(solver), str(linearize), float(tol), float(options.freeze_ratio))


class FixedPointLoop:
    """One solve of X = F(X) for a triangular system (see the module docstring)."""

    def __init__(self, system, X: torch.Tensor, engine, *, solver: str, linearize: str,
                 tol: float, max_iter: Optional[int], window,
                 callback: Optional[Callable], options: SolveOptions, initial_nfe: int = 0):
        self.system, self.X, self.engine = system, X, engine
        self.solver, self.options, self.callback = solver, options, callback
        self.lin = system.linearization(linearize)
        self.S = S = system.num_steps
        self.max_iter = S if max_iter is None else max_iter
        self.tol, self.freeze_ratio = tol, options.freeze_ratio
        self.scale_dev = system.residual_scale(options.floor).to(X.device)   # [S] float64
        self.stats = SolverStats(nfe=initial_nfe, linearization=self.lin)
        self.shadow = SerialShadow(system, X, self.scale_dev) if shadow_applies(
            system, tol, options.freeze_ratio, options.serial_shadow) else None
        # window: steps per round, None (all S) or the throughput planner (planner.py),
        # which picks it before every move of the window
        self.planner = as_planner(window)
        if self.planner is None:
            self.w = S if window is None else min(window, S)
        else:
            self.planner.start(system, X, sync=engine.planner_sync(X), kind=engine.planner_kind(),
                               regime=plan_regime(solver, linearize, tol, options))
            self.stats.nfe += self.planner.stats.probe_calls     # model calls on B images
            self.w = self.planner.choose(0, 0, exact=tol * self.freeze_ratio == 0,
                                         rows=lambda W: engine.call_rows(self, 0, W))
        serial = self.w == SERIAL
        self.w = max(self.w, 1)
        self.lo, self.hi = 0, self.w
        self.filled = self.hi       # steps below hold an iterate (no entering start needed)
        self.prev_row: Optional[torch.Tensor] = None              # last round's, by step
        engine.bind(self)
        self.update = self.new_rule()
        self.serial_first = serial          # the planner chose the serial sampler outright

    # -- the update rule ---------------------------------------------------------------------
    def new_rule(self):
        rule = make_rule(self.solver, self.options)
        rule.start(self.engine.context(self, self.lo, self.hi))
        self.rule_rows = self.hi - self.lo             # the window it was sized for
        self._rule_ctx = takes_context(rule)
        return rule

    def call_rule(self, X: torch.Tensor, FX: torch.Tensor, G: Optional[torch.Tensor],
                  ctx: RoundContext) -> torch.Tensor:
        return self.update(X, FX, G, ctx=ctx) if self._rule_ctx else self.update(X, FX, G)

    # -- the loop ----------------------------------------------------------------------------
    def run(self):
        """Rounds until every step froze or ``max_iter``; returns (X, stats)."""
        step = self.batch if self.engine.batched else self.round
        done = self.serial_first and self.go_serial(0)
        while not done and self.stats.iterations < self.max_iter:
            if step():
                break
        self.engine.finish(self)
        # an order-2 chain's windows evaluate the step before them too (ChainSystem._call)
        self.stats.nfe += self.engine.previous_rows(self)
        if self.planner is not None:
            shadow = self.options.serial_shadow   # the fixed windows' calls hold its row
            self.stats.plan = self.planner.finish(
                rows=lambda W: self.engine.call_rows(self, 0, W) + (shadow and self.shadow is None),
                converged=self.stats.converged)
        return self.X, self.stats

    def round(self) -> bool:
        """One round, every decision on the host; True when the solve has converged."""
        lo, hi = self.lo, self.hi
        p = self.stats.iterations                      # the shadow's step this round
        compare = p < lo      # only a frozen state is final: an unfrozen one may be off serial
        if self.planner is not None:
            rows = self.call_rows()
            self.planner.round_started()
        r, deviation = self.engine.evaluate(self, p, compare)
        if deviation is not None and not math.isfinite(deviation):
            raise_nonfinite(p)                         # the serial sampler's own step p fails
        if deviation is not None and compare:
            note_deviation(self.stats, p, deviation)
            if not deviation <= self.tol:
                if self.planner is not None:
                    self.planner.round_done(hi - lo, rows, [0], end=hi == self.S,
                                            seconds=self.engine.agreed_seconds(),
                                            remaining=self.S - lo)
                self.restart_after_shadow(r, p)
                return False
        if self.shadow is not None:
            self.stats.nfe += 1                        # the shadow's step evaluation
            # frozen and no longer read (lo - 1 is the carry; lo - 2 an order-2 chain's too):
            if p < lo - getattr(self.system, "order", 1):
                self.engine.take_serial(self, p)       # the returned state is the serial one
        self.guard(r)
        row = self.prev_row = record_round(self.stats, r, lo, hi, self.S)
        n_done = steps_to_freeze(r, self.tol, self.freeze_ratio, last=hi == self.S)
        self.engine.apply(self, n_done)
        if self.planner is not None:
            self.planner.round_done(hi - lo, rows, [n_done], end=hi == self.S,
                                    seconds=self.engine.agreed_seconds(), remaining=self.S - lo)
        self.notify(row)
        # Release the round's buffers before the next round allocates its own: else the
        # peak holds two rounds' U, E and F(X) (measured: 4 stacked states for Picard
        # with J off instead of 3; bench/round.py --memory).
        self.engine.release()
        if n_done == hi - lo and hi == self.S:
            self.stats.converged = True
            return True
        return self.move_on(n_done)

    def call_rows(self) -> int:
        """The rows of the round's model call: the window's steps and the shadow's state
        (a sharded round: its largest block's)."""
        return self.engine.call_rows(self, self.lo, self.hi - self.lo)

    def guard(self, r: torch.Tensor) -> None:
        """The divergence guard, else the linearisation guard, on the round's residuals."""
        bad = ~torch.isfinite(r)
        if bool(bad.any()):
            k = int(bad.nonzero()[0, 0])
            if k == 0:                   # the first active step's input is exact
                raise_nonfinite(self.lo)
            # A not-yet-converged iterate grew until the model or the scan overflowed (the
            # iterates of unconverged steps need not stay bounded, e.g. for a denoiser
            # whose eps grows with |x|). Restart those steps from the last finite state,
            # forget the mixing history and switch J off.
            self.engine.diverged(self, k)
            r[k:] = float("inf")
            self.update.forget()
            switch_off_jacobian(self.lin, self.stats)
        elif self.lin.active and guard_tripped(r, self.prev_row, self.lo, self.hi):
            switch_off_jacobian(self.lin, self.stats)

    def notify(self, row: torch.Tensor) -> None:
        """The user's callback, with the round's record (one schema for every engine)."""
        if self.callback is not None:
            payload = {"iteration": self.stats.iterations, "window": (self.lo, self.hi),
                       "residuals": row, "nfe": self.stats.nfe, "state": self.X}
            self.engine.call_back(self, self.callback, payload)

    def move_on(self, n_done: int) -> bool:
        """After a round (or batch) that froze ``n_done`` steps and left steps to solve:
        the planner's next window and ``slide``, or the serial sampler (True when that
        ended the solve). No choice after the last round ``max_iter`` allows."""
        planner = self.planner
        if planner is not None and not planner.serial and self.stats.iterations < self.max_iter:
            front = self.lo + n_done
            # the serial sampler would start at the shadow's step, else at the front
            start = self.stats.iterations if self.shadow is not None else front
            W = planner.choose(front, start,
                               rows=lambda W: self.engine.call_rows(self, front, W))
            if W == SERIAL:
                return self.go_serial(front)
            self.w = W
        self.slide(n_done)
        return False

    def go_serial(self, front: int) -> bool:
        """The planner found the serial sampler faster for the remaining steps: run it
        from the serial shadow's exact state (the steps it passed; the frozen states
        after it are not checked yet), else from ``front``, the first step not frozen
        (whose carry is what the freeze rule promises). True when the solve ended."""
        if self.shadow is not None:
            q = self.stats.iterations              # the shadow holds the state after q - 1
            if q > 0:
                self.engine.take_serial_carry(self, q - 1)
            else:
                self.engine.gather_states(self)
        else:
            q = front
            self.engine.gather_states(self)
        self.planner.went_serial(q)
        self.w = 1
        if not hasattr(self.system, "serial"):
            # (the adjoint) windows of one step with no shadow: a one-step window from an
            # exact carry is the serial step
            self.restart(q)
            return False
        self.shadow, self.tol, self.prev_row = None, 0.0, None
        end = min(self.S, q + self.max_iter - self.stats.iterations)

        def step_done(info):                        # each step counts as a round of one
            self.lo, self.hi = info["step"], info["step"] + 1
            row = record_round(self.stats, torch.full((1,), float("nan"), dtype=torch.float64),
                               self.lo, self.hi, self.S)
            self.notify(row)
        if end > q:
            self.planner.round_started()
            self.engine.run_serial(self, q, end, step_done)
            self.planner.round_done(1, 1, [1] * (end - q))
        self.lo = self.hi = end
        self.stats.converged = end == self.S
        return True

    def slide(self, n_done: int) -> None:
        """The window moves past its ``n_done`` frozen steps; steps entering it get a start."""
        new_lo = self.lo + n_done
        new_hi = min(new_lo + self.w, self.S)
        if new_hi > self.filled:
            # steps below ``filled`` kept their iterates across a restart (serial shadow)
            self.engine.enter(self, self.filled, new_hi, from_last_output=self.hi == self.filled)
            self.filled = new_hi
        self.update.drop(n_done)
        self.engine.move(self, new_lo, new_hi)
        self.lo, self.hi = new_lo, new_hi
        if new_hi - new_lo > self.rule_rows:
            # the planner grew the window past the rule's buffers: a fresh rule (Anderson's
            # history restarts; Picard has none)
            self.update = None
            self.update = self.new_rule()

    def restart(self, lo: int) -> None:
        """After the serial shadow found a frozen state off the serial one (the states up
        to ``lo`` - 1 are the shadow's now): restart the window at ``lo`` with a fresh
        rule, freezing exact states only (tol = 0: the front still moves at least one step
        per round, so S rounds still suffice)."""
        self.shadow, self.tol, self.prev_row = None, 0.0, None
        if self.planner is not None and not self.planner.serial and self.planner.allow_serial:
            # freezing exact states only, a window freezes one step a round: the serial
            # sampler does the same with one row a call
            self.planner.went_serial(lo)
            self.w = 1
        hi = min(lo + self.w, self.S)
        self.engine.move(self, lo, hi, restart=True)
        self.lo, self.hi = lo, hi
        self.update = None               # the old rule's history goes before the new one's
        self.update = self.new_rule()

    def restart_after_shadow(self, r: torch.Tensor, p: int) -> None:
        """Frozen state p is off the serial one by more than tol: the chain amplifies what
        the freeze rule accepts (docs/design.md §3d). The round counts; the shadow's exact
        state goes in at p and the solve restarts after it."""
        row = record_round(self.stats, r, self.lo, self.hi, self.S)
        self.stats.nfe += 1
        begin_exact_restart(self.stats, self.lin, p)
        self.engine.put_serial(self, p)
        self.notify(row)
        self.engine.release()
        self.restart(p + 1)                 # p < lo <= S - 1: steps remain

    # -- check_every: rounds on the device, reviewed at the read-back ----------------------------
    def batch(self) -> bool:
        """Up to ``check_every`` rounds on the device, then their review; True when the
        solve has converged."""
        lo, hi = self.lo, self.hi
        W = hi - lo
        # At most W rounds between reads: each round freezes at least one more step of the
        # window, so no round is spent on a window already frozen whole, and every round
        # still pays for at least one frozen step: S rounds always suffice.
        n_rounds = min(self.options.check_every, W, self.max_iter - self.stats.iterations)
        p0 = self.stats.iterations                     # the shadow's step in the batch's round 0
        if self.planner is not None:
            rows = self.call_rows()
            self.planner.round_started()
        rec = self.engine.run_batch(self, n_rounds)
        if self.planner is not None:
            f = rec.frozen.tolist()
            self.planner.round_done(W, rows, [f[q + 1] - f[q] for q in range(n_rounds)],
                                    end=hi == self.S, remaining=self.S - lo)
        if rec.shadow_failed is not None:              # the serial sampler's own step fails there
            raise_nonfinite(p0 + rec.shadow_failed)
        for q in range(n_rounds):
            self.review(rec.residuals[q], int(rec.frozen[q]))
        if self.shadow is not None and self.review_shadow(rec, p0, n_rounds):
            return self.stats.converged
        f = int(rec.frozen[-1])
        k = self.engine.first_nonfinite(self)
        if k is not None:
            # Divergence (see ``guard``): restart the steps from the last finite state,
            # forget the history, switch J off. Frozen steps are exact and finite.
            if k == 0:
                raise_nonfinite(lo)
            self.engine.diverged(self, k)
            f = min(f, k)
            self.update.forget()
            switch_off_jacobian(self.lin, self.stats)
        if f == W and hi == self.S:
            self.stats.converged = True
            return True
        return self.move_on(f)

    def review(self, r: torch.Tensor, frozen: int) -> None:
        """Record one device round of a batch: its residuals (NaN where a step was frozen
        before the round), the guards (up to check_every - 1 rounds late), the callback."""
        lo, hi = self.lo, self.hi
        rq = r.clone()
        rq[:frozen] = float("nan")                     # frozen before this round
        bad = ~torch.isfinite(r[frozen:])
        if bool(bad.any()) and int(bad.nonzero()[0, 0]) == 0:
            raise_nonfinite(lo + frozen)               # the first active step: the model
        row = record_round(self.stats, rq, lo, hi, self.S)
        if not bool(bad.any()) and self.lin.active and guard_tripped(row[lo:hi], self.prev_row,
                                                                     lo, hi):
            switch_off_jacobian(self.lin, self.stats)
        self.prev_row = row
        self.notify(row)

    def review_shadow(self, rec, p0: int, n_rounds: int) -> bool:
        """The batch's shadow states against the frozen ones; True after a restart."""
        self.stats.nfe += n_rounds                     # the shadow's step evaluations
        # frozen before round q: below the window's front at the round's start
        frozen = [p0 + q < self.lo + int(rec.frozen[q]) for q in range(n_rounds)]
        for q in range(n_rounds):
            if frozen[q]:
                note_deviation(self.stats, p0 + q, float(rec.deviations[q]))
        over = [q for q in range(n_rounds) if frozen[q] and not float(rec.deviations[q]) <= self.tol]
        # the frozen states the shadow passed, no longer read (the carry is lo + f - 1; an
        # order-2 chain's window reads lo + f - 2 too), take the serial values (as in ``round``)
        last_read = (self.lo + int(rec.frozen[-1]) - getattr(self.system, "order", 1)
                     if not over else self.S)
        for q in range(over[0] if over else n_rounds):
            if frozen[q] and p0 + q < last_read:
                self.engine.take_serial(self, p0 + q, q)
        if not over:
            return False
        # A frozen state off the serial one (see ``restart_after_shadow``): every state the
        # shadow took in this batch is the serial one, so restart after the last (not after
        # the bad one: the batch's later rounds are spent, and the front must stay at or
        # past the round count for S rounds to suffice)
        q = over[0]
        begin_exact_restart(self.stats, self.lin, p0 + q)
        self.engine.put_serial(self, p0 + q, q)
        self.restart(p0 + n_rounds)
        if self.lo == self.S:
            self.stats.converged = True
        elif self.hi > self.filled:             # the restart can start past the old window
            self.engine.enter(self, self.filled, self.hi, from_last_output=False)
            self.filled = self.hi
        return True


def fixed_point_solve(system, X: torch.Tensor, *, solver: str = "picard",
                      linearize: str = "secant", tol: float = DEFAULT_TOL,
                      max_iter: Optional[int] = None, window=None,
                      callback: Optional[Callable] = None,
                      options: Optional[SolveOptions] = None, initial_nfe: int = 0,
                      engine=None):
    """Solve X = F(X) for a triangular system: a ``ChainSystem`` (the sampler) or an
    ``AdjointSystem`` (its gradient), anything with ``num_steps``, ``residual_scale``,
    ``inputs``, ``model_term``, ``scan`` and ``linearization``. X: [S, B, ...], updated
    in place and returned with the ``SolverStats``. ``engine``: where the rounds run (the
    default: ``EagerEngine``, or ``ReadbackEngine`` with ``options.check_every`` > 1 or
    ``options.cuda_graph``; ``distributed.ShardedEngine`` for a process group)."""
    from .engines import default_engine
    options = SolveOptions() if options is None else options
    engine = default_engine(options) if engine is None else engine
    loop = FixedPointLoop(system, X, engine, solver=solver, linearize=linearize, tol=tol,
                          max_iter=max_iter, window=window, callback=callback,
                          options=options, initial_nfe=initial_nfe)
    return loop.run()
