"""Step sharding across processes with torch.distributed (docs/design.md §6, issue #14).

``solve(..., process_group=pg)`` runs ``sharded_fixed_point_solve`` below instead of
``solvers.fixed_point_solve``: the same rounds, decisions and result, with the active
window's steps split into contiguous blocks, one per rank.

A round on rank k, block [a, b) of the window [lo, hi):

1. U = the block's inputs (U_0 = X[a-1], the previous block's last state, arrived at the
   end of the last round), E = the model on the block only (the expensive part), and the
   block's scan from its *old* carry U_0: F_i(U_0) and the residuals, with the system's
   own round (``ChainSystem.round_and_residuals``, the fused kernel where there is one).
2. The scan is elementwise affine in the carry: F_i(c) = F_i(U_0) + A_i ⊙ (c - U_0) with
   A_i = Π_{j<=i} (P_j + Q_j J_j). Every rank all-gathers its block's (A_last, G_last),
   G_last = F_last(U_0) - X_old[b-1]: two states per rank, not the window. The carry
   correction δ = c - U_0 then follows by an exclusive scan over the ranks before k,
   δ_{k+1} = G_k + A_k ⊙ δ_k, δ = 0 for the first block (its carry is frozen, exact).
   Working with δ rather than c keeps the composition's rounding on a quantity that
   vanishes at convergence, so the result matches the single-process solve to rounding
   of the corrections, not of the states; the first block is bit-for-bit the same.
3. F = F(U_0) + A ⊙ δ, residuals of the block; one all-gather of the per-step residual
   row (S floats, padded) with a status flag: the round's one host read. Every rank then
   takes the single-process solver's decisions (freeze, stop, guard, divergence restart,
   window slide) on the same row.
4. The update on the block: Picard X <- F; Anderson mixes per step with a history ring
   laid out like ``ops.anderson.AndersonRing`` (absolute steps, so a step can move to
   another rank with its history); triangular Anderson needs the prefix sum of the Gram
   matrices over the window's steps before its block: an exclusive scan of the blocks'
   [B, m, m] sums (all-gathered, tiny).
5. The window slides. ``rebalance`` (the default) keeps the active window evenly split,
   since steps freeze front to back and a static split leaves the first ranks idle: a
   rank whose block froze whole takes the steps entering at the back of a sliding
   window (so blocks follow the step order, not the rank order, and the scans above
   run in step order), and when the largest block still exceeds an even split's the
   boundaries move, the steps that change rank carrying their state, secant history
   and Anderson history along (point-to-point). Every rank then receives the state
   before its block (the next round's U_0). ``rebalance=False``: a static split of the
   S steps, for comparison (bench/sharding.py).

Gradients: the implicit-gradient backward of a sharded solve (``grad="ift"``, i.e.
``res.x0.backward()`` on every rank) solves the adjoint system sharded the same way
(``sharded_adjoint_gradients``; the parameters' VJPs are split over the ranks and summed).
``deqir_fast.backward(result, ...)`` is not sharded: it runs the single-process adjoint
on every rank (correct, since every rank holds all the states).

Data layout: every rank keeps a full-size [S, B, ...] buffer of states (like the
single-process solver; the model calls, scans and history are what is sharded), valid
on its block and the state before it. At the end one masked all-reduce fills in every
state from the rank that froze it, so x0, states and stats are on every rank.

Failures: an exception on one rank (the model, most likely) is kept; the rank carries on
through the round's collectives with dummy payloads and raises its flag in the residual
gather, where every rank sees it and raises ``ShardError`` naming the rank and the error.
Every collective is waited on with ``timeout`` seconds (``ShardConfig``), so a dead or
stuck peer gives a ``ShardError`` too, never a silent hang (the group is unusable after
a timeout: destroy it).
"""
from __future__ import annotations

import datetime
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

from ._checks import raise_nonfinite
from .ops import step_residuals
from .ops.anderson import AndersonRing, anderson_weights
from .solvers import (FREEZE_RATIO, SOLVERS, Anderson, Picard, SerialShadow, SolverStats,
                      TriangularAnderson, begin_exact_restart, check_solver, enter_steps,
                      guard_tripped, note_deviation, record_round, shadow_applies,
                      steps_to_freeze, switch_off_jacobian)

DEFAULT_TIMEOUT = 300.0          # seconds a collective may wait for the slowest peer


class ShardError(RuntimeError):
    """A rank of a sharded solve failed (or a peer timed out); raised on every rank."""


@dataclass
class ShardConfig:
    """What ``solve(..., process_group=...)`` accepts besides a bare process group.

    group: the ``torch.distributed`` process group (None: the default group);
    timeout: seconds any collective may wait before ``ShardError`` (a dead or stuck
    peer); rebalance: re-split the active window across ranks as steps freeze (False:
    a static split of the S steps, for comparison)."""
    group: object = None
    timeout: float = DEFAULT_TIMEOUT
    rebalance: bool = True


