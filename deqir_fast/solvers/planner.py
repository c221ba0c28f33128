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
# (c = 1.0-1.1 for W 4-100), DDPM (0.8), DDRM inpainting (0.67) within 20%; DDNM SR x2's large
# windows advance less (g ~ 0.35). So g = 0.5 is the prior, and both are fitted to the
# rounds of this solve and of the process's last solve of the same chain kind and length
# with the same model (the cache): least squares on log a against log W over the windows
# run (mean advance per window, weighted by rounds), with a ridge GAMMA_PRIOR_WEIGHT
# pulling g to 0.5 and PRIOR_ROUNDS pseudo-rounds at W = 4 advancing 2 steps (c = 1). The
# pseudo-rounds keep the first rounds from deciding alone: the front is slow to start (a
# whole-chain DDRM-100 advances 1 step in each of its first 6 rounds on the bundled model,
# then 3, 4, 6, 25) while the steps behind it converge.
ADVANCE_EXPONENT = 0.5
GAMMA_PRIOR_WEIGHT = 2.0
GAMMA_RANGE = (0.2, 1.0)
PRIOR_W, PRIOR_ADVANCE, PRIOR_ROUNDS = 4, 2.0, 4.0
SERIAL = 0                   # ``Planner.choose``'s answer for "run the serial sampler"


def _check_positive(name, value, integer=False):
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not (ok and not isinstance(value, bool) and math.isfinite(value) and value > 0):
        kind = "an int >= 1" if integer else "a finite number > 0"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


class CostCurve:
    """t(n): the seconds of a round (or a probe) that evaluates n images in one model call,
    from measured samples: the fastest at each n (the first call at a shape pays one-off
    costs), linear between samples, the last two samples' slope beyond them (flat with one
    sample), never decreasing in n."""

    def __init__(self):
        self.samples: Dict[int, float] = {}
        self._n: List[int] = []
        self._t: List[float] = []

    def add(self, n: int, seconds: float) -> None:
        if n < 1 or not math.isfinite(seconds) or seconds < 0:
            return
        old = self.samples.get(n)
        if old is None or seconds < old:
            self.samples[n] = seconds
            self._n = sorted(self.samples)
            t, run = [], 0.0
            for k in self._n:                      # the running max: never decreasing
                run = max(run, self.samples[k])
                t.append(run)
            self._t = t

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
            if len(ns) == 1:
                return ts[-1]
            slope = (ts[-1] - ts[-2]) / (ns[-1] - ns[-2])
            return ts[-1] + slope * (n - ns[-1])
        i = bisect.bisect_left(ns, n)
        if ns[i] == n:
            return ts[i]
        w = (n - ns[i - 1]) / (ns[i] - ns[i - 1])
        return ts[i - 1] + w * (ts[i] - ts[i - 1])


# model -> {(system kind, image shape, dtype, device): CostCurve, and (that key, chain
# kind, S): the (W, advance) rounds of the last planned solve}; weak, so they go with it
_CURVES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _per_model(model) -> dict:
    try:
        return _CURVES.setdefault(model, {})
    except TypeError:                      # not weakly referenceable: nothing is kept
        return {}


def cached_curve(model, key) -> CostCurve:
    """The process's cost curve of ``model`` for ``key``."""
    return _per_model(model).setdefault(key, CostCurve())


def clear_cost_curves() -> None:
    """Forget every measured cost curve (the next planned solve probes again)."""
    _CURVES.clear()


@dataclass
class PlanStats:
    """What the planner measured and chose (``res.stats.plan``).

    ``curve``: {n images: seconds}, the cost curve after the solve; ``windows``: the window
    of each round (1 once serial); ``advances``: the steps each round froze;
    ``serial_from``: the step from which the solve ran the serial sampler (None: it did
    not); ``advance_scale``, ``advance_exponent``: the fitted c and g of a(W) = c * W**g; ``probe_seconds``: the
    timed calls on B images before the first round (0 with a cached t(B)), and
    ``probe_calls`` of them (counted in the solve's ``nfe``);
    ``projected``: seconds for the whole chain from the measured curve and the fitted
    advance, for ``"serial"``, ``"window W"`` (W = 5, 10, 20, 50), ``"whole chain"`` and
    ``"plan"`` (the rounds that ran, at the curve's cost); ``measured``: the seconds of the
    rounds and probes, as the planner's clock read them."""
    curve: Dict[int, float] = field(default_factory=dict)
    windows: List[int] = field(default_factory=list)
    advances: List[int] = field(default_factory=list)
    serial_from: Optional[int] = None
    advance_scale: float = float("nan")
    advance_exponent: float = float("nan")
    probe_seconds: float = 0.0
    probe_calls: int = 0
    projected: Dict[str, float] = field(default_factory=dict)
    measured: float = 0.0


