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

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from ._checks import raise_nonfinite
from .ops import step_residuals
from .ops.anderson import AndersonRing, DifferenceRing

# Leading steps freeze once the steps before them meet FREEZE_RATIO * tol. Freezing at
# tol itself locks in errors that the chain then carries to x0: on the bundled model,
# DDIM-100 with the Gaussian J stopped 2.3e-2 off serial (over 2/255) at tol 3e-3.
# (bench/RESULTS.md §8, "The stopping rule").
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

    uses_residual = True            # whether __call__ reads G (Picard does not)

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

    uses_residual = False

    def __call__(self, X, FX, G):
        return FX


def check_history_dtype(dtype) -> Optional[torch.dtype]:
    """None (the history in the state dtype) or a floating torch dtype."""
    if dtype is None:
        return None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"history_dtype must be None or a floating torch.dtype (e.g. "
                        f"torch.bfloat16), got {dtype!r}")
    return dtype


@register_solver("anderson")
class Anderson(Update):
    """Anderson acceleration with one set of weights per (step, batch item): history
    ``history``, regularisation ``anderson_reg`` (relative to the largest residual
    norm), damping ``anderson_damping`` (Walker & Ni 2011; DeqIR, DEQ-DDIM)."""

    prefix = False
    uses_residual = False           # G = F(X) - X is written straight into the ring

    def __init__(self, history: int = 4, anderson_reg: float = 1e-4,
                 anderson_damping: float = 1.0, history_dtype: Optional[torch.dtype] = None,
                 **options):
        self.history, self.reg, self.damping = history, anderson_reg, anderson_damping
        # history_dtype: keep the history as differences in that dtype (DifferenceRing,
        # e.g. bfloat16: 3.5 stacked states for history 4 instead of 8)
        self.history_dtype = check_history_dtype(history_dtype)
        # The history lives in a preallocated ring (ops/anderson.py): entries are indexed
        # by absolute step, so frozen steps leave and new steps enter without re-stacking,
        # and each round adds one Gram row instead of recomputing the m x m matrices.
        self.ring: Optional[AndersonRing] = None
        self.lo = 0                     # absolute step of the window's first row

    def __call__(self, X, FX, G):
        W = X.shape[0]
        if self.history_dtype is not None:
            if self.ring is None or W > self.ring.rows:
                self.ring = DifferenceRing(self.history, W, X[0], self.history_dtype)
            return self.ring.update(self.lo, self.lo + W, X, FX, reg=self.reg,
                                    damping=self.damping, prefix=self.prefix)
        if self.ring is None or W > self.ring.rows:
            # The first window is the widest (later ones only lose steps at the front or
            # are cut at S), so it sizes the ring.
            self.ring = AndersonRing(self.history, W, X[0])
        self.ring.push(self.lo, self.lo + W, X, FX=FX)
        # The ring holds copies of the entries, so the mix can overwrite X in place
        # (one stacked state less at the peak; bench/round.py --memory).
        # (The first active step needs no special case: it always freezes at F(X).)
        return self.ring.mix(self.lo, self.lo + W, reg=self.reg, damping=self.damping,
                             prefix=self.prefix, out=X)

    def drop(self, n):
        self.lo += n

    def forget(self):
        if self.ring is not None:
            self.ring.forget()


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


