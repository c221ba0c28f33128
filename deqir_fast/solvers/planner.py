"""The throughput planner of ``solve(..., window="auto")`` (docs/design.md §3e).

A round with window W evaluates n(W) = (W + shadow) x B images in one model call (the
serial shadow's state is one more row) and moves the front, the first unfrozen step, by
a(W) steps. The serial sampler moves it by one step per call on B images. So the planner
chooses, before each position of the window, the W that maximises a(W) / t(n(W)), where

- t(n) is the measured cost of a round that evaluates n images on this device
  (``CostCurve``: the fastest round seen at each n, linear in between and beyond; kept per
  (model, image shape, dtype, device) for the process, so a second solve starts with the
  first one's curve), and
- a(W) = c * W**g, clamped to [1, W], with c and g fitted to the rounds of this solve
  (the advance depends on the model, the chain and the image; g's prior is 0.5).

Serial stepping is one of its choices: when the remaining steps cost less one call a step
than at the best window's rate, the solve becomes the serial sampler from the serial
shadow's exact state on (``FixedPointLoop.go_serial``). A round's call holds at most
``growth`` (4) times the images of the largest call measured so far, so a wrong guess
costs at most one round at four times that size; the first solve of a process pays ``probe_calls`` timed
calls on B images (t(B), the serial step's cost).

The clock is injected (``Planner(clock=...)``): the tests drive the planner with a model
whose calls advance a simulated clock by t(n), so every decision is deterministic.
"""
from __future__ import annotations

import bisect
import math
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

# a(W) ~ c * W**g: the front's mean advance per round at a fixed window. Measured on the
# bundled model at S = 100 (bench/planner.py --advance, RESULTS §17): g = 0.5 fits DDIM
# (c = 0.9-1.25 for W 2-100), DDPM (0.6-0.85), DDRM inpainting (0.6-0.8); DDNM SR x2's large
# windows advance less (c 0.79 at W = 2 to 0.36 at 100: g ~ 0.3). So g = 0.5 is the prior,
# and both are fitted to this solve's rounds and the last REMEMBERED_ROUNDS of the same
# chain kind and length with the same model (the cache): least squares on log a against
# log W over the windows
# run (mean advance per window, weighted by rounds), with a ridge GAMMA_PRIOR_WEIGHT
# pulling g to 0.5 and PRIOR_ROUNDS pseudo-rounds at W = 4 advancing 2 steps (c = 1). The
# pseudo-rounds keep the first rounds from deciding alone: the front is slow to start (a
# whole-chain DDRM-100 advances 1 step in each of its first 6 rounds on the bundled model,
# then 3, 4, 6, 25) while the steps behind it converge.
#
# A window that reaches the chain's end is accepted whole at tol, not tol * freeze_ratio
# (100x looser), so it finishes in bursts. Its advance is m / R_end(m), m the steps left
# when the window first reached the end and R_end(m) = rho * m**0.5 the rounds it then
# took to finish, fitted over the last solves' such episodes (prior: the law's own rounds,
# one pseudo-episode at m = END_PRIOR_M). On the mixture prior (bench/planner.py, flat) the
# whole chain finished DDRM-100 in 6 rounds where W = 50 took 12 and the law said 9.
END_PRIOR_M = 16
END_EPISODES = 4             # the episodes kept per chain kind (the most recent)
REMEMBERED_ROUNDS = 200      # the rounds kept per chain kind (the most recent)
ADVANCE_EXPONENT = 0.5
# past the largest window tried, a(W) is extrapolated with this exponent (see ``advance``):
# above the bundled model's 0.5, so a flat curve's larger windows get tried (the mixture's
# DDRM-100 advanced as W**0.66 from W = 5 to 50), and below 1, so a knee curve's do not
# (1 priced a whole-chain round at 323 ms above W = 2 at 10 ms on issue #24's H200 curve)
OPTIMISM = 0.75
GAMMA_PRIOR_WEIGHT = 1.0
GAMMA_RANGE = (0.2, 1.0)
PRIOR_W, PRIOR_ADVANCE, PRIOR_ROUNDS = 4, 2.0, 4.0
SERIAL = 0                   # ``Planner.choose``'s answer for "run the serial sampler"
MIN_SECONDS = 1e-9           # the least a sample may say a call costs


def _check_positive(name, value, integer=False):
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not (ok and not isinstance(value, bool) and math.isfinite(value) and value > 0):
        kind = "an int >= 1" if integer else "a finite number > 0"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