class Planner:
    """``solve(..., window=Planner(...))``: ``window="auto"`` with settings.

    Args:
        clock: a function returning seconds (default ``time.perf_counter``); the rounds
            are timed with it, after the round's host read (on CUDA the model's work is
            done by then).
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
    def start(self, system, X: torch.Tensor) -> None:
        """Begin a solve of ``system`` from X [S, B, ...]: the curve (cached or new), and
        t(B) probed when unknown. Once per solve: a second call for the same system (the
        loop's, after ``solve`` asked before its initial guess) does nothing."""
        if getattr(self, "system", None) is system:
            return
        self.system = system
        self.S, self.B = X.shape[0], X.shape[1]
        # the system's kind too: an adjoint round (a VJP) costs more than a forward one
        key = (type(system).__name__, tuple(X.shape[2:]), X.dtype, str(X.device))
        model = getattr(system, "model", None)
        cache = _per_model(model) if (self.cache and model is not None) else {}
        self.curve = cache.setdefault(key, CostCurve())
        # the last solve of this chain kind and length: its rounds inform the advance fit
        chain = getattr(system, "chain", None)
        self._advance_key = (key, type(chain).__name__, self.S)
        self._advances = cache.setdefault(self._advance_key, [])
        self.remembered: List[Tuple[int, int]] = list(self._advances)
        self.stats = PlanStats()
        self.observed: List[Tuple[int, int]] = []      # (W, advance) of rounds with W >= 2
        self.rows: List[int] = []                      # the model call's rows, per round
        self.serial = False
        self._t0: Optional[float] = None
        if not self.curve.known(self.B):
            self.stats.probe_seconds = self.probe(system, X)

    def probe(self, system, X: torch.Tensor) -> float:
        """Time ``probe_calls`` model calls on B images (the state entering step 0)."""
        U = system.inputs(X, 0, 1)
        spent = 0.0
        for _ in range(self.probe_calls):
            t0 = self.clock()
            E = system.model_term(U, 0)
            _wait_for(E)
            dt = self.clock() - t0
            spent += dt
            self.stats.measured += dt
            self.stats.probe_calls += 1
            self.curve.add(self.B, dt)
        return spent

    def round_started(self) -> None:
        self._t0 = self.clock()

    def round_done(self, window: int, rows: int, advances: List[int]) -> None:
        """Record the rounds since ``round_started`` (one, or a ``check_every`` batch at
        one window): the window, the rows of each model call (window + shadow), the steps
        each round froze; each is charged an equal share of the time."""
        seconds = self.clock() - self._t0
        self.curve.add(rows * self.B, seconds / len(advances))
        self.stats.measured += seconds
        for advance in advances:
            self.stats.windows.append(window)
            self.stats.advances.append(advance)
            self.rows.append(rows)
            if window >= 2 and advance >= 1:
                self.observed.append((window, advance))


    def advance_fit(self) -> Tuple[float, float]:
        """(c, g) of a(W) = c * W**g (see ADVANCE_EXPONENT): ridge least squares on the
        log of the mean advance per window, weighted by its rounds, with the prior
        pseudo-round."""
        groups: Dict[int, List[float]] = {PRIOR_W: [PRIOR_ADVANCE * PRIOR_ROUNDS, PRIOR_ROUNDS]}
        for W, a in self.remembered + self.observed:
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
        return math.exp((sy - gamma * sx) / w0), gamma

    def advance(self, W: int, remaining: int, fit: Optional[Tuple[float, float]] = None) -> float:
        c, gamma = self.advance_fit() if fit is None else fit
        return min(max(1.0, c * W ** gamma), float(W), float(remaining))

    def candidates(self, remaining: int) -> List[int]:
        """Windows worth comparing: every W up to 8, then steps of about 12%, and the rest."""
        top = remaining if self.max_window is None else min(remaining, self.max_window)
        out, W = [], 1
        while W < top:
            out.append(W)
            W = W + 1 if W < 8 else max(W + 1, int(W * 1.125))
        out.append(top)
        return out

    def choose(self, lo: int, serial_at: int, shadow: bool, exact: bool = False) -> int:
        """The window for the steps from ``lo`` on, or ``SERIAL``: the serial sampler from
        step ``serial_at`` (the shadow's exact state; ``lo`` without a shadow). ``exact``:
        the freeze rule freezes exact states only (after a restart), one step a round."""
        remaining = self.S - lo
        t_step = self.curve(self.B)
        if exact and self.allow_serial:
            return SERIAL
        extra = 1 if shadow else 0
        limit = max(self.growth * self.curve.largest, (2 + extra) * self.B)
        fit = self.advance_fit()
        best_W, best_rate = 1, 0.0
        for W in self.candidates(remaining):
            n = (W + extra) * self.B
            if n > limit and W > 2:
                break
            rate = self.advance(W, remaining, fit) / self.curve(n)
            if rate >= best_rate:          # ties: the larger window (more steps a round)
                best_W, best_rate = W, rate
        if self.allow_serial and (self.S - serial_at) * t_step <= remaining / best_rate:
            return SERIAL
        return max(best_W, 1 if self.allow_serial else min(2, remaining))

    def went_serial(self, step: int) -> None:
        self.serial = True
        self.stats.serial_from = step

    def finish(self) -> PlanStats:
        """The statistics: the curve, and the projections from it. Ends the solve."""
        self.system = None
        if self.observed:                      # the next solve of this chain starts from them
            self._advances[:] = self.observed
        st, curve, S, B = self.stats, self.curve, self.S, self.B
        st.curve = {n: curve.samples[n] for n in sorted(curve.samples)}
        fit = self.advance_fit()
        st.advance_scale, st.advance_exponent = fit
        st.projected = {"serial": S * curve(B)}
        for W in (5, 10, 20, 50, S):
            if W > S:
                continue
            rounds = S / self.advance(W, S, fit)
            name = "whole chain" if W == S else f"window {W}"
            st.projected[name] = rounds * curve((W + 1) * B)
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
           "cached_curve", "clear_cost_curves"]