def steps_to_freeze(r: torch.Tensor, tol: float, freeze_ratio: float, last: bool = True) -> int:
    """How many leading steps of the window freeze at F(X) after a round with residuals r.

    All of them when every step meets tol and the window ends the chain (``last``: the
    stopping rule), or every step meets tol * freeze_ratio (a window with steps after it:
    accepting it at tol would freeze tol-sized errors that the steps after it amplify,
    1.2e-2 off serial on DDIM-100 with a window of 20 and the extended start, RESULTS
    §8 "Sliding windows"). Else the leading
    steps whose inputs are exact: F(X)[j] is exact when every input before it was (the
    window's first input is frozen), i.e. within tol * freeze_ratio once the residuals
    of the steps before j are. A step's own small residual proves nothing: an iterate
    can be consistent with a wrong input. At least one step freezes per round."""
    W = r.shape[0]
    if bool((r <= (tol if last else tol * freeze_ratio)).all()):
        return W
    met = r <= tol * freeze_ratio
    n_done = 1
    while n_done < W and bool(met[n_done - 1]):
        n_done += 1
    return n_done


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
    serial one. Only the current state is kept (one item state, [B, ...])."""

    def __init__(self, system, X: torch.Tensor, scale_dev: torch.Tensor):
        self.system = system
        self.u = system.carry(X, 0).clone()          # the serial state entering step p
        self.p = torch.zeros(1, dtype=torch.int64, device=X.device)
        self.scale = scale_dev

    def inputs_and_model_term(self, X: torch.Tensor, lo: int, hi: int):
        """(U, ē(U), ē of the shadow's state) for the window [lo, hi): one model call."""
        return self.system.inputs_and_model_term_with_shadow(X, lo, hi, self.u, self.p)

    def step(self, e: torch.Tensor) -> None:
        """Take the shadow's step p with its model output e and move p on."""
        # in place, so that a captured round (cuda_graph) reads and writes the same buffers
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
    """What every loop does first when the serial shadow finds frozen state ``step`` off
    the serial one: record it and drop the secant's round history (its last two rounds
    straddle the restart; the slopes stay). The loop then puts the shadow's state(s) in,
    restarts the window after the last of them with a fresh update rule and tol = 0, i.e.
    freezes exact states only (docs/design.md §3d)."""
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


def fixed_point_solve(system, X: torch.Tensor, *, solver: str = "picard",
                      linearize: str = "secant", tol: float = 3e-3, floor: float = 0.1,
                      max_iter: Optional[int] = None, window: Optional[int] = None,
                      freeze_ratio: float = FREEZE_RATIO, callback: Optional[Callable] = None,
                      initial_nfe: int = 0, check_every: int = 1, cuda_graph: bool = False,
                      serial_shadow: bool = True, **options):
    """Solve X = F(X) for a triangular system: a ``ChainSystem`` (the sampler) or an
    ``AdjointSystem`` (its gradient), anything with ``num_steps``, ``residual_scale``,
    ``inputs``, ``model_term``, ``scan`` and ``linearization``. X: [S, B, ...], updated
    in place and returned with the ``SolverStats``. ``options`` go to the update rule
    (``history``, ``anderson_reg``, ``anderson_damping``).

    ``check_every`` = k > 1 keeps the window and the freeze bookkeeping on the device
    and reads the residuals back once every k rounds (``_solve_checking_every``);
    ``cuda_graph`` (CUDA, with k > 1) also replays the rounds between two reads from a
    captured CUDA graph. k = 1 (the default) is the loop below, one read per round.

    ``serial_shadow`` runs the serial sampler alongside, one step per round in the same
    model call (``SerialShadow``), and compares every frozen state with it: a frozen
    state more than ``tol`` noise units off means the chain amplifies the residuals the
    freeze rule accepts; the solve then restarts after the shadow's last step and
    freezes exact states only (``stats.serial_mismatch``; still at most S rounds)."""
    if check_every != 1 or cuda_graph:
        return _solve_checking_every(system, X, solver=solver, linearize=linearize, tol=tol,
                                     floor=floor, max_iter=max_iter, window=window,
                                     freeze_ratio=freeze_ratio, callback=callback,
                                     initial_nfe=initial_nfe, check_every=check_every,
                                     cuda_graph=cuda_graph, serial_shadow=serial_shadow,
                                     **options)
    update = SOLVERS[check_solver(solver)](**options)
    lin = system.linearization(linearize)
    S = system.num_steps
    max_iter = S if max_iter is None else max_iter
    w = S if window is None else min(window, S)
    scale = system.residual_scale(floor)                          # [S] float64, host
    scale_dev = scale.to(X.device)
    fused = callable(getattr(system, "round_and_residuals", None))   # F(X) and r in one op
    stats = SolverStats(nfe=initial_nfe, linearization=lin)   # nfe: the initial guess's
    shadow = SerialShadow(system, X, scale_dev) if shadow_applies(
        system, tol, freeze_ratio, serial_shadow) else None
    lo, hi = 0, w
    filled = hi                 # steps below this hold an iterate (no entering start needed)
    prev_r: Optional[torch.Tensor] = None                         # last round's, by step
    while stats.iterations < max_iter:
        if shadow is not None:
            U, E, e_shadow = shadow.inputs_and_model_term(X, lo, hi)
        else:
            U = system.inputs(X, lo, hi)
            E = system.model_term(U, lo)
        lin.observe(lo, hi, U, E)
        if fused:
            FX, r = system.round_and_residuals(E, U, X[hi - 1], lo, hi, lin, scale_dev[lo:hi])
            G = None                                              # F(X) - X, when needed
        else:
            FX = system.scan(E, U, lo, hi, lin.jacobian(lo, hi))   # [hi-lo, B, ...]
            G = FX - X[lo:hi]
            r = step_residuals(G).to(torch.float64) * scale_dev[lo:hi]
        p = stats.iterations                                      # the shadow's step
        # only a frozen state is final: an unfrozen one is still allowed to be off serial
        compare = p < lo
        if shadow is not None:
            r = torch.cat([r, shadow.advance(e_shadow, X, p, compare=compare)])
            del e_shadow
        r = r.to("cpu")                                           # the round's sync
        deviation = None
        if shadow is not None:
            r, deviation = r[:-1], float(r[-1])
        # the window's last model output starts the steps entering it (enter_steps)
        e_last = E[-1:].clone() if (w < S and hasattr(system, "extend")) else None
        # U and E are spent: release them before the update allocates its own temporaries
        # (bench/round.py --memory).
        del U, E
        if deviation is not None and not math.isfinite(deviation):
            raise_nonfinite(p)            # the serial sampler's own step p fails
        if deviation is not None and compare:
            note_deviation(stats, p, deviation)
        if deviation is not None and compare and not deviation <= tol:
            # Frozen state p is off the serial one by more than tol: the chain amplifies
            # what the freeze rule accepts (docs/design.md §3d). Restart from the shadow's
            # exact state and freeze only states equal to the serial ones (tol = 0): the
            # front still moves at least one step per round, so S rounds still suffice.
            row = record_round(stats, r, lo, hi, S)
            stats.nfe += 1
            begin_exact_restart(stats, lin, p)
            X[p] = shadow.u
            if callback is not None:
                callback({"iteration": stats.iterations, "window": (lo, hi), "residuals": row,
                          "nfe": stats.nfe, "state": X})
            shadow, tol, prev_r = None, 0.0, None
            update = SOLVERS[solver](**options)
            lo, hi = p + 1, min(p + 1 + w, S)     # p < lo <= S - 1: steps remain
            update.drop(lo)
            del FX, G
            continue
        if shadow is not None:
            stats.nfe += 1                # the shadow's step evaluation
            if p < lo - 1:                # frozen and no longer read (lo - 1 is the carry):
                X[p] = shadow.u           # the returned state is the serial one
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
            switch_off_jacobian(lin, stats)
        elif lin.active and guard_tripped(r, prev_r, lo, hi):
            switch_off_jacobian(lin, stats)
        row = prev_r = record_round(stats, r, lo, hi, S)
        n_done = steps_to_freeze(r, tol, freeze_ratio, last=hi == S)
        if n_done < hi - lo:
            if G is None and update.uses_residual:
                G = FX - X[lo:hi]
            X[lo:hi] = update(X[lo:hi], FX, G)
        else:
            X[lo:hi] = FX
        X[lo:lo + n_done] = FX[:n_done]
        if callback is not None:
            callback({"iteration": stats.iterations, "window": (lo, hi), "residuals": row,
                      "nfe": stats.nfe, "state": X})
        # Release the round's buffers before the next round allocates its own: else the
        # peak holds two rounds' U, E and F(X) (measured: 4 stacked states for Picard
        # with J off instead of 3; bench/round.py --memory).
        del FX, G
        if n_done == hi - lo and hi == S:
            stats.converged = True
            break
        new_lo = lo + n_done
        new_hi = min(new_lo + w, S)
        if new_hi > filled:
            # steps below ``filled`` kept their iterates across a restart (serial shadow)
            enter_steps(system, X, e_last if hi == filled else None, filled, new_hi)
            filled = new_hi
        update.drop(n_done)
        lo, hi = new_lo, new_hi
    return X, stats


def _solve_checking_every(system, X, *, solver, linearize, tol, floor, max_iter, window,
                          freeze_ratio, callback, initial_nfe, check_every, cuda_graph,
                          serial_shadow=True, **options):
    """``fixed_point_solve`` reading the residuals back once every ``check_every`` rounds.

    Between two reads the window [lo, hi) stays put and the freeze rule runs on the
    device: a device counter f of leading frozen steps grows by at least one per round
    (the first unfrozen step's input is exact), and further while the steps before have
    met ``tol * freeze_ratio``; f = W when every step of the window met ``tol`` (the
    last window) or ``tol * freeze_ratio`` (a window with steps after it). Frozen
    steps take F(X), the others the solver's update. At each read: the rounds' residual
    rows are recorded (NaN where a step was frozen), the linearisation guard and the
    divergence restart are applied, ``callback`` is called for each round, and the
    window slides by f. So S rounds still reach the serial answer exactly, and
    ``converged`` is only set when every step was frozen. The cost: frozen steps stay in
    the batched model call until the next read (``nfe`` counts them), and the guard acts
    up to k - 1 rounds late. The serial shadow keeps its state of each round of the batch
    (one item state each) and is compared at the read; a restart puts all the batch's
    shadow states in and restarts after the last of them, so the window's front stays
    at or past the round count and S rounds still suffice.

    ``cuda_graph``: on CUDA, the first round after each read runs eagerly (it warms up
    allocations and the kernels' validation) and the next is captured in a CUDA graph
    with static buffers (the window's slice of X, device counters), then replayed for
    the remaining rounds before the read. A model or linearisation that cannot be
    captured falls back to eager rounds (``stats.graph_rounds`` counts the replays).
    Only Picard's update is captured (Anderson's host bookkeeping is not capturable)."""
    if not (isinstance(check_every, int) and check_every >= 1):
        raise ValueError(f"check_every must be an int >= 1, got {check_every!r}")
    update = SOLVERS[check_solver(solver)](**options)
    lin = system.linearization(linearize)
    S = system.num_steps
    max_iter = S if max_iter is None else max_iter
    w = S if window is None else min(window, S)
    dev = X.device
    scale = system.residual_scale(floor)
    scale_dev = scale.to(dev)
    fused = callable(getattr(system, "round_and_residuals", None))
    use_graph = bool(cuda_graph) and dev.type == "cuda" and isinstance(update, Picard)
    stats = SolverStats(nfe=initial_nfe, linearization=lin)
    shadow = SerialShadow(system, X, scale_dev) if shadow_applies(
        system, tol, freeze_ratio, serial_shadow) else None
    lo, hi = 0, w
    filled = hi
    prev_row: Optional[torch.Tensor] = None
    while stats.iterations < max_iter:
        W = hi - lo
        # At most W rounds between reads: each round freezes at least one more step of the
        # window, so no round is spent on a window already frozen whole, and every round
        # still pays for at least one frozen step: S rounds always suffice.
        n_rounds = min(check_every, W, max_iter - stats.iterations)
        pos = torch.arange(W, device=dev)
        shape = (W,) + (1,) * (X.dim() - 1)
        frozen = torch.zeros((), dtype=torch.int64, device=dev)   # leading frozen steps
        q_dev = torch.zeros((), dtype=torch.int64, device=dev)    # round index in the batch
        r_hist = torch.full((n_rounds, W), float("nan"), dtype=torch.float64, device=dev)
        f_hist = torch.zeros((n_rounds + 1,), dtype=torch.int64, device=dev)
        thr = tol * freeze_ratio
        accept = tol if hi == S else thr             # see steps_to_freeze
        e_last = X.new_empty((1, *X.shape[1:])) if (w < S and hasattr(system, "extend")) else None
        if shadow is not None:      # the shadow's states of the batch's rounds
            shadow_hist = X.new_empty((n_rounds, *X.shape[1:]))

        def one_round():
            if shadow is not None:
                U, E, e_shadow = shadow.inputs_and_model_term(X, lo, hi)
                shadow.step(e_shadow)
                shadow_hist.index_copy_(0, q_dev.view(1), shadow.u[None])
            else:
                U = system.inputs(X, lo, hi)
                E = system.model_term(U, lo)
            lin.observe(lo, hi, U, E)                   # no host sync: capturable
            if e_last is not None:
                e_last.copy_(E[-1:])
            if fused:
                FX, r = system.round_and_residuals(E, U, X[hi - 1], lo, hi, lin, scale_dev[lo:hi])
            else:
                FX = system.scan(E, U, lo, hi, lin.jacobian(lo, hi))
                r = step_residuals(FX - X[lo:hi]).to(torch.float64) * scale_dev[lo:hi]
            r_hist.index_copy_(0, q_dev.view(1), r.view(1, W))
            # the freeze rule of fixed_point_solve, on the device
            met = (r <= thr) | (pos < frozen)
            lead = torch.cumprod(met[:-1].to(torch.int64), 0).sum() if W > 1 else frozen * 0
            f_new = torch.where((r <= accept).all(), torch.full_like(frozen, W),
                                torch.clamp(torch.maximum(1 + lead, frozen + 1), max=W))
            new = update(X[lo:hi], FX, FX - X[lo:hi] if update.uses_residual else None)
            X[lo:hi] = torch.where((pos < f_new).view(shape), FX, new)
            frozen.copy_(f_new)
            q_dev.add_(1)
            f_hist.index_copy_(0, q_dev.view(1), f_new.view(1))

        done_rounds = 0
        if use_graph and n_rounds > 1:
            done_rounds = _graph_rounds(one_round, n_rounds, stats)
        for _ in range(done_rounds, n_rounds):
            one_round()
        # -- the read-back: one host sync per check_every rounds --------------------------
        p0 = stats.iterations                       # the shadow's step in the batch's round 0
        read = [r_hist.flatten(), f_hist.to(torch.float64)]   # counts < 2^53: exact
        if shadow is not None:
            # each round's shadow state against X's state at its step, compared below only
            # where that step was frozen before the round: a frozen step is recomputed
            # every round of the batch from frozen inputs, and the value read back here is
            # the one the solve keeps
            read.append(shadow.deviation(X, p0, shadow_hist))
            read.append(torch.isfinite(shadow_hist).flatten(1).all(1).to(torch.float64))
        host = torch.cat(read).to("cpu").split([t.numel() for t in read])
        r_host, f_host = host[0].view_as(r_hist), host[1].to(torch.int64)
        if shadow is not None:
            dev_host = host[2]
            bad_shadow = (host[3] == 0).nonzero()
            if bad_shadow.numel():          # the serial sampler's own step fails there
                raise_nonfinite(p0 + int(bad_shadow[0, 0]))
        for q in range(n_rounds):
            stats.iterations += 1
            stats.nfe += W
            rq = r_host[q].clone()
            rq[:int(f_host[q])] = float("nan")              # frozen before this round
            row = torch.full((S,), float("nan"), dtype=torch.float64)
            row[lo:hi] = rq
            stats.residuals.append(row)
            first = int(f_host[q])
            bad = ~torch.isfinite(r_host[q, first:])
            if bool(bad.any()):
                if int(bad.nonzero()[0, 0]) == 0:          # the first active step: the model
                    raise_nonfinite(lo + first)
            elif lin.active and guard_tripped(row[lo:hi], prev_row, lo, hi):
                switch_off_jacobian(lin, stats)
            prev_row = row
            if callback is not None:
                callback({"iteration": stats.iterations, "window": (lo, hi), "residuals": row,
                          "nfe": stats.nfe, "state": X})
        if shadow is not None:
            stats.nfe += n_rounds                       # the shadow's step evaluations
            # frozen before round q: below the window's front at the round's start
            frozen = [p0 + q < lo + int(f_host[q]) for q in range(n_rounds)]
            for q in range(n_rounds):
                if frozen[q]:
                    note_deviation(stats, p0 + q, float(dev_host[q]))
            over = [q for q in range(n_rounds) if frozen[q] and not float(dev_host[q]) <= tol]
            # the frozen states the shadow passed, no longer read (the carry is lo + f - 1),
            # take the serial values (as in fixed_point_solve)
            last_read = lo + int(f_host[-1]) - 1 if not over else S
            for q in range(over[0] if over else n_rounds):
                if frozen[q] and p0 + q < last_read:
                    X[p0 + q] = shadow_hist[q]
            if over:
                # a frozen state off the serial one (see fixed_point_solve): every state the
                # shadow took in this batch is the serial one, so restart after the last
                # (not after the bad one: the batch's later rounds are spent, and the front
                # must stay at or past the round count for S rounds to suffice), freezing
                # exact states only
                q = over[0]
                begin_exact_restart(stats, lin, p0 + q)
                X[p0 + q:p0 + n_rounds] = shadow_hist[q:]
                shadow, tol, prev_row = None, 0.0, None
                update = SOLVERS[solver](**options)
                lo, hi = p0 + n_rounds, min(p0 + n_rounds + w, S)
                update.drop(lo)
                if lo == S:
                    stats.converged = True
                    break
                if hi > filled:             # the restart can start past the old window
                    enter_steps(system, X, None, filled, hi)
                    filled = hi
                continue
        f = int(f_host[-1])
        finite = torch.isfinite(X[lo:hi]).flatten(1).all(1).to("cpu")
        if not bool(finite.all()):
            # Divergence (see fixed_point_solve): restart the steps from the last finite
            # state, forget the history, switch J off. Frozen steps are exact and finite.
            k = int((~finite).nonzero()[0, 0])
            if k == 0:
                raise_nonfinite(lo)
            X[lo + k:hi] = X[lo + k - 1]
            f = min(f, k)
            update.forget()
            switch_off_jacobian(lin, stats)
        if f == W and hi == S:
            stats.converged = True
            break
        new_lo = lo + f
        new_hi = min(new_lo + w, S)
        if new_hi > filled:
            enter_steps(system, X, e_last if hi == filled else None, filled, new_hi)
            filled = new_hi
        update.drop(f)
        lo, hi = new_lo, new_hi
    return X, stats


def _graph_rounds(one_round, n_rounds: int, stats) -> int:
    """Run ``n_rounds`` rounds: one eager (on a side stream, as CUDA graph capture needs
    a warmed-up, non-default stream), then one captured and replayed n_rounds - 1 times.
    Returns the rounds done; 1 when capture failed (the caller runs the rest eagerly)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        one_round()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            one_round()
    except Exception as exc:            # an uncapturable model or op: eager from here
        stats.graph_error = f"{type(exc).__name__}: {exc}"
        torch.cuda.synchronize()
        return 1
    for _ in range(n_rounds - 1):
        graph.replay()
        stats.graph_rounds += 1
    return n_rounds