class CostCurve:
    """t(n): the seconds of a round (or a probe) that evaluates n images in one model call,
    from measured samples: the fastest at each n (the first call at a shape pays one-off
    costs), linear between samples, the slope of the upper half of the samples beyond
    them (flat with one sample), never decreasing in n."""

    def __init__(self):
        self.samples: Dict[int, float] = {}
        self._n: List[int] = []
        self._t: List[float] = []

    def add(self, n: int, seconds: float) -> None:
        if n < 1 or not math.isfinite(seconds) or seconds < 0:
            return
        seconds = max(seconds, MIN_SECONDS)      # a coarse clock can read 0: never free
        old = self.samples.get(n)
        if old is None or seconds < old:
            self.samples[n] = seconds
            self._n = sorted(self.samples)
            t, run = [], 0.0
            for k in self._n:                      # the running max: never decreasing
                run = max(run, self.samples[k])
                t.append(run)
            self._t = t

    def _slope(self) -> float:
        """Seconds per image beyond the largest sample: the least-squares slope of the
        samples in its upper half (n >= largest / 2; the last two when fewer), >= 0. One
        noisy pair of neighbours does not set it (a flat curve's 73 and 79 images measured
        14.4 and 18.4 ms, which priced the whole chain at 33 ms instead of 18)."""
        ns = self._n
        if len(ns) < 2:
            return 0.0
        pts = [(n, self.samples[n]) for n in ns if 2 * n >= ns[-1]]
        if len(pts) < 2:
            pts = [(n, self.samples[n]) for n in ns[-2:]]
        mn = sum(n for n, _ in pts) / len(pts)
        mt = sum(t for _, t in pts) / len(pts)
        var = sum((n - mn) ** 2 for n, _ in pts)
        return max(0.0, sum((n - mn) * (t - mt) for n, t in pts) / var)

    def known(self, n: int) -> bool:
        return n in self.samples

    @property
    def largest(self) -> int:
        return self._n[-1] if self._n else 0

    def __call__(self, n: int) -> float:
        ns, ts = self._n, self._t
        if not ns:
            raise ValueError("the cost curve has no samples")
        if n <= ns[0]:
            return ts[0]
        if n >= ns[-1]:
            return ts[-1] + self._slope() * (n - ns[-1])
        i = bisect.bisect_left(ns, n)
        if ns[i] == n:
            return ts[i]
        w = (n - ns[i - 1]) / (ns[i] - ns[i - 1])
        return ts[i - 1] + w * (ts[i] - ts[i - 1])


# model -> {(system kind, image shape, dtype, device[, ranks]): CostCurve; (that key, chain,
# operator, S, regime): the (W, advance, at the end) rounds remembered; (that, "end"): the
# end episodes}; weak, so they go with the model
_CURVES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _per_model(model) -> dict:
    try:
        return _CURVES.setdefault(model, {})
    except TypeError:                      # not weakly referenceable: nothing is kept
        return {}


def clear_cost_curves() -> None:
    """Forget every measured cost curve (the next planned solve probes again)."""
    _CURVES.clear()


@dataclass
class PlanStats:
    """What the planner measured and chose (``res.stats.plan``).

    ``curve``: {n images: seconds}, the cost curve after the solve; ``windows``: the window
    of each round (1 once serial); ``advances``: the steps each round froze; ``rows``: the
    rows of each round's model call (its window and the shadow's);
    ``serial_from``: the step from which the solve ran the serial sampler (None: it did
    not); ``advance_scale``, ``advance_exponent``: the fitted c and g of a(W) = c * W**g;
    ``end_rounds``: rho of R_end(m) = rho * m**0.5, the rounds a window at the chain's end
    takes to finish m steps; ``end_episode``: this solve's (m, rounds), when it ended so; ``probe_seconds``: the
    timed calls on B images before the first round (0 with a cached t(B)), and
    ``probe_calls`` of them (counted in the solve's ``nfe``);
    ``projected``: seconds for the whole chain from the measured curve and the fitted
    advance, for ``"serial"``, ``"window W"`` (W = 5, 10, 20, 50), ``"whole chain"`` and
    ``"plan"`` (the rounds that ran, at the curve's cost); ``measured``: the seconds of the
    rounds and probes, as the planner's clock read them."""
    curve: Dict[int, float] = field(default_factory=dict)
    windows: List[int] = field(default_factory=list)
    advances: List[int] = field(default_factory=list)
    rows: List[int] = field(default_factory=list)
    serial_from: Optional[int] = None
    advance_scale: float = float("nan")
    advance_exponent: float = float("nan")
    end_rounds: float = float("nan")
    end_episode: Optional[Tuple[int, int]] = None
    probe_seconds: float = 0.0
    probe_calls: int = 0
    projected: Dict[str, float] = field(default_factory=dict)
    measured: float = 0.0


