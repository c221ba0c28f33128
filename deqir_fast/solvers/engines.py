"""Round engines: where a round's work runs. They evaluate a window (the model call,
the linearised scan, the residuals) and apply the update the loop decided; every
decision is ``loop.FixedPointLoop``'s. ``distributed.ShardedEngine`` is the third.

An engine's interface (all take the loop first):
``bind`` (once, before the first round), ``context(lo, hi)`` (the rule's
``RoundContext``), and for the rounds: ``evaluate`` -> (residuals on the host [hi-lo]
float64, the shadow's deviation or None) and ``apply(n_done)`` (host decisions), or
``run_batch(n_rounds)`` -> ``BatchRecord`` (``batched`` engines); ``diverged(k)``,
``first_nonfinite`` (batched engines: the first non-finite state of the window),
``take_serial``/``put_serial``/``take_serial_carry`` (the serial shadow's states go in),
the planner's (``call_rows``, ``agreed_seconds``, ``planner_sync``, ``planner_kind``,
``gather_states``, ``run_serial``), ``enter`` (start
values of steps entering a sliding window), ``move`` (the window moved), ``call_back``,
``release`` and ``finish``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from ..ops import step_residuals
from .policy import enter_steps, freeze_count, freeze_levels
from .rules import Picard, RoundContext


def default_engine(options):
    """The single-process engine for ``options``."""
    if options.check_every != 1 or options.cuda_graph:
        return ReadbackEngine()
    return EagerEngine()


class _LocalEngine:
    """What the two single-process engines share: the whole window is one block."""

    batched = False

    def bind(self, loop) -> None:
        system = loop.system
        self.fused = callable(getattr(system, "round_and_residuals", None))  # F(X) and r in one op
        # the window's last model output starts the steps entering it (enter_steps)
        self.keep_last = (loop.w < loop.S or loop.planner is not None) and hasattr(system, "extend")
        self.e_last: Optional[torch.Tensor] = None

    def context(self, loop, lo: int, hi: int) -> RoundContext:
        # rows: this window's steps (later windows only lose steps at the front)
        return RoundContext(lo, hi, lo, hi, rows=max(1, hi - lo), like=loop.X[0])

    def scan_and_residuals(self, loop, U: torch.Tensor, E: torch.Tensor):
        """(F(X), residuals on the device, G = F(X) - X or None) of the window."""
        system, X, lo, hi = loop.system, loop.X, loop.lo, loop.hi
        if self.fused:
            FX, r = system.round_and_residuals(E, U, X[hi - 1], lo, hi, loop.lin,
                                               loop.scale_dev[lo:hi])
            return FX, r, None
        FX = system.scan(E, U, lo, hi, loop.lin.jacobian(lo, hi))     # [hi-lo, B, ...]
        G = FX - X[lo:hi]
        return FX, step_residuals(G).to(torch.float64) * loop.scale_dev[lo:hi], G

    def model_call(self, loop):
        """(U, ē(U), ē of the shadow's state or None): the round's one model call."""
        if loop.shadow is not None:
            return loop.shadow.inputs_and_model_term(loop.X, loop.lo, loop.hi)
        U = loop.system.inputs(loop.X, loop.lo, loop.hi)
        return U, loop.system.model_term(U, loop.lo), None

    # -- what the planner (window="auto") asks of an engine ------------------------------------
    def call_rows(self, loop, lo: int, W: int) -> int:
        """The rows of a round's model call at window W from ``lo``: W, the shadow's and
        an order-2 chain's previous step."""
        return W + (loop.shadow is not None) + (getattr(loop.system, "order", 1) == 2 and lo > 0)

    def agreed_seconds(self) -> Optional[float]:
        """A round's time agreed across processes (None: the planner's clock decides)."""
        return None

    def previous_rows(self, loop) -> int:
        """The order-2 rows the solve's model calls took (``ChainSystem.previous_rows``)."""
        return getattr(loop.system, "previous_rows", 0)

    def planner_sync(self, X: torch.Tensor):
        return None

    def planner_kind(self) -> tuple:
        return ()

    def take_serial_carry(self, loop, p: int) -> None:
        """The serial shadow's current state (the serial one after step p) into X[p]; for
        an order-2 chain its previous one into X[p - 1] as well."""
        loop.X[p] = loop.shadow.u
        if loop.shadow.order == 2 and p > 0:
            loop.X[p - 1] = loop.shadow.u_prev

    def gather_states(self, loop) -> None:
        """Every state where the serial sampler (or a one-step window) can read it."""

    def run_serial(self, loop, start: int, stop: int, step_done) -> None:
        """The serial sampler for steps start..stop-1 into X (``ChainSystem.serial``)."""
        loop.system.serial(step_done, start=start, stop=stop, states=loop.X)

    def enter(self, loop, start: int, end: int, from_last_output: bool) -> None:
        enter_steps(loop.system, loop.X, self.e_last if from_last_output else None, start, end)

    def move(self, loop, lo: int, hi: int, restart: bool = False) -> None:
        pass

    def call_back(self, loop, callback, payload: dict) -> None:
        callback(payload)

    def finish(self, loop) -> None:
        pass


class EagerEngine(_LocalEngine):
    """One round at a time: the residuals (and the shadow's deviation) read back every
    round, in one transfer."""

    def bind(self, loop) -> None:
        super().bind(loop)
        self.FX: Optional[torch.Tensor] = None
        self.G: Optional[torch.Tensor] = None

    def evaluate(self, loop, p: int, compare: bool):
        U, E, e_shadow = self.model_call(loop)
        loop.lin.observe(loop.lo, loop.hi, U, E)
        self.FX, r, self.G = self.scan_and_residuals(loop, U, E)
        if e_shadow is not None:
            r = torch.cat([r, loop.shadow.advance(e_shadow, loop.X, p, compare=compare)])
        r = r.to("cpu")                                           # the round's sync
        self.e_last = E[-1:].clone() if self.keep_last else None
        if e_shadow is None:
            return r, None
        return r[:-1], float(r[-1])

    def apply(self, loop, n_done: int) -> None:
        X, lo, hi, FX = loop.X, loop.lo, loop.hi, self.FX
        if n_done < hi - lo:
            G = self.G
            if G is None and loop.update.uses_residual:
                G = FX - X[lo:hi]
            X[lo:hi] = loop.call_rule(X[lo:hi], FX, G, self.context(loop, lo, hi))
        else:
            X[lo:hi] = FX
        X[lo:lo + n_done] = FX[:n_done]

    def diverged(self, loop, k: int) -> None:
        """Steps k.. of the window restart from F(X) of step k - 1, the last finite one."""
        self.FX[k:] = self.FX[k - 1]
        self.G = self.FX - loop.X[loop.lo:loop.hi]

    def take_serial(self, loop, p: int, q: Optional[int] = None) -> None:
        loop.X[p] = loop.shadow.u

    def put_serial(self, loop, p: int, q: Optional[int] = None) -> None:
        """A restart's carry: the shadow's state at p (an order-2 chain's at p - 1 too)."""
        self.take_serial_carry(loop, p)

    def release(self) -> None:
        self.FX = self.G = None


@dataclass
class BatchRecord:
    """What one read-back of ``check_every`` rounds brings to the host: each round's
    residuals [n, W] (float64), the frozen count before each round and after the last
    [n + 1], the shadow's deviation per round [n] (NaN-free where it stepped finitely),
    and the first round whose shadow state is not finite (None: all finite)."""
    residuals: torch.Tensor
    frozen: torch.Tensor
    deviations: Optional[torch.Tensor] = None
    shadow_failed: Optional[int] = None


class ReadbackEngine(_LocalEngine):
    """``check_every`` rounds between two host reads: the window stays put and the freeze
    rule (``policy.freeze_count``) runs on the device, where a counter of leading frozen
    steps grows by at least one per round (the first unfrozen step's input is exact),
    and further while the steps before have met ``tol * freeze_ratio``; it is the whole
    window once every step met ``tol`` (the last window) or ``tol * freeze_ratio`` (a
    window with steps after it). Frozen steps take F(X), the others the rule's update.
    The cost: frozen steps stay in the batched model call until the next read (``nfe``
    counts them), and the guard acts up to k - 1 rounds late. The serial shadow keeps its
    state of each round of the batch (one item state each) for the read-back.

    With ``cuda_graph`` (CUDA, Picard): the first round after each read runs eagerly (it
    warms up allocations and the kernels' validation) and the next is captured in a CUDA
    graph with static buffers (the window's slice of X, device counters), then replayed
    for the remaining rounds before the read. A model or linearisation that cannot be
    captured falls back to eager rounds (``stats.graph_rounds`` counts the replays).
    Only Picard's update is captured (Anderson's host bookkeeping is not capturable)."""

    batched = True

    def bind(self, loop) -> None:
        super().bind(loop)
        dev = loop.X.device
        self.use_graph = bool(loop.options.cuda_graph) and dev.type == "cuda"

    def run_batch(self, loop, n_rounds: int) -> BatchRecord:
        X, lo, hi = loop.X, loop.lo, loop.hi
        W, dev = hi - lo, X.device
        self.frozen = torch.zeros((), dtype=torch.int64, device=dev)   # leading frozen steps
        self.q = torch.zeros((), dtype=torch.int64, device=dev)        # round index in the batch
        self.r_hist = torch.full((n_rounds, W), float("nan"), dtype=torch.float64, device=dev)
        self.f_hist = torch.zeros((n_rounds + 1,), dtype=torch.int64, device=dev)
        self.levels = freeze_levels(loop.tol, loop.freeze_ratio, last=hi == loop.S)
        self.e_last = X.new_empty((1, *X.shape[1:])) if self.keep_last else None
        self.shadow_hist = X.new_empty((n_rounds, *X.shape[1:])) if loop.shadow is not None else None
        # an order-2 restart also takes the state before the first one it puts in
        self.shadow_before = loop.shadow.u.clone() if (
            loop.shadow is not None and loop.shadow.order == 2) else None
        done = 0
        if self.use_graph and isinstance(loop.update, Picard) and n_rounds > 1:
            done = _graph_rounds(lambda: self.one_round(loop), n_rounds, loop.stats)
        for _ in range(done, n_rounds):
            self.one_round(loop)
        return self.read_back(loop, n_rounds)

    def one_round(self, loop) -> None:
        """A round with no host sync (capturable): the model call, the scan, the freeze
        rule on the device and the update."""
        X, lo, hi = loop.X, loop.lo, loop.hi
        W = hi - lo
        U, E, e_shadow = self.model_call(loop)
        if e_shadow is not None:
            loop.shadow.step(e_shadow)
            self.shadow_hist.index_copy_(0, self.q.view(1), loop.shadow.u[None])
        loop.lin.observe(lo, hi, U, E)                   # no host sync: capturable
        if self.e_last is not None:
            self.e_last.copy_(E[-1:])
        FX, r, G = self.scan_and_residuals(loop, U, E)
        self.r_hist.index_copy_(0, self.q.view(1), r.view(1, W))
        f_new = freeze_count(r, self.frozen, *self.levels)
        if not loop.update.uses_residual:
            G = None                    # not held through the update (one state less)
        elif G is None:
            G = FX - X[lo:hi]
        new = loop.call_rule(X[lo:hi], FX, G, self.context(loop, lo, hi))
        pos = torch.arange(W, device=X.device)
        X[lo:hi] = torch.where((pos < f_new).view((W,) + (1,) * (X.dim() - 1)), FX, new)
        self.frozen.copy_(f_new)
        self.q.add_(1)
        self.f_hist.index_copy_(0, self.q.view(1), f_new.view(1))

    def read_back(self, loop, n_rounds: int) -> BatchRecord:
        """One host read per batch: residual rows, freeze counts and the shadow's states
        against X's frozen ones (compared by the loop only where the step was frozen
        before the round: a frozen step is recomputed every round of the batch from
        frozen inputs, and the value read back here is the one the solve keeps)."""
        read = [self.r_hist.flatten(), self.f_hist.to(torch.float64)]   # counts < 2^53: exact
        if self.shadow_hist is not None:
            p0 = loop.stats.iterations
            read.append(loop.shadow.deviation(loop.X, p0, self.shadow_hist))
            read.append(torch.isfinite(self.shadow_hist).flatten(1).all(1).to(torch.float64))
        host = torch.cat(read).to("cpu").split([t.numel() for t in read])
        rec = BatchRecord(host[0].view_as(self.r_hist), host[1].to(torch.int64))
        if self.shadow_hist is not None:
            rec.deviations = host[2]
            bad = (host[3] == 0).nonzero()
            rec.shadow_failed = int(bad[0, 0]) if bad.numel() else None
        return rec

    def first_nonfinite(self, loop) -> Optional[int]:
        """The first step of the window whose state is not finite (divergence), or None."""
        finite = torch.isfinite(loop.X[loop.lo:loop.hi]).flatten(1).all(1).to("cpu")
        return None if bool(finite.all()) else int((~finite).nonzero()[0, 0])

    def diverged(self, loop, k: int) -> None:
        X, lo, hi = loop.X, loop.lo, loop.hi
        X[lo + k:hi] = X[lo + k - 1]

    def take_serial(self, loop, p: int, q: int) -> None:
        loop.X[p] = self.shadow_hist[q]

    def put_serial(self, loop, p: int, q: int) -> None:
        """The bad step's and every later state the shadow took in the batch (each is the
        serial one): the restart starts after the last; for an order-2 chain the state
        before the bad step's too (the shadow's, from this batch or from before it)."""
        loop.X[p:p + self.shadow_hist.shape[0] - q] = self.shadow_hist[q:]
        if self.shadow_before is not None and p > 0:
            loop.X[p - 1] = self.shadow_hist[q - 1] if q > 0 else self.shadow_before

    def release(self) -> None:
        pass


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


__all__: List[str] = ["default_engine", "EagerEngine", "ReadbackEngine", "BatchRecord"]