@dataclass
class ShardStats:
    """Per-rank accounting of a sharded solve (``result.stats.sharding``). Bytes are
    payload bytes: an all-gather counts this rank's payload once per other rank (what a
    ring all-gather forwards), a point-to-point send once."""
    rank: int = 0
    world: int = 1
    compute_seconds: float = 0.0      # local work: model calls, scans, updates
    wait_seconds: float = 0.0         # blocked in collectives (idle + transfer)
    bytes_sent: int = 0               # payload bytes this rank sent (all-gather: ×)
    bytes_window_gather: int = 0      # what gathering its block's states each round would send
    rebalances: int = 0
    migrated_steps: int = 0           # steps received from another rank (not counting halos)
    blocks: List[Tuple[int, int]] = field(default_factory=list)   # its block per round
    round_bytes: List[int] = field(default_factory=list)          # bytes_sent per round
    round_wait: List[float] = field(default_factory=list)         # wait_seconds per round
    round_compute: List[float] = field(default_factory=list)      # compute_seconds per round
    total_seconds: float = 0.0


def resolve(process_group) -> ShardConfig:
    """A ``ShardConfig`` from what ``solve`` was given; checks torch.distributed is up.
    Returns a new config (the caller's is not changed: a config the user keeps must not
    come to hold the default group, see ``GroupRef``)."""
    cfg = process_group if isinstance(process_group, ShardConfig) else ShardConfig(group=process_group)
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group given but torch.distributed is not initialised "
                         "(call torch.distributed.init_process_group, e.g. under torchrun)")
    group = dist.group.WORLD if cfg.group is None else cfg.group
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup or a "
                        f"deqir_fast.distributed.ShardConfig, got {type(group).__name__}")
    if not (isinstance(cfg.timeout, (int, float)) and cfg.timeout > 0):
        raise ValueError(f"timeout must be a number of seconds > 0, got {cfg.timeout!r}")
    return ShardConfig(group=group, timeout=cfg.timeout, rebalance=cfg.rebalance)


class GroupRef:
    """The process group of a finished sharded solve, held WEAKLY, for its backward.

    A result that held its group strongly kept the group's gloo worker threads alive past
    the user's ``destroy_process_group()``, into interpreter shutdown; a worker that was
    still releasing a finished collective then needed the GIL to free its tensors and
    aborted the process ("terminate called without an active exception": 1 rank in 4 to
    8 launches on 2 cores, issue #22; the core dump shows the worker in
    ~AsyncAllgatherWork, the main thread in Py_FinalizeEx). With the group dropped by
    ``destroy_process_group``, torch destroys it there, joining its workers first."""

    def __init__(self, cfg: ShardConfig):
        self._group = weakref.ref(cfg.group)
        self.timeout, self.rebalance = cfg.timeout, cfg.rebalance

    def config(self) -> ShardConfig:
        group = self._group()
        if group is None or not _is_live(group):
            raise ValueError("the process group of this sharded solve has been destroyed: "
                             "run the backward (res.x0.backward(), dq.backward) before "
                             "torch.distributed.destroy_process_group()")
        return ShardConfig(group=group, timeout=self.timeout, rebalance=self.rebalance)


def _is_live(group) -> bool:
    """Whether ``group`` is still registered with torch.distributed (not destroyed)."""
    if not dist.is_initialized():
        return False
    try:
        dist.get_rank(group)
    except (ValueError, RuntimeError):
        return False
    return True


def check_device(group, device: torch.device) -> str:
    """gloo moves CPU tensors, nccl CUDA tensors: refuse a mismatch up front rather than
    fail inside a collective."""
    backend = str(dist.get_backend(group)).lower()
    if backend == "gloo" and device.type != "cpu":
        raise ValueError(f"the process group's backend is gloo but the states are on {device}; "
                         "use an nccl group for CUDA tensors (or solve on the CPU)")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"the process group's backend is nccl but the states are on {device}; "
                         "use a gloo group for CPU tensors")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"sharded solves support the gloo and nccl backends, got {backend!r}")
    return backend