class Planner:
    """``solve(..., window=Planner(...))``: ``window="auto"`` with settings.

    Args:
        clock: a function returning seconds (default ``time.perf_counter``); the rounds
            are timed with it, after the round's host read (on CUDA the model's work is
            done by then). With a process group the rounds are timed by the engine
            instead (the slowest rank's, agreed in the residual gather) and the probe by
            the slowest rank's ``clock``.
        max_window: the largest window it may choose (bounds memory; default S).
        growth: a window's call may hold at most this many times the images of the
            largest call measured so far.
        probe_calls: timed calls on B images when the curve has no t(B) yet.
        cache: share the cost curve with the process's other solves of the same model,
            image shape, dtype and device.
        serial: allow switching to the serial sampler (off: a window of at least 2).
    """

    def __init__(self, *, clock: Callable[[], float] = time.perf_counter,
                 max_window: Optional[int] = None, growth: float = 4.0, probe_calls: int = 1,
                 cache: bool = True, serial: bool = True):
        if not callable(clock):
            raise TypeError(f"clock must be callable, got {type(clock).__name__}")
        if max_window is not None:
            _check_positive("max_window", max_window, integer=True)
        _check_positive("growth", growth)
        if growth < 1:
            raise ValueError(f"growth must be >= 1, got {growth!r}")
        _check_positive("probe_calls", probe_calls, integer=True)
        if not isinstance(cache, bool) or not isinstance(serial, bool):
            raise TypeError("cache and serial must be True or False")
        self.clock, self.max_window, self.growth = clock, max_window, float(growth)
        self.probe_calls, self.cache, self.allow_serial = probe_calls, cache, serial

    # -- one solve ---------------------------------------------------------------------------
    def start(self, system, X: torch.Tensor, sync=None, kind: tuple = (),
              regime: tuple = ()) -> None:
        """Begin a solve of ``system`` from X [S, B, ...]: the curve (cached or new), and
        t(B) probed when unknown. Once per solve: a second call for the same system (the
        loop's, after ``solve`` asked before its initial guess) does nothing.

        ``sync`` (a sharded solve): ``max(values)`` over the ranks and ``share(obj)``
        (rank 0's object on every rank), so that every rank starts from the same curve
        and advances and takes the same decisions; ``kind``: more of the cache key (the
        rank count: a sharded round's cost includes its collectives); ``regime``: what
        else sets the front's advance (solver, linearisation, tol, freeze ratio), part of
        the key of the rounds remembered."""
        if getattr(self, "system", None) is system:
            return
        self.system = system
        self.S, self.B = X.shape[0], X.shape[1]
        # the system's kind too: an adjoint round (a VJP) costs more than a forward one
        key = (type(system).__name__, tuple(X.shape[2:]), X.dtype, str(X.device), *kind)
        model = getattr(system, "model", None)
        if model is None:                      # the adjoint: its forward system's model
            model = getattr(getattr(system, "forward", None), "model", None)
        cache = _per_model(model) if (self.cache and model is not None) else {}
        self.curve = cache.setdefault(key, CostCurve())
        # the last solve of this chain kind and length: its rounds inform the advance fit
        chain = getattr(system, "chain", None)
        operator = getattr(chain, "operator", None)
        self._advance_key = (key, type(chain).__name__, type(operator).__name__, self.S, *regime)
        self._advances = cache.setdefault(self._advance_key, [])
        self._episodes = cache.setdefault((self._advance_key, "end"), [])
        self.remembered: List[Tuple[int, int, bool]] = list(self._advances)
        self.episodes: List[Tuple[int, int]] = list(self._episodes)   # (m, rounds to finish)
        self._episode: Optional[List[int]] = None        # this solve's, while at the end
        self.stats = PlanStats()
        # (W, advance, the window reached the end) of the rounds with W >= 2
        self.observed: List[Tuple[int, int, bool]] = []
        self.rows: List[int] = []                      # the model call's rows, per round
        self.serial = False
        self._t0: Optional[float] = None
        self.sync = sync
        if sync is not None:                   # every rank from rank 0's memory
            samples, remembered, episodes = sync.share(
                (dict(self.curve.samples), self.remembered, self.episodes))
            self.curve = CostCurve()
            for n, t in samples.items():
                self.curve.add(n, t)
            cache[key] = self.curve
            self.remembered = [tuple(r) for r in remembered]
            self.episodes = [tuple(e) for e in episodes]
        if not self.curve.known(self.B):
            self.stats.probe_seconds = self.probe(system, X)

    def probe(self, system, X: torch.Tensor) -> float:
        """Time ``probe_calls`` model calls on B images (the state entering step 0)."""
        U = system.inputs(X, 0, 1)
        spent = 0.0
        for _ in range(self.probe_calls):
            t0 = self.clock()
            failed = None
            try:
                E = system.model_term(U, 0)
                _wait_for(E)
            except Exception as e:             # noqa: BLE001 - every rank must hear of it
                if self.sync is None:
                    raise
                failed = e
            dt = self.clock() - t0
            if self.sync is not None:          # the slowest rank's; a failure reaches all
                dt, any_failed = self.sync.max([dt, 1.0 if failed is not None else 0.0])
                if failed is not None:
                    raise failed
                if any_failed:
                    raise RuntimeError("another rank failed in the planner's timing call "
                                       "(its error is raised there)")
            spent += dt
            self.stats.measured += dt
            self.stats.probe_calls += 1
            self.curve.add(self.B, dt)
        return spent

    def round_started(self) -> None:
        self._t0 = self.clock()

    def round_done(self, window: int, rows: int, advances: List[int], end: bool = False,
                   seconds: Optional[float] = None, remaining: int = 0) -> None:
        """Record the rounds since ``round_started`` (one, or a ``check_every`` batch at
        one window): the window, the rows of each model call (window + shadow; a sharded
        round: the largest block's), the steps each round froze (``end``: the window
        reached the chain's end, ``remaining`` steps before the round); each is charged an
        equal share of the time (``seconds`` when the engine agreed on it across ranks,
        else the clock's)."""
        seconds = self.clock() - self._t0 if seconds is None else seconds
        if self.stats.windows or window == 1:
            # not a solve's first parallel round: it carries one-off costs (the first
            # solve of a process measured 21.9 ms for a 4-image round whose later repeats
            # took 12.4 ms, which priced every window out for good)
            self.curve.add(rows * self.B, seconds / len(advances))
        self.stats.measured += seconds
        for advance in advances:
            self.stats.windows.append(window)
            self.stats.advances.append(advance)
            self.rows.append(rows)
            if window >= 2 and advance >= 1:
                self.observed.append((window, advance, end))
            if not end:
                self._episode = None
            elif self._episode is None:
                self._episode = [remaining, 1]
            else:
                self._episode[1] += 1


    def advance_fit(self) -> Tuple[float, float, float]:
        """(c, g, rho): a(W) = c * W**g (ridge least squares on the log of the mean advance
        per window of the rounds not at the end, weighted by rounds, with the prior
        pseudo-rounds), and R_end(m) = rho * m**0.5 over the end episodes (see
        END_PRIOR_M)."""
        rounds = self.remembered + self.observed
        groups: Dict[int, List[float]] = {PRIOR_W: [PRIOR_ADVANCE * PRIOR_ROUNDS, PRIOR_ROUNDS]}
        for W, a, end in rounds:
            if not end:
                g = groups.setdefault(W, [0.0, 0.0])
                g[0] += a
                g[1] += 1
        w0 = sx = sy = sxx = sxy = 0.0
        for W, (total, n) in groups.items():
            x, y = math.log(W), math.log(total / n)
            w0, sx, sy, sxx, sxy = w0 + n, sx + n * x, sy + n * y, sxx + n * x * x, sxy + n * x * y
        lam, g0 = GAMMA_PRIOR_WEIGHT, ADVANCE_EXPONENT
        gamma = (sxy - sx * sy / w0 + lam * g0) / (sxx - sx * sx / w0 + lam)
        gamma = min(max(gamma, GAMMA_RANGE[0]), GAMMA_RANGE[1])
        c = math.exp((sy - gamma * sx) / w0)
        prior_rounds = END_PRIOR_M / (c * END_PRIOR_M ** gamma)     # the law's, at m
        rho = (prior_rounds + sum(r for _, r in self.episodes)) / (
            math.sqrt(END_PRIOR_M) + sum(math.sqrt(m) for m, _ in self.episodes))
        return c, gamma, rho

    def explored(self) -> int:
        """The largest window (not reaching the end) whose rounds the fit has seen."""
        return max([PRIOR_W] + [W for W, _, end in self.remembered + self.observed if not end])

    def advance(self, W: int, remaining: int,
                fit: Optional[Tuple[float, float, float]] = None,
                explored: Optional[int] = None) -> float:
        """The expected steps a round at window W freezes, ``remaining`` steps left.
        Past the largest window run so far the law is extrapolated optimistically (a(W)
        growing as W**OPTIMISM): a larger window is tried when it could pay, and its
        rounds then correct the fit (the growth limit bounds the cost of a wrong try)."""
        c, gamma, rho = self.advance_fit() if fit is None else fit
        top = self.explored() if explored is None else explored
        a = c * W ** gamma if W <= top else c * top ** gamma * (W / top) ** OPTIMISM
        if W >= remaining:
            # the end: as its episodes say; before any, never less than the (optimistic)
            # law for a window of its size (it freezes at least what that one would)
            ep = math.sqrt(remaining) / rho
            a = ep if self.episodes else max(a, ep)
        return min(max(1.0, a), float(W), float(remaining))

    def candidates(self, remaining: int) -> List[int]:
        """Windows worth comparing: every W up to 8, then steps of about 12%, and the rest."""
        top = remaining if self.max_window is None else min(remaining, self.max_window)
        out, W = [], 1
        while W < top:
            out.append(W)
            W = W + 1 if W < 8 else max(W + 1, int(W * 1.125))
        out.append(top)
        return out

    def choose(self, lo: int, serial_at: int, shadow: bool = True, exact: bool = False,
               rows: Optional[Callable[[int], int]] = None) -> int:
        """The window for the steps from ``lo`` on, or ``SERIAL``: the serial sampler from
        step ``serial_at`` (the shadow's exact state; ``lo`` without a shadow). ``exact``:
        the freeze rule freezes exact states only (after a restart), one step a round.
        ``rows(W)``: the rows of a round's model call at window W (default W plus the
        shadow's; a sharded round: its largest block's)."""
        remaining = self.S - lo
        t_step = self.curve(self.B)
        if exact and self.allow_serial:
            return SERIAL
        if rows is None:
            rows = (lambda W: W + 1) if shadow else (lambda W: W)   # noqa: E731
        limit = max(self.growth * self.curve.largest, rows(2) * self.B)
        fit, top = self.advance_fit(), self.explored()
        best_W, best_rate = 1, 0.0
        for W in self.candidates(remaining):
            n = rows(W) * self.B
            if n > limit and W > 2:
                break
            rate = self.advance(W, remaining, fit, top) / self.curve(n)
            if rate >= best_rate:          # ties: the larger window (more steps a round)
                best_W, best_rate = W, rate
        if self.allow_serial and (self.S - serial_at) * t_step <= remaining / best_rate:
            return SERIAL
        top = remaining if self.max_window is None else min(remaining, self.max_window)
        return min(max(best_W, 1 if self.allow_serial else 2), top)

    def went_serial(self, step: int) -> None:
        self.serial = True
        self._episode = None
        self.stats.serial_from = step

    def finish(self, rows: Optional[Callable[[int], int]] = None,
               converged: bool = False) -> PlanStats:
        """The statistics: the curve, and the projections from it (``rows(W)``: a fixed
        window's call rows, default W + 1). Ends the solve; the next one of this chain
        starts from its rounds (and its end episode, when it ``converged`` there)."""
        rows = (lambda W: W + 1) if rows is None else rows   # noqa: E731
        self.system = None
        # the most recent rounds of this chain kind, this solve's last: a solve that ran
        # only end windows must not erase what the ones before learned of the others
        self._advances[:] = (self.remembered + self.observed)[-REMEMBERED_ROUNDS:]
        if converged and self._episode is not None:
            self.episodes = (self.episodes + [tuple(self._episode)])[-END_EPISODES:]
            self._episodes[:] = self.episodes
            self.stats.end_episode = tuple(self._episode)
        st, curve, S, B = self.stats, self.curve, self.S, self.B
        st.curve = {n: curve.samples[n] for n in sorted(curve.samples)}
        st.rows = list(self.rows)
        fit = self.advance_fit()
        st.advance_scale, st.advance_exponent, st.end_rounds = fit
        st.projected = {"serial": S * curve(B)}
        for W in (5, 10, 20, 50, S):
            if W > S:
                continue
            rounds = S / self.advance(W, S, fit)
            name = "whole chain" if W == S else f"window {W}"
            st.projected[name] = rounds * curve(rows(W) * B)
        st.projected["plan"] = st.probe_seconds + sum(curve(r * B) for r in self.rows)
        return st


def _wait_for(t: torch.Tensor) -> None:
    """Block until ``t`` is computed (a CUDA call returns before its kernels run)."""
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


def as_planner(window) -> Optional[Planner]:
    """``window``'s planner: a new one for ``"auto"``, the given one, else None."""
    if isinstance(window, Planner):
        return window
    if isinstance(window, str) and window == "auto":
        return Planner()
    return None


__all__ = ["ADVANCE_EXPONENT", "SERIAL", "CostCurve", "PlanStats", "Planner", "as_planner",
           "clear_cost_curves"]