class _Comm:
    """The collectives of a sharded solve, each waited on with the timeout and timed."""

    def __init__(self, group, timeout: float, stats: ShardStats):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.timeout = datetime.timedelta(seconds=float(timeout))
        self.seconds = float(timeout)
        self.stats = stats
        self.failed: Optional[BaseException] = None      # this rank's pending error

    def _wait(self, works, what: str):
        t0 = time.perf_counter()
        try:
            for w in works if isinstance(works, list) else [works]:
                w.wait(timeout=self.timeout)
        except RuntimeError as e:
            raise ShardError(f"rank {self.rank}: {what} failed or timed out after "
                             f"{self.seconds:g} s (a peer raised, exited or is stuck): {e}") from e
        finally:
            self.stats.wait_seconds += time.perf_counter() - t0

    def all_gather(self, payload: torch.Tensor, what: str) -> torch.Tensor:
        """[R, n] from a 1-D payload of the same length on every rank."""
        out = payload.new_empty((self.size, payload.numel()))
        work = dist.all_gather(list(out.unbind(0)), payload.contiguous(), group=self.group,
                               async_op=True)
        self._wait(work, what)
        self.stats.bytes_sent += payload.numel() * payload.element_size() * (self.size - 1)
        return out

    def gather_checked(self, payload: torch.Tensor, what: str) -> torch.Tensor:
        """``all_gather`` with this rank's status in front, read back to the host (the
        round's one read); raises ShardError on every rank when any rank has a pending
        error. Returns the [R, n] payloads on the host."""
        status = payload.new_full((1,), 1.0 if self.failed is not None else 0.0)
        out = self.all_gather(torch.cat([status, payload.reshape(-1)]), what).to("cpu")
        flags = out[:, 0]
        if bool((flags != 0).any()):
            self.raise_failure(flags)
        return out[:, 1:]

    def raise_failure(self, flags):
        bad = [int(i) for i in (flags != 0).nonzero().flatten()]
        mine = None if self.failed is None else f"{type(self.failed).__name__}: {self.failed}"
        msgs = [None] * self.size
        try:        # best effort: the failing ranks' messages (every rank is here now)
            dist.all_gather_object(msgs, mine, group=self.group)
        except Exception:                              # noqa: BLE001 - report what we have
            msgs = [mine if i == self.rank else None for i in range(self.size)]
        text = "; ".join(f"rank {i} raised {msgs[i] or '(unknown error)'}" for i in bad)
        raise ShardError(f"sharded solve aborted on rank {self.rank}: {text}") from self.failed

    def broadcast(self, t: torch.Tensor, src: int, what: str) -> torch.Tensor:
        work = dist.broadcast(t, group=self.group, group_src=src, async_op=True)
        self._wait(work, what)
        if src == self.rank:
            self.stats.bytes_sent += t.numel() * t.element_size() * (self.size - 1)
        return t

    def exchange(self, sends, recvs, what: str):
        """Point-to-point: sends [(peer, tensor)], recvs [(peer, tensor)], posted in the
        same order on both sides (the transfer list every rank computes alike)."""
        ops = [dist.P2POp(dist.isend, t.contiguous(), group=self.group, group_peer=p)
               for p, t in sends]
        ops += [dist.P2POp(dist.irecv, t, group=self.group, group_peer=p) for p, t in recvs]
        if not ops:
            return
        self._wait(dist.batch_isend_irecv(ops), what)
        self.stats.bytes_sent += sum(t.numel() * t.element_size() for _, t in sends)


# -- partitions -------------------------------------------------------------------------

def even_split(lo: int, hi: int, R: int) -> List[Tuple[int, int]]:
    """[lo, hi) in R contiguous blocks whose sizes differ by at most one (larger first)."""
    W = hi - lo
    out, a = [], lo
    for k in range(R):
        n = W // R + (1 if k < W % R else 0)
        out.append((a, a + n))
        a += n
    return out


def static_split(lo: int, hi: int, S: int, R: int) -> List[Tuple[int, int]]:
    """The fixed split of all S steps, restricted to the window (no rebalancing)."""
    return [(min(max(a, lo), hi), max(min(b, hi), lo)) if a < hi and b > lo else (hi, hi)
            for a, b in even_split(0, S, R)]


def order_of(parts) -> List[int]:
    """The ranks with steps, in step order (blocks need not be in rank order: a rank whose
    block froze takes the steps entering at the back of a sliding window)."""
    return sorted((k for k, (a, b) in enumerate(parts) if b > a), key=lambda k: parts[k][0])


def split_in_order(lo: int, hi: int, ranks: List[int], R: int) -> List[Tuple[int, int]]:
    """[lo, hi) split evenly over ``ranks`` in that step order (list indexed by rank)."""
    sizes = even_split(lo, hi, len(ranks))
    out = [(hi, hi)] * R
    for k, (a, b) in zip(ranks, sizes):
        out[k] = (a, b)
    return out


def _owner_of(parts, s: int) -> int:
    for k, (a, b) in enumerate(parts):
        if a <= s < b:
            return k
    raise AssertionError(f"step {s} has no owner in {parts}")


def _max_block(parts) -> int:
    return max(b - a for a, b in parts)


# -- the solve ----------------------------------------------------------------------------

class _Ring(AndersonRing):
    """``AndersonRing`` with a mix that can take the prefix Gram sum of the window's
    steps before the block (triangular Anderson across ranks) and a push that only
    advances the history (a rank with no steps this round keeps the slot count of its
    peers, so every rank agrees on which slot is which entry)."""

    def skip(self):
        self.count += 1

    def mix_with(self, lo, hi, *, reg, damping, prefix, offset_fn, out):
        """As ``AndersonRing.mix``; with ``prefix``, ``offset_fn(block_sum)`` returns the
        sum of the masked Gram matrices of the window's steps before ``lo``."""
        slots = self.held()
        segs = self._segments(lo, hi)
        if len(slots) == 1:
            if prefix:
                offset_fn(None)                  # keep the collective in step with peers
            p = slots[0]
            for w, r, n in segs:
                torch.add(self.X[p, r:r + n], self.G[p, r:r + n], alpha=damping, out=out[w:w + n])
            return out
        H, valid, vd = self.masked_gram(lo, hi, slots, segs)
        if prefix:
            # cumsum from the exclusive prefix of the earlier blocks: the first row adds
            # the offset, then the block's own steps in order, as the single process does
            H = H.clone()
            H[0] += offset_fn(H.sum(0))
            H = H.cumsum(0)
        alpha = anderson_weights(H, vd, reg=reg, prefix=False).to(self.X.dtype)
        return self.apply_weights(alpha, valid, vd, slots, segs, damping, out)


def _step_slopes(system, lin, a: int, b: int, like: torch.Tensor) -> torch.Tensor:
    """M_i = P_i + Q_i J_i for steps a..b-1, broadcastable to [b-a, B, ...]: the slope of
    each step's linearised update in its input (what the carry correction composes)."""
    J = lin.jacobian(a, b)
    if not hasattr(system, "coeffs"):
        # the adjoint: A_r = P'_r A_{r-1} + E_r + J_r (A_{r-1} - U_r), i.e. Q = 1
        P = system.P[a:b]
        return P if J is None else P + J
    if system.spec is not None:
        from .ops.fused_round import window_coefficients
        P, Q, _, _, _ = window_coefficients(system.spec.sampler,
                                            system._table[a:b].to(like.dtype), system._s,
                                            like.dim() - 2)
    else:
        P, Q = system.coeffs.P[a:b], system.coeffs.Q[a:b]
    return P if J is None else P + Q * J


def sharded_fixed_point_solve(system, X: torch.Tensor, process_group, *, solver: str = "picard",
                              linearize: str = "secant", tol: float = 3e-3, floor: float = 0.1,
                              max_iter: Optional[int] = None, window: Optional[int] = None,
                              freeze_ratio: float = FREEZE_RATIO,
                              callback: Optional[Callable] = None, initial_nfe: int = 0,
                              check_every: int = 1, cuda_graph: bool = False,
                              serial_shadow: bool = True, **options):
    """``solvers.fixed_point_solve`` with the steps sharded over ``process_group`` (a
    ProcessGroup or a ``ShardConfig``). X [S, B, ...] must hold the same initial guess on
    every rank. Returns (X, stats) with every state filled in on every rank;
    ``stats.sharding`` is this rank's ``ShardStats``."""
    cfg = resolve(process_group)
    if check_every != 1 or cuda_graph:
        raise ValueError("a sharded solve reads the residuals every round: check_every must "
                         "be 1 and cuda_graph False with process_group")
    fused = callable(getattr(system, "round_and_residuals", None))
    check_device(cfg.group, X.device)
    update_cls = SOLVERS[check_solver(solver)]
    if update_cls not in (Picard, Anderson, TriangularAnderson):
        raise NotImplementedError(f"solver {solver!r} has no sharded implementation "
                                  "(picard, anderson and triangular_anderson do)")
    upd = update_cls(**options)
    anderson = isinstance(upd, Anderson)
    prefix = bool(getattr(upd, "prefix", False))

    sst = ShardStats()
    comm = _Comm(cfg.group, cfg.timeout, sst)
    R, me = comm.size, comm.rank
    sst.rank, sst.world = me, R
    t_start = time.perf_counter()

    lin = system.linearization(linearize)
    S = system.num_steps
    max_iter = S if max_iter is None else max_iter
    w = S if window is None else min(window, S)
    scale = system.residual_scale(floor)
    scale_dev = scale.to(X.device)
    item = X[0]
    n_state = item.numel()
    esz = item.element_size()

    # Same inputs on every rank, or the ranks would solve different chains: compare a
    # fingerprint of the initial guess and the chain's first state once.
    carry0 = system.coeffs.u0 if fused else system.carry0
    # the noise and ȳ too: with generator=None each rank would draw its own noise
    coeffs = getattr(system, "coeffs", None)
    drawn = [t for t in (getattr(coeffs, "noise", None), getattr(coeffs, "ybar", None))
             if isinstance(t, torch.Tensor)]
    fp = torch.stack([X.to(torch.float64).sum(), X.to(torch.float64).abs().sum(),
                      carry0.to(torch.float64).sum(),
                      *[t.detach().to(torch.float64).abs().sum().to(X.device) for t in drawn]
                      ]).to(X.device)
    fps = comm.all_gather(fp, "input check").to("cpu")
    if not bool((fps == fps[0]).all()):
        raise ValueError("x_T, noise or the initial guess differ across ranks: every rank "
                         "must call solve with the same inputs (same seed / generator)")

    secant = getattr(lin, "kind", None) == "secant"
    if secant and lin._prev_U is None:
        # allocated as ``Linearization.observe`` would, so a rank that receives steps
        # before it has run its own model call has somewhere to put their history
        lin._prev_U = X.new_zeros((S, *item.shape))
        lin._prev_E = X.new_zeros((S, *item.shape))
        lin._seen = torch.zeros(S, dtype=torch.bool, device=X.device)

    def split(lo, hi):
        return even_split(lo, hi, R) if cfg.rebalance else static_split(lo, hi, S, R)

    rows = (-(-w // R)) if cfg.rebalance else min(w, _max_block(even_split(0, S, R)))
    ring = _Ring(upd.history, max(1, rows), item) if anderson else None
    # the serial shadow (solvers.SerialShadow) runs on rank 0, inside its model call; its
    # state travels with the carry gather and the holder of the frozen state compares
    shadow = SerialShadow(system, X, scale_dev) if shadow_applies(
        system, tol, freeze_ratio, serial_shadow) else None

    stats = SolverStats(nfe=initial_nfe, linearization=lin)
    stats.sharding = sst
    final_owner = torch.zeros(S, dtype=torch.int64)          # host: who holds step s at the end
    lo, hi = 0, w
    filled = hi             # steps below hold an iterate (a restart keeps them)
    parts = split(lo, hi)
    prev_r: Optional[torch.Tensor] = None
    shape_B = (X.shape[1],)

    while stats.iterations < max_iter:
        a, b = parts[me]
        Wk = b - a
        marks = (sst.bytes_sent, sst.wait_seconds, sst.compute_seconds)
        order = order_of(parts)              # ranks with steps, in step order
        first = order[0]
        sst.blocks.append((a, b))
        maxW = _max_block(parts)
        sst.bytes_window_gather += Wk * n_state * esz * (R - 1)
        FX = FX0 = r0 = M = e_last = None
        t0 = time.perf_counter()
        # -- 1. the block's model call and scan from its old carry --------------------------
        A_last = torch.ones_like(item)
        G_last = torch.zeros_like(item)
        p = stats.iterations                       # the shadow's step this round
        if shadow is not None and me == 0 and not Wk and comm.failed is None:
            try:                                   # rank 0 has no steps: the shadow alone
                shadow.step(system.eps_bar(shadow.u[None], p, check_finite=False)[0])
            except Exception as e:                     # noqa: BLE001 - reported to every rank
                comm.failed = e
        if Wk and comm.failed is None:
            try:
                if shadow is not None and me == 0:
                    U, E, e_shadow = shadow.inputs_and_model_term(X, a, b)
                    shadow.step(e_shadow)
                    del e_shadow
                else:
                    U = system.inputs(X, a, b)
                    E = system.model_term(U, a)
                lin.observe(a, b, U, E)
                # the window's last model output starts the steps entering it (enter_steps)
                e_last = E[-1:].clone() if (b == hi and w < S and hasattr(system, "extend")) else None
                if fused:
                    FX0, r0 = system.round_and_residuals(E, U, X[b - 1], a, b, lin, scale_dev[a:b])
                else:                                  # the adjoint: its scan, then residuals
                    FX0 = system.scan(E, U, a, b, lin.jacobian(a, b))
                    r0 = step_residuals(FX0 - X[a:b]).to(torch.float64) * scale_dev[a:b]
                del U, E
                M = _step_slopes(system, lin, a, b, X)
                A_last = torch.ones_like(item)
                for i in range(Wk):
                    A_last = A_last * M[i if M.shape[0] > 1 else 0]
                G_last = FX0[-1] - X[b - 1]
            except Exception as e:                     # noqa: BLE001 - reported to every rank
                comm.failed = e
                A_last, G_last = torch.ones_like(item), torch.zeros_like(item)
        sst.compute_seconds += time.perf_counter() - t0
        # -- 2. exclusive scan of the blocks' affine maps (two states per rank) -------------
        payload = [A_last.reshape(-1), G_last.reshape(-1)]
        if shadow is not None:                 # rank 0's shadow state rides along
            payload.append((shadow.u if me == 0 else torch.zeros_like(item)).reshape(-1))
        carries = comm.all_gather(torch.cat(payload), "carry scan")
        t0 = time.perf_counter()
        # the residuals of the block, then the shadow's deviation where this rank holds
        # the frozen state of its step (-1 elsewhere)
        r_pad = torch.full((maxW + 2,), float("nan"), dtype=torch.float64, device=X.device)
        r_pad[maxW] = -1.0
        # and whether rank 0's shadow state is finite (the serial sampler's step p fails)
        r_pad[maxW + 1] = 1.0 if (shadow is None or me != 0) else \
            torch.isfinite(shadow.u).all().to(torch.float64)
        if shadow is not None and p < lo and int(final_owner[p]) == me and comm.failed is None:
            serial = carries[0, 2 * n_state:].view_as(item)
            r_pad[maxW:maxW + 1] = shadow.deviation(X, p, serial[None])
            if p < lo - 1:      # no longer read (lo - 1 is the carry): the serial state
                X[p] = serial   # (as in solvers.fixed_point_solve; a mismatch resets it)
        if Wk and comm.failed is None:
            try:
                if me != first:
                    delta = torch.zeros_like(item)
                    for k in order[:order.index(me)]:
                        Ak = carries[k, :n_state].view_as(item)
                        Gk = carries[k, n_state:2 * n_state].view_as(item)
                        delta = Gk + Ak * delta
                    FX = FX0
                    run = torch.ones_like(item)
                    for i in range(Wk):
                        run = run * M[i if M.shape[0] > 1 else 0]
                        FX[i] += run * delta
                    if fused:       # the chain's own measure (DDNM weights its range)
                        r = system.residuals(FX - X[a:b], a, b, scale_dev[a:b])
                    else:
                        r = step_residuals(FX - X[a:b]).to(torch.float64) * scale_dev[a:b]
                else:
                    FX, r = FX0, r0
                r_pad[:Wk] = r
            except Exception as e:                     # noqa: BLE001
                comm.failed = e
        del M, FX0
        sst.compute_seconds += time.perf_counter() - t0
        # -- 3. the residual row: the round's one read, and everyone's decisions ------------
        rows_all = comm.gather_checked(r_pad, "residual gather")
        r = torch.cat([rows_all[k, :parts[k][1] - parts[k][0]] for k in order])
        t0 = time.perf_counter()
        if shadow is not None:
            stats.nfe += 1                         # the shadow's step evaluation
            if not bool((rows_all[:, maxW + 1] == 1).all()):
                raise_nonfinite(p)                 # the serial sampler's own step p fails
            deviation = float(rows_all[:, maxW].max()) if p < lo else -1.0
            if p < lo:
                note_deviation(stats, p, deviation)
            if not deviation <= tol:
                # a frozen state off the serial one (solvers.fixed_point_solve): every
                # rank takes the shadow's state, the states are replicated from the
                # ranks that hold them, and the solve restarts after the shadow's step,
                # freezing exact states only
                row = record_round(stats, r, lo, hi, S)
                begin_exact_restart(stats, lin, p)
                serial = carries[0, 2 * n_state:].view_as(item)
                holder = final_owner.clone()
                for k, (pa, pb) in enumerate(parts):
                    holder[pa:pb] = k
                holder[hi:] = 0               # never entered: the same initial guess everywhere
                _replicate(comm, X, lin, holder, me)
                X[p] = serial
                if callback is not None and comm.failed is None:
                    try:
                        callback({"iteration": stats.iterations, "window": (lo, hi),
                                  "residuals": row, "nfe": stats.nfe, "state": X, "rank": me,
                                  "block": (a, b)})
                    except Exception as e:             # noqa: BLE001 - reported to every rank
                        comm.failed = e
                shadow, tol, prev_r = None, 0.0, None
                ring = _Ring(upd.history, max(1, rows), item) if anderson else None
                del FX
                sst.compute_seconds += time.perf_counter() - t0
                _mark(sst, marks)
                lo, hi = p + 1, min(p + 1 + w, S)     # p < lo <= S - 1: steps remain
                parts = split(lo, hi)
                continue
        G = None
        bad = ~torch.isfinite(r)
        if bool(bad.any()):
            kb = int(bad.nonzero()[0, 0])
            if kb == 0:
                raise_nonfinite(lo)
            # Divergence restart (see fixed_point_solve): steps from lo+kb on restart
            # from F(X) of the step before, which one rank holds: broadcast it.
            src_step = lo + kb - 1
            owner = _owner_of(parts, src_step)
            last = FX[src_step - a].clone() if (owner == me and FX is not None) else torch.zeros_like(item)
            sst.compute_seconds += time.perf_counter() - t0
            last = comm.broadcast(last, owner, "divergence restart")
            t0 = time.perf_counter()
            if Wk and FX is not None and b > lo + kb:
                FX[max(lo + kb, a) - a:] = last
            r[kb:] = float("inf")
            if ring is not None:
                ring.forget()
            switch_off_jacobian(lin, stats)
        elif lin.active and guard_tripped(r, prev_r, lo, hi):
            switch_off_jacobian(lin, stats)
        row = prev_r = record_round(stats, r, lo, hi, S)
        n_done = steps_to_freeze(r, tol, freeze_ratio, last=hi == S)
        # -- 4. the update of the block --------------------------------------------------------
        if n_done < hi - lo and anderson:
            offset_fn = _prefix_offset(comm, order, me, shape_B, ring.m, X.device) if prefix else None
            if Wk and comm.failed is None and FX is not None:
                try:
                    ring.push(a, b, X[a:b], FX=FX)
                    ring.mix_with(a, b, reg=upd.reg, damping=upd.damping, prefix=prefix,
                                  offset_fn=offset_fn, out=X[a:b])
                except ShardError:                 # a collective failed: every rank raises
                    raise
                except Exception as e:             # noqa: BLE001
                    comm.failed = e
                    if prefix and not offset_fn.state["called"]:
                        offset_fn(None)            # the peers are in this collective
            else:
                ring.skip()
                if prefix:
                    sst.compute_seconds += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    offset_fn(None)
        elif Wk and FX is not None:
            X[a:b] = FX
        if Wk and FX is not None:
            f_hi = min(b, lo + n_done)
            if f_hi > a:
                X[a:f_hi] = FX[:f_hi - a]
        for k, (pa, pb) in enumerate(parts):
            final_owner[max(pa, lo):min(pb, lo + n_done)] = k
        if callback is not None and comm.failed is None:
            try:        # X is valid on this rank's block (and the frozen steps it froze)
                callback({"iteration": stats.iterations, "window": (lo, hi), "residuals": row,
                          "nfe": stats.nfe, "state": X, "rank": me, "block": (a, b)})
            except Exception as e:                     # noqa: BLE001 - reported to every rank
                comm.failed = e
        del FX, G
        sst.compute_seconds += time.perf_counter() - t0
        if n_done == hi - lo and hi == S:
            stats.converged = True
            _mark(sst, marks)
            break
        # -- 5. slide the window, re-split it, move steps and halos ---------------------------
        new_lo = lo + n_done
        new_hi = min(new_lo + w, S)
        last_owner = _owner_of(parts, hi - 1)
        if new_hi > filled:
            if me == last_owner:    # steps below ``filled`` kept their iterates (a restart)
                enter_steps(system, X, e_last if hi == filled else None, filled, new_hi)
            filled = new_hi
        if cfg.rebalance:
            new_parts = _kept_split(parts, new_lo, hi, new_hi, last_owner)
            even = _rebalanced(new_parts, new_lo, new_hi)
            if _max_block(new_parts) > _max_block(even):
                new_parts = even
                sst.rebalances += 1
        else:
            new_parts = split(new_lo, new_hi)
        _migrate(comm, X, lin, ring, parts, new_parts, hi, last_owner, sst)
        lo, hi, parts = new_lo, new_hi, new_parts
        _mark(sst, marks)

    if not stats.converged:
        for k, (pa, pb) in enumerate(parts):
            if pb > pa and pa >= lo:
                final_owner[max(pa, lo):pb] = k    # unfinished steps: their current owner
    # -- the result on every rank: each state from the rank that holds it ---------------------
    comm.gather_checked(X.new_zeros(0), "final status")
    _replicate(comm, X, lin, final_owner, me)
    sst.total_seconds = time.perf_counter() - t_start
    return X, stats


def _replicate(comm: _Comm, X, lin, holder: torch.Tensor, me: int) -> None:
    """Every state on every rank, each from the rank ``holder`` [S] names, and with the
    secant the slopes each rank refitted (for the adjoint's J, handle.gradients; and a
    restart's new split). The secant's round history is dropped: its steps change ranks."""
    S = X.shape[0]
    mask = (holder == me).to(X.device).view(S, *([1] * (X.dim() - 1)))
    X.copy_(torch.where(mask, X, torch.zeros((), dtype=X.dtype, device=X.device)))
    _all_reduce(comm, X, "final states")
    if getattr(lin, "kind", None) == "secant" and lin.slopes is not None:
        smask = mask.view(S, 1, 1)
        lin.slopes.copy_(torch.where(smask, lin.slopes, torch.zeros_like(lin.slopes)))
        _all_reduce(comm, lin.slopes, "final slopes")
        lin.forget_rounds()


def _mark(sst: ShardStats, marks):
    sst.round_bytes.append(sst.bytes_sent - marks[0])
    sst.round_wait.append(sst.wait_seconds - marks[1])
    sst.round_compute.append(sst.compute_seconds - marks[2])


def _all_reduce(comm: _Comm, t: torch.Tensor, what: str):
    work = dist.all_reduce(t, group=comm.group, async_op=True)
    comm._wait(work, what)
    # a ring all-reduce sends 2 (R-1)/R of the tensor per rank
    comm.stats.bytes_sent += 2 * t.numel() * t.element_size() * (comm.size - 1) // max(1, comm.size)


def _prefix_offset(comm: _Comm, order, me: int, shape_B, m: int, device):
    """A function of this block's summed masked Gram matrix [B, h, h] (None: no steps
    this round) giving the sum over the window's earlier blocks: an all-gather of one
    [B, m, m] float64 matrix per rank and an exclusive sum (triangular Anderson). Every
    rank calls it exactly once per mixing round (``called`` keeps a failed rank in step)."""
    state = {"called": False}

    def offset(block_sum):
        state["called"] = True
        pay = torch.zeros((shape_B[0], m, m), dtype=torch.float64, device=device)
        h = m if block_sum is None else block_sum.shape[-1]
        if block_sum is not None:
            pay[:, :h, :h] = block_sum
        allb = comm.all_gather(pay.reshape(-1), "triangular Gram prefix").view(comm.size, *pay.shape)
        off = torch.zeros_like(pay)
        for k in order[:order.index(me)] if me in order else []:
            off = off + allb[k]
        return off[:, :h, :h]
    offset.state = state
    return offset


def _kept_split(parts, lo: int, old_hi: int, hi: int, last_owner: int):
    """The current split on the new window [lo, hi) with as little moving as possible:
    blocks lose their frozen steps; the steps entering at the back go to the ranks whose
    blocks froze whole (split evenly among them, in the order they froze), else to the
    rank that held the old last step. Only the entering steps' start value moves."""
    R = len(parts)
    kept = [(max(a, lo), b) if b > max(a, lo) else (hi, hi) for a, b in parts]
    if hi > old_hi:
        empty = [k for k in sorted(range(R), key=lambda k: parts[k]) if kept[k][1] <= kept[k][0]]
        if empty:
            for k, blk in zip(empty, even_split(old_hi, hi, len(empty))):
                kept[k] = blk if blk[1] > blk[0] else (hi, hi)
        else:
            kept[last_owner] = (kept[last_owner][0], hi)
    return kept


def _rebalanced(kept, lo: int, hi: int):
    """An even split of [lo, hi) keeping the kept split's order (ranks without steps at
    the back), so the boundaries move as little as they can."""
    R = len(kept)
    ranks = order_of(kept)
    ranks += [k for k in range(R) if k not in ranks]
    return split_in_order(lo, hi, ranks, R)


def _migrate(comm: _Comm, X, lin, ring, old, new, old_hi: int, last_owner: int, sst: ShardStats):
    """Move what each rank needs under the new split from the ranks that hold it: the
    state before its block (its next carry), and for steps new to it their state,
    secant history and Anderson history. Every rank computes the same transfer list."""
    me = comm.rank

    def src(s):
        return _owner_of(old, s) if s < old_hi else last_owner

    def holds(k, s):
        a, b = old[k]
        return a <= s < b or (s >= old_hi and k == last_owner)

    # kind: "full" a step joining a block (state and histories), "x" the state before a
    # block, "fill" steps entering the window (their start values, which the rank that
    # held the old last step computed: enter_steps)
    transfers = []          # (src, dst, s0, s1, kind)
    for k, (a, b) in enumerate(new):
        if b <= a:
            continue
        need = [a - 1] if a >= 1 else []
        for s in need + list(range(a, b)):
            if holds(k, s):
                continue
            kind = "fill" if s >= old_hi else ("full" if a <= s < b else "x")
            p = src(s)
            if transfers and transfers[-1][:2] == (p, k) and transfers[-1][3] == s \
                    and transfers[-1][4] == kind:
                transfers[-1] = (p, k, transfers[-1][2], s + 1, kind)
            else:
                transfers.append((p, k, s, s + 1, kind))
    sends, recvs, after = [], [], []
    secant = getattr(lin, "kind", None) == "secant" and lin.active and lin._prev_U is not None
    for p, k, s0, s1, kind in transfers:
        if me not in (p, k):
            continue
        full = kind == "full"
        fields = [X[s0:s1]]
        if full:
            if secant:
                fields += [lin._prev_U[s0:s1], lin._prev_E[s0:s1], lin.slopes[s0:s1],
                           lin._seen[s0:s1].to(X.dtype)]
            if ring is not None:
                rws = torch.arange(s0, s1) % ring.rows
                rd = rws.to(ring.gram.device)
                fields += [ring.X[:, rd], ring.G[:, rd], ring.gram[rd],
                           ring.step_of[:, rws].to(torch.float64).to(ring.gram.device)]
        if me == p:
            sends += [(k, f.contiguous()) for f in fields]
        else:
            bufs = [torch.empty_like(f.contiguous()) for f in fields]
            recvs += [(p, t) for t in bufs]
            after.append((s0, s1, full, bufs))
            if full:
                sst.migrated_steps += s1 - s0
    comm.exchange(sends, recvs, "step migration")
    for s0, s1, full, bufs in after:
        X[s0:s1] = bufs[0]
        i = 1
        if full:
            if secant:
                lin._prev_U[s0:s1] = bufs[1]
                lin._prev_E[s0:s1] = bufs[2]
                lin.slopes[s0:s1] = bufs[3]
                lin._seen[s0:s1] = bufs[4] != 0
                i = 5
            if ring is not None:
                rws = torch.arange(s0, s1) % ring.rows
                rd = rws.to(ring.gram.device)
                ring.X[:, rd] = bufs[i]
                ring.G[:, rd] = bufs[i + 1]
                ring.gram[rd] = bufs[i + 2]
                ring.step_of[:, rws] = bufs[i + 3].to("cpu").to(torch.int64)


# -- the implicit-gradient backward, sharded the same way --------------------------------

def sharded_adjoint_gradients(system, X: torch.Tensor, grad_x0: torch.Tensor, *, process_group,
                              x_T: torch.Tensor, noise: Optional[torch.Tensor], params=(),
                              y: Optional[torch.Tensor] = None, solver: str = "picard",
                              linearize: str = "secant", tol: float = 1e-6,
                              max_iter: Optional[int] = None, window: Optional[int] = None,
                              forward_jacobian=None, **solver_kw):
    """``gradients.adjoint_gradients`` with the adjoint system's steps sharded like the
    forward solve's (each round one VJP per rank over its block) and the parameter
    gradients' VJPs split over the ranks and summed with one all-reduce. Every rank
    gets the same result (X, the forward states, must be the same on every rank: it is,
    after a sharded ``solve``)."""
    from .gradients import AdjointSystem, input_gradients
    cfg = resolve(process_group)
    chain = system.chain
    grad_uS = chain.to_basis(grad_x0.to(X.dtype))
    adj = AdjointSystem(system, X, grad_uS, params, forward_jacobian)
    A0 = grad_uS.unsqueeze(0).repeat(system.num_steps, *([1] * grad_uS.dim()))
    A, stats = sharded_fixed_point_solve(adj, A0, cfg, solver=solver, linearize=linearize,
                                         tol=tol, floor=1.0, max_iter=max_iter, window=window,
                                         **solver_kw)
    lam = adj.lambdas(A)
    out = {"stats": stats, "lambda": lam}
    # dL/dθ = Σ_k (∂ē_k/∂θ)ᵀ(Q_k λ_{k+1}): each rank its share of the steps, then a sum
    R, me = dist.get_world_size(cfg.group), dist.get_rank(cfg.group)
    grads: List[Optional[torch.Tensor]] = []
    if adj.params:
        k0, k1 = even_split(0, system.num_steps, R)[me]
        chunk = window or system.num_steps
        total: List[Optional[torch.Tensor]] = [None] * len(adj.params)
        comm = _Comm(cfg.group, cfg.timeout, stats.sharding)
        try:          # an error here must reach the peers, which wait in the all-reduce
            cot_all = system.coeffs.Q * lam[1:]
            for c0 in range(k0, k1, chunk):
                c1 = min(c0 + chunk, k1)
                _, gs = adj._vjp(c0, c1, cot_all[c0:c1], adj.params)
                total = [g if t is None else (t if g is None else t + g) for t, g in zip(total, gs)]
        except Exception as e:                         # noqa: BLE001
            comm.failed = e
        comm.gather_checked(torch.zeros(1, dtype=torch.float64, device=X.device),
                            "parameter VJPs")
        for t, p in zip(total, adj.params):
            g = torch.zeros_like(p) if t is None else t.detach().clone()
            _all_reduce(comm, g, "parameter gradients")
            grads.append(g)
    out["params"] = grads
    calls = torch.tensor([float(adj.model_calls)], dtype=torch.float64, device=X.device)
    _all_reduce(_Comm(cfg.group, cfg.timeout, stats.sharding), calls, "model call count")
    out["model_calls"] = int(calls.to("cpu")[0])
    out.update(input_gradients(chain, lam, x_T, noise, y, X.dtype))
    return out
