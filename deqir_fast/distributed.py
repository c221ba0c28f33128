"""Step sharding across processes with torch.distributed (docs/design.md §6, issue #14).

``solve(..., process_group=pg)`` runs the one solver loop (``solvers.FixedPointLoop``)
with ``ShardedEngine`` below instead of the single-process engine: the loop takes every
decision (freeze, stop, guards, the serial shadow, window slide) on the residual row the
engine gathers, so the rounds, decisions and result are the single-process solve's; the
engine splits the active window's steps into contiguous blocks, one per rank, and only
computes and communicates.

A round on rank k, block [a, b) of the window [lo, hi):

1. U = the block's inputs (U_0 = X[a-1], the previous block's last state, arrived at the
   end of the last round), E = the model on the block only (the expensive part), and the
   block's scan from its *old* carry U_0: F_i(U_0) and the residuals, with the system's
   own round (``ChainSystem.round_and_residuals``, the fused kernel where there is one).
2. The scan is elementwise affine in the carry: F_i(c) = F_i(U_0) + A_i ⊙ (c - U_0) with
   A_i = Π_{j<=i} (P_j + Q_j J_j) (``system.step_slopes``). Every rank all-gathers its
   block's (A_last, G_last), G_last = F_last(U_0) - X_old[b-1]: two states per rank, not
   the window. The carry correction δ = c - U_0 then follows by an exclusive scan over
   the ranks before k, δ_{k+1} = G_k + A_k ⊙ δ_k, δ = 0 for the first block (its carry is
   frozen, exact). Working with δ rather than c keeps the composition's rounding on a
   quantity that vanishes at convergence, so the result matches the single-process solve
   to rounding of the corrections, not of the states; the first block is bit-for-bit the
   same.
   An order-2 chain (DPM-Solver++(2M), docs/design.md §2.8) also carries the difference
   τ of its first step's previous term: (δ, τ) compose with a 2x2 elementwise matrix,
   six states per rank (``_order2_map``); a block from a > 0 evaluates the step before
   it, and the state two back travels with the carry.
3. F = F(U_0) + A ⊙ δ, residuals of the block; one all-gather of the per-step residual
   row (the largest block's length, plus the shadow's verdict and a status flag): the
   round's one host read. The loop then
   decides on that row, alike on every rank.
4. The update rule runs on each block (every rank calls it, with an empty block where it
   has no steps): Picard X <- F; Anderson mixes per step with its history ring
   (``ops.anderson.AndersonRing``, rows by absolute step, so a step can move to another
   rank with its history); triangular Anderson needs the prefix sum of the Gram matrices
   over the window's steps before its block: ``RoundContext.prefix``, an exclusive scan of
   the blocks' [B, m, m] sums (all-gathered, tiny). A user-registered rule runs the same
   way (``solvers.rules``).
5. The window slides. ``rebalance`` (the default) keeps the active window evenly split,
   since steps freeze front to back and a static split leaves the first ranks idle: a
   rank whose block froze whole takes the steps entering at the back of a sliding
   window (so blocks follow the step order, not the rank order, and the scans above
   run in step order), and when the largest block still exceeds an even split's the
   boundaries move, the steps that change rank carrying their state, secant history
   and the rule's history along (point-to-point). Every rank then receives the state
   before its block (the next round's U_0). ``rebalance=False``: a static split of the
   S steps, for comparison (bench/sharding.py).

Gradients: the backward of a sharded solve (``grad="ift"``, i.e. ``res.x0.backward()`` on
every rank, and ``deqir_fast.backward(result, ...)``) solves the adjoint system sharded the
same way (``gradients.adjoint_gradients(..., process_group=)`` with this engine; the
parameters' VJPs are split over the ranks and summed, ``sharded_param_grads``). The result
holds its group weakly (``GroupRef``): run the backward before ``destroy_process_group``.

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
import pickle
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

from .ops import step_residuals
from .solvers import RoundContext, enter_steps

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


# -- the engine ---------------------------------------------------------------------------

class ShardedEngine:
    """The round engine of a sharded solve (``solvers.loop.FixedPointLoop`` takes every
    decision; this class only computes and communicates, see the module docstring). Each
    rank evaluates its block [a, b) of the window, the blocks' carries are corrected by an
    exclusive scan of their affine maps, and the residual row is gathered (the round's one
    host read); the update rule runs on each block, its cross-block sums through
    ``RoundContext.prefix``."""

    batched = False

    def __init__(self, cfg: ShardConfig):
        self.cfg = cfg
        # known before bind: the planner prices its first window from the split
        self.R, self.me = dist.get_world_size(cfg.group), dist.get_rank(cfg.group)

    # -- set-up and bookkeeping ----------------------------------------------------------------
    def bind(self, loop) -> None:
        cfg, X, system = self.cfg, loop.X, loop.system
        if loop.options.check_every != 1 or loop.options.cuda_graph:
            raise ValueError("a sharded solve reads the residuals every round: check_every "
                             "must be 1 and cuda_graph False with process_group")
        if loop.options.history_dtype is not None:
            raise ValueError("history_dtype is not supported with process_group (the sharded "
                             "solve keeps its Anderson history in the state dtype)")
        check_device(cfg.group, X.device)
        self.fused = callable(getattr(system, "round_and_residuals", None))
        # an order-2 chain's block map carries two states (docs/design.md §2.8)
        self.order = getattr(system, "order", 1)
        self.sst = sst = ShardStats()
        loop.stats.sharding = sst
        self.comm = comm = _Comm(cfg.group, cfg.timeout, sst)
        self.R, self.me = comm.size, comm.rank
        sst.rank, sst.world = self.me, self.R
        self.t_start = time.perf_counter()
        self.item = X[0]
        self.n_state = self.item.numel()
        self._check_same_inputs(loop)
        if hasattr(loop.lin, "reserve_history"):
            # a rank that receives steps before its own first model call has somewhere
            # to put their secant history
            loop.lin.reserve_history(self.item)
        S, R = loop.S, self.R
        self.rows = self._block_rows(loop, loop.w)
        self.final_owner = torch.zeros(S, dtype=torch.int64)   # host: who holds step s at the end
        self.parts = self.split(0, loop.hi, S)
        self.keep_last = (loop.w < S or loop.planner is not None) and hasattr(system, "extend")
        self.FX = self.e_last = self.carries = self.marks = None
        self.round_seconds: Optional[float] = None

    def _check_same_inputs(self, loop) -> None:
        """Same inputs on every rank, or the ranks would solve different chains: compare a
        fingerprint of the initial guess, the chain's first state, and the noise and ȳ
        (with generator=None each rank would draw its own noise)."""
        X, system = loop.X, loop.system
        carry0 = system.carry(X, 0)
        coeffs = getattr(system, "coeffs", None)
        drawn = [t for t in (getattr(coeffs, "noise", None), getattr(coeffs, "ybar", None))
                 if isinstance(t, torch.Tensor)]
        fp = torch.stack([X.to(torch.float64).sum(), X.to(torch.float64).abs().sum(),
                          carry0.to(torch.float64).sum(),
                          *[t.detach().to(torch.float64).abs().sum().to(X.device) for t in drawn]
                          ]).to(X.device)
        fps = self.comm.all_gather(fp, "input check").to("cpu")
        if not bool((fps == fps[0]).all()):
            raise ValueError("x_T, noise or the initial guess differ across ranks: every rank "
                             "must call solve with the same inputs (same seed / generator)")

    def split(self, lo: int, hi: int, S: int):
        return even_split(lo, hi, self.R) if self.cfg.rebalance else static_split(lo, hi, S, self.R)

    def context(self, loop, lo: int, hi: int, prefix=None) -> RoundContext:
        a, b = self.parts[self.me]
        # a window the planner grew (the loop then starts a new rule) needs larger blocks
        self.rows = max(self.rows, self._block_rows(loop, hi - lo))
        return RoundContext(lo, hi, a, b, rows=self.rows, like=self.item, prefix=prefix)

    def _block_rows(self, loop, W: int) -> int:
        """The most steps a rank's block can hold with a window of W steps."""
        if self.cfg.rebalance:
            return max(1, -(-W // self.R))
        return max(1, min(W, _max_block(even_split(0, loop.S, self.R))))

    def _round_mark(self) -> None:
        """Close the last round's per-round accounting (``ShardStats.round_*``)."""
        if self.marks is not None:
            _mark(self.sst, self.marks)
        self.marks = None

    # -- a round -------------------------------------------------------------------------------
    def evaluate(self, loop, p: int, compare: bool):
        """1. the block's model call and scan from its old carry; 2. the exclusive scan of
        the blocks' affine maps (two states per rank); 3. the residual row gathered."""
        t_round = time.perf_counter()
        self._round_mark()
        sst, parts, me = self.sst, self.parts, self.me
        self.marks = (sst.bytes_sent, sst.wait_seconds, sst.compute_seconds)
        a, b = parts[me]
        sst.blocks.append((a, b))
        sst.bytes_window_gather += (b - a) * self.n_state * self.item.element_size() * (self.R - 1)
        t0 = time.perf_counter()
        A_last, G_last, FX0, r0, M = self._block_round(loop, p)
        sst.compute_seconds += time.perf_counter() - t0
        payload = [t.reshape(-1) for t in (*A_last, *G_last)] if self.order == 2 else \
            [A_last.reshape(-1), G_last.reshape(-1)]
        if loop.shadow is not None:            # rank 0's shadow state rides along
            payload.append((loop.shadow.u if me == 0 else torch.zeros_like(self.item)).reshape(-1))
            if self.order == 2:                # and the one before it (a restart puts both in)
                payload.append((loop.shadow.u_prev if me == 0
                                else torch.zeros_like(self.item)).reshape(-1))
        self.carries = self.comm.all_gather(torch.cat(payload), "carry scan")
        t0 = time.perf_counter()
        r_pad = self._corrected_residuals(loop, p, FX0, r0, M)
        del M, FX0
        sst.compute_seconds += time.perf_counter() - t0
        # this rank's time for the round so far rides along: the planner (window="auto")
        # prices rounds at the slowest rank's, the same number on every rank
        elapsed = r_pad.new_full((1,), time.perf_counter() - t_round)
        rows_all = self.comm.gather_checked(torch.cat([r_pad, elapsed]), "residual gather")
        self.round_seconds = float(rows_all[:, -1].max())
        rows_all = rows_all[:, :-1]
        maxW = _max_block(parts)
        r = torch.cat([rows_all[k, :parts[k][1] - parts[k][0]] for k in order_of(parts)])
        if loop.shadow is None:
            return r, None
        if not bool((rows_all[:, maxW + 1] == 1).all()):
            return r, float("nan")                  # the serial sampler's own step p fails
        return r, float(rows_all[:, maxW].max()) if compare else 0.0

    def _block_round(self, loop, p: int):
        """The block's model call (with the serial shadow's row on rank 0), its scan from
        the old carry and its affine map (A_last, G_last): what step 2 composes."""
        X, system, lin, shadow, comm = loop.X, loop.system, loop.lin, loop.shadow, self.comm
        item = self.item
        a, b = self.parts[self.me]
        self.FX = self.e_last = None
        A_last, G_last, FX0, r0, M = self._identity_map() + (None, None, None)
        if shadow is not None and self.me == 0 and b == a and comm.failed is None:
            try:                                   # rank 0 has no steps: the shadow alone
                shadow.step(system.eps_bar(shadow.u[None], p, check_finite=False)[0])
            except Exception as e:                     # noqa: BLE001 - reported to every rank
                comm.failed = e
        if b == a or comm.failed is not None:
            return A_last, G_last, FX0, r0, M
        try:
            if shadow is not None and self.me == 0:
                U, E, e_shadow = shadow.inputs_and_model_term(X, a, b)
                shadow.step(e_shadow)
                del e_shadow
            else:
                U = system.inputs(X, a, b)
                E = system.model_term(U, a)
            lin.observe(a, b, U, E)
            # the window's last model output starts the steps entering it (enter_steps)
            self.e_last = E[-1:].clone() if (b == loop.hi and self.keep_last) else None
            if self.fused:
                FX0, r0 = system.round_and_residuals(E, U, X[b - 1], a, b, lin, loop.scale_dev[a:b])
            else:                                  # the adjoint: its scan, then residuals
                FX0 = system.scan(E, U, a, b, lin.jacobian(a, b))
                r0 = step_residuals(FX0 - X[a:b]).to(torch.float64) * loop.scale_dev[a:b]
            del U, E
            M = system.step_slopes(lin, a, b, X)
            if self.order == 2:
                M, A_last, G_last = self._order2_map(loop, M, FX0, a, b)
            else:
                for i in range(b - a):
                    A_last = A_last * M[i if M.shape[0] > 1 else 0]
                G_last = FX0[-1] - X[b - 1]
        except Exception as e:                     # noqa: BLE001 - reported to every rank
            comm.failed = e
            A_last, G_last = self._identity_map()
        return A_last, G_last, FX0, r0, M

    def _identity_map(self):
        """(A, G) of a block without steps: the carry passes through unchanged."""
        one, zero = torch.ones_like(self.item), torch.zeros_like(self.item)
        if self.order == 2:
            return (one, zero, zero, one), (zero, zero)
        return one, zero

    def _order2_map(self, loop, M, FX0, a: int, b: int):
        """An order-2 block's affine map (docs/design.md §2.8). Its old scan ran from the
        old carry X[a-1] and the old previous pair (X[a-2], ē there); the true running
        input of step a differs by δ and the previous term C_a u_{a-1} + D_a e_{a-1} by τ.
        The outputs' differences d_{k+1} = α_k δ + β_k τ follow d_{a+1} = M_a δ + τ,
        d_{k+1} = M_k d_k + N_k d_{k-1} (N_k = C_k + D_k J_{k-1}, ``previous_slopes``), and
        the next block's (δ', τ') = G + A (δ, τ) with δ' = d_b + FX0_last - X[b-1] and
        τ' = N_b (d_{b-1} + u0_{b-1} - X[b-2]) (u0: the old scan's input of step b-1).
        Returns ((α, β) per step, A as four states, G as two)."""
        X, W = loop.X, b - a
        N = loop.system.previous_slopes(loop.lin, a, b, X)

        def pick(T, i):
            return T[i if T.shape[0] > 1 else 0]
        one, zero = torch.ones_like(self.item), torch.zeros_like(self.item)
        prev, cur = (one, zero), (pick(M, 0) * one, one)          # d_a, d_{a+1}
        alphas, betas = [cur[0]], [cur[1]]
        for i in range(1, W):
            m, n = pick(M, i), pick(N, i - 1)
            prev, cur = cur, (m * cur[0] + n * prev[0], m * cur[1] + n * prev[1])
            alphas.append(cur[0])
            betas.append(cur[1])
        n_b = pick(N, W - 1) * one
        u0 = FX0[-2] if W > 1 else X[a - 1]                        # the old scan's input of b-1
        A = (cur[0], cur[1], n_b * prev[0], n_b * prev[1])
        G = (FX0[-1] - X[b - 1], n_b * (u0 - X[b - 2]) if b >= 2 else zero)
        return (torch.stack(alphas), torch.stack(betas)), A, G

    def _corrected_residuals(self, loop, p: int, FX0, r0, M) -> torch.Tensor:
        """The block's F(X) from its true carry, F = F(U_0) + A ⊙ δ, and its residuals,
        padded to the largest block, then the shadow's deviation where this rank holds the
        frozen state of its step (-1 elsewhere) and whether rank 0's shadow state is
        finite."""
        X, comm, me, item, n = loop.X, self.comm, self.me, self.item, self.n_state
        a, b = self.parts[me]
        order = order_of(self.parts)
        maxW = _max_block(self.parts)
        shadow = loop.shadow
        r_pad = torch.full((maxW + 2,), float("nan"), dtype=torch.float64, device=X.device)
        r_pad[maxW] = -1.0
        r_pad[maxW + 1] = 1.0 if (shadow is None or me != 0) else \
            torch.isfinite(shadow.u).all().to(torch.float64)
        if shadow is not None and p < loop.lo and int(self.final_owner[p]) == me and comm.failed is None:
            serial = self._shadow_state(0)
            r_pad[maxW:maxW + 1] = shadow.deviation(X, p, serial[None])
            # no longer read (lo - 1 is the carry, lo - 2 an order-2 window's too): the
            # serial state (as FixedPointLoop.round does; a mismatch resets it)
            if p < loop.lo - self.order:
                X[p] = serial
        if b == a or comm.failed is not None:
            return r_pad
        try:
            if me != order[0] and self.order == 2:
                delta, tau = torch.zeros_like(item), torch.zeros_like(item)
                for k in order[:order.index(me)]:
                    A00, A01, A10, A11, Gd, Gt = (self.carries[k, j * n:(j + 1) * n].view_as(item)
                                                  for j in range(6))
                    delta, tau = Gd + A00 * delta + A01 * tau, Gt + A10 * delta + A11 * tau
                alphas, betas = M
                FX = FX0
                FX += alphas * delta + betas * tau
            elif me != order[0]:
                delta = torch.zeros_like(item)
                for k in order[:order.index(me)]:
                    Ak = self.carries[k, :n].view_as(item)
                    Gk = self.carries[k, n:2 * n].view_as(item)
                    delta = Gk + Ak * delta
                FX = FX0
                run = torch.ones_like(item)
                for i in range(b - a):
                    run = run * M[i if M.shape[0] > 1 else 0]
                    FX[i] += run * delta
            if me != order[0]:
                if self.fused:       # the chain's own measure (DDNM weights its range)
                    r = loop.system.residuals(FX - X[a:b], a, b, loop.scale_dev[a:b])
                else:
                    r = step_residuals(FX - X[a:b]).to(torch.float64) * loop.scale_dev[a:b]
            else:
                FX, r = FX0, r0
            r_pad[:b - a] = r
            self.FX = FX
        except Exception as e:                     # noqa: BLE001
            comm.failed = e
        return r_pad

    def apply(self, loop, n_done: int) -> None:
        """4. the update of the block: the rule's (every rank calls it, an empty block where
        it has no steps or failed), then the frozen steps take F(X)."""
        X, lo, hi, FX, comm = loop.X, loop.lo, loop.hi, self.FX, self.comm
        a, b = self.parts[self.me]
        t0 = time.perf_counter()
        if n_done < hi - lo:
            prefix = self._prefix()
            ctx = self.context(loop, lo, hi, prefix)
            try:
                if b > a and FX is not None and comm.failed is None:
                    G = FX - X[a:b] if loop.update.uses_residual else None
                    X[a:b] = loop.call_rule(X[a:b], FX, G, ctx)
                else:
                    self._empty_call(loop, ctx)
            except ShardError:                     # a collective failed: every rank raises
                raise
            except Exception as e:                 # noqa: BLE001
                comm.failed = e
                if not prefix.called:              # the peers wait in that collective:
                    try:                           # take part as a rank without steps
                        self._empty_call(loop, ctx)
                    except Exception:              # noqa: BLE001 - the first error is kept
                        pass
        elif b > a and FX is not None:
            X[a:b] = FX
        if b > a and FX is not None:
            f_hi = min(b, lo + n_done)
            if f_hi > a:
                X[a:f_hi] = FX[:f_hi - a]
        for k, (pa, pb) in enumerate(self.parts):
            self.final_owner[max(pa, lo):min(pb, lo + n_done)] = k
        self.sst.compute_seconds += time.perf_counter() - t0

    @staticmethod
    def _empty_call(loop, ctx: RoundContext) -> None:
        """The rule on an empty block (no steps here this round, or a failed rank): it keeps
        its round counters and its collectives in step with the peers."""
        empty = loop.X[ctx.a:ctx.a]
        loop.call_rule(empty, empty, empty if loop.update.uses_residual else None, ctx)

    def _prefix(self) -> "_Prefix":
        return _Prefix(self.comm, order_of(self.parts), self.item.device)

    def diverged(self, loop, k: int) -> None:
        """Steps lo+k.. restart from F(X) of step lo+k-1, which one rank holds: broadcast it."""
        a, b = self.parts[self.me]
        src_step = loop.lo + k - 1
        owner = _owner_of(self.parts, src_step)
        FX = self.FX
        last = FX[src_step - a].clone() if (owner == self.me and FX is not None) \
            else torch.zeros_like(self.item)
        last = self.comm.broadcast(last, owner, "divergence restart")
        if b > a and FX is not None and b > loop.lo + k:
            FX[max(loop.lo + k, a) - a:] = last

    def take_serial(self, loop, p: int, q=None) -> None:
        pass                    # the holder of state p put the serial one in (evaluate)

    def put_serial(self, loop, p: int, q=None) -> None:
        """A restart: every rank takes the shadow's state at p, and the states are
        replicated from the ranks that hold them."""
        serial = self._shadow_state(0)
        self.gather_states(loop)
        loop.X[p] = serial
        if self.order == 2 and p > 0:          # an order-2 window reads the one before too
            loop.X[p - 1] = self._shadow_state(1)

    take_serial_carry = put_serial     # the planner's switch to the serial sampler

    def _shadow_state(self, back: int) -> torch.Tensor:
        """Rank 0's shadow state (``back`` = 1: the one before it, order 2) from the carry
        gather, after the blocks' maps (2 states each, 6 for order 2)."""
        n = self.n_state
        base = (6 if self.order == 2 else 2) * n + back * n
        return self.carries[0, base:base + n].view_as(self.item)

    def gather_states(self, loop) -> None:
        """Every state on every rank, each from the rank that holds it (a frozen state
        from the rank that froze it, a window's from its block's rank)."""
        holder = self.final_owner.clone()
        for k, (pa, pb) in enumerate(self.parts):
            holder[pa:pb] = k
        holder[loop.hi:] = 0          # not in the window: the same start everywhere
        _replicate(self.comm, loop.X, loop.lin, holder, self.me)

    # -- the planner (window="auto") -----------------------------------------------------------
    def call_rows(self, loop, lo: int, W: int) -> int:
        """The largest block's model-call rows at window W from lo (rank 0 adds the
        shadow's state, an order-2 chain's block from a > 0 the step before it)."""
        parts = self.split(lo, min(lo + W, loop.S), loop.S)
        shadow = loop.shadow is not None
        order2 = getattr(loop.system, "order", 1) == 2
        return max((b - a) + (1 if (k == 0 and shadow) else 0) + (1 if (order2 and a > 0 and b > a) else 0)
                   for k, (a, b) in enumerate(parts))

    def agreed_seconds(self) -> Optional[float]:
        return self.round_seconds

    def previous_rows(self, loop) -> int:
        """The order-2 rows every rank's blocks took, summed over the ranks (after
        ``finish``: its gather has checked that every rank is alive)."""
        if self.order == 1:
            return 0
        t = torch.tensor([float(getattr(loop.system, "previous_rows", 0))], dtype=torch.float64,
                         device=self.item.device)
        _all_reduce(self.comm, t, "order-2 row count")
        return int(t.to("cpu")[0])

    def planner_sync(self, X: torch.Tensor) -> "_PlannerSync":
        return _PlannerSync(self.cfg, X.device)

    def planner_kind(self) -> tuple:
        return ("sharded", self.R)

    def run_serial(self, loop, start: int, stop: int, step_done) -> None:
        """Every rank runs the serial sampler (the same steps from the same state: no
        collective); an error is reported to every rank by ``finish``'s gather."""
        before = getattr(loop.system, "previous_rows", 0)
        if self.comm.failed is None:
            try:
                loop.system.serial(step_done, start=start, stop=stop, states=loop.X)
            except Exception as e:                 # noqa: BLE001 - reported to every rank
                self.comm.failed = e
        if self.me != 0 and hasattr(loop.system, "previous_rows"):
            # every rank ran the same serial steps: rank 0's count of an order-2 chain's
            # extra call stands for all (``previous_rows`` sums over the ranks)
            loop.system.previous_rows = before
        self.final_owner[:] = 0
        self.parts = self.split(stop, stop, loop.S)

    def call_back(self, loop, callback, payload: dict) -> None:
        """The user's callback on every rank, with its rank and block; an exception is kept
        and reported to every rank at the next gather. X is valid on this rank's block
        (and the frozen steps it froze)."""
        if self.comm.failed is not None:
            return
        payload.update(rank=self.me, block=self.parts[self.me])
        try:
            callback(payload)
        except Exception as e:                     # noqa: BLE001 - reported to every rank
            self.comm.failed = e

    def release(self) -> None:
        self.FX = None

    # -- the window moves ------------------------------------------------------------------------
    def enter(self, loop, start: int, end: int, from_last_output: bool) -> None:
        """Start values of entering steps, computed by the rank that held the old last step
        (``_migrate`` sends them where they go). An order-2 chain's start reads the state
        two back too (``ChainSystem.extend``): its holder sends this round's value first
        (the last owner's copy is the one from before the round when that state is not in
        its block)."""
        last = _owner_of(self.parts, loop.hi - 1)
        if self.order == 2 and from_last_output and loop.hi >= 2:
            s = loop.hi - 2
            holder = _owner_of(self.parts, s) if s >= loop.lo else int(self.final_owner[s])
            if holder != last:
                got = self.comm.broadcast(loop.X[s].clone(), holder, "state two back")
                if self.me == last:
                    loop.X[s] = got
        if self.me == last:
            enter_steps(loop.system, loop.X, self.e_last if from_last_output else None, start, end)

    def move(self, loop, lo: int, hi: int, restart: bool = False) -> None:
        """5. re-split the new window and move steps and halos (after a restart every rank
        holds every state: a new split only)."""
        if restart:
            self.parts = self.split(lo, hi, loop.S)
            return
        old_hi, parts = loop.hi, self.parts
        last_owner = _owner_of(parts, old_hi - 1)
        if self.cfg.rebalance:
            new_parts = _kept_split(parts, lo, old_hi, hi, last_owner)
            even = _rebalanced(new_parts, lo, hi)
            if _max_block(new_parts) > _max_block(even):
                new_parts = even
                self.sst.rebalances += 1
        else:
            new_parts = self.split(lo, hi, loop.S)
        _migrate(self.comm, loop.X, loop.lin, loop.update, parts, new_parts, old_hi, last_owner,
                 self.sst, self.order, self.final_owner)
        self.parts = new_parts

    def finish(self, loop) -> None:
        """The result on every rank: each state from the rank that holds it."""
        self._round_mark()          # the rounds' accounting leaves out the final gather
        if not loop.stats.converged:
            for k, (pa, pb) in enumerate(self.parts):
                if pb > pa and pa >= loop.lo:
                    self.final_owner[max(pa, loop.lo):pb] = k    # unfinished steps: their owner
        self.comm.gather_checked(loop.X.new_zeros(0), "final status")
        _replicate(self.comm, loop.X, loop.lin, self.final_owner, self.me)
        self.sst.total_seconds = time.perf_counter() - self.t_start


class _PlannerSync:
    """What the planner of a sharded solve agrees on across ranks (``Planner.start``):
    ``max`` of a few floats, and rank 0's ``share``d state (its cost curve and remembered
    rounds), so every rank takes the same decisions."""

    def __init__(self, cfg: ShardConfig, device: torch.device):
        self.comm = _Comm(cfg.group, cfg.timeout, ShardStats())
        self.device = device

    def max(self, values):
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        work = dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.comm.group, async_op=True)
        self.comm._wait(work, "planner timing")
        return t.tolist()

    def share(self, obj):
        data = pickle.dumps(obj) if self.comm.rank == 0 else b""
        size = self.comm.broadcast(torch.tensor([len(data)], dtype=torch.int64,
                                                device=self.device), 0, "planner state size")
        buf = torch.zeros(int(size[0]), dtype=torch.uint8, device=self.device)
        if self.comm.rank == 0:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        buf = self.comm.broadcast(buf, 0, "planner state")
        return obj if self.comm.rank == 0 else pickle.loads(bytes(buf.cpu().numpy()))


class _Prefix:
    """``RoundContext.prefix`` of a round: ``prefix(block_sum, shape)`` all-gathers one
    [shape] float64 tensor per rank (the block's sum, zero-padded; None: zeros) and returns
    the sum of the blocks before this one in step order (cut to block_sum's shape). Every
    rank calls it the same number of times (``called`` keeps a failed rank in step). A
    class, not a closure: a closure naming itself is a reference cycle, which kept the
    engine and so the process group alive past the user's destroy (issue #22)."""

    def __init__(self, comm: "_Comm", order, device):
        self.comm, self.order, self.device = comm, order, device
        self.called = False

    def __call__(self, block_sum, shape):
        self.called = True
        comm, me = self.comm, self.comm.rank
        pay = torch.zeros(shape, dtype=torch.float64, device=self.device)
        cut = tuple(slice(0, n) for n in (shape if block_sum is None else block_sum.shape))
        if block_sum is not None:
            pay[cut] = block_sum
        allb = comm.all_gather(pay.reshape(-1), "triangular Gram prefix").view(comm.size, *shape)
        off = torch.zeros_like(pay)
        for k in self.order[:self.order.index(me)] if me in self.order else []:
            off = off + allb[k]
        return off[cut]


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


def _kept_split(parts, lo: int, old_hi: int, hi: int, last_owner: int):
    """The current split on the new window [lo, hi) with as little moving as possible:
    blocks lose their frozen steps; the steps entering at the back go to the ranks whose
    blocks froze whole (split evenly among them, in the order they froze), else to the
    rank that held the old last step. Only the entering steps' start value moves."""
    R = len(parts)
    # (a window the planner shrank: blocks are cut at hi; the steps past it keep their
    # iterates where they are, and enter again as "fill" steps if the window grows back)
    kept = [(max(a, lo), min(b, hi)) if min(b, hi) > max(a, lo) else (hi, hi) for a, b in parts]
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


def _migrate(comm: _Comm, X, lin, rule, old, new, old_hi: int, last_owner: int, sst: ShardStats,
             order: int = 1, final_owner: Optional[torch.Tensor] = None):
    """Move what each rank needs under the new split from the ranks that hold it: the
    state before its block (its next carry; for an order-2 chain the one before that
    too, which may be a state frozen before the old window: ``final_owner`` holds it),
    and for steps new to it their state, secant history and the update rule's per-step
    history (``export_steps``). Every rank computes the same transfer list."""
    me = comm.rank
    old_lo = min((a for a, b in old if b > a), default=old_hi)

    def src(s):
        if s < old_lo and final_owner is not None:
            return int(final_owner[s])
        return _owner_of(old, s) if s < old_hi else last_owner

    def holds(k, s):
        a, b = old[k]
        if s < old_lo and final_owner is not None:
            return int(final_owner[s]) == k
        return a <= s < b or (s >= old_hi and k == last_owner)

    # kind: "full" a step joining a block (state and histories), "x" the state before a
    # block, "fill" steps entering the window (their start values, which the rank that
    # held the old last step computed: enter_steps)
    transfers = []          # (src, dst, s0, s1, kind)
    for k, (a, b) in enumerate(new):
        if b <= a:
            continue
        need = [s for s in range(a - order, a) if s >= 0]
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
    export_lin = getattr(lin, "export_steps", lambda s0, s1, dtype: [])
    sends, recvs, after = [], [], []
    for p, k, s0, s1, kind in transfers:
        if me not in (p, k):
            continue
        full = kind == "full"
        lin_fields = export_lin(s0, s1, X.dtype) if full else []
        fields = [X[s0:s1], *lin_fields, *(rule.export_steps(s0, s1) if full else [])]
        if me == p:
            sends += [(k, f.contiguous()) for f in fields]
        else:
            bufs = [torch.empty_like(f.contiguous()) for f in fields]
            recvs += [(p, t) for t in bufs]
            after.append((s0, s1, full, len(lin_fields), bufs))
            if full:
                sst.migrated_steps += s1 - s0
    comm.exchange(sends, recvs, "step migration")
    for s0, s1, full, n_lin, bufs in after:
        X[s0:s1] = bufs[0]
        if full:
            if n_lin:
                lin.import_steps(s0, s1, bufs[1:1 + n_lin])
            rule.import_steps(s0, s1, bufs[1 + n_lin:])


def sharded_param_grads(cfg: ShardConfig, adj, lam: torch.Tensor, chunk: int, stats):
    """(dL/dθ, model calls) of a sharded adjoint: Σ_k (∂ē_k/∂θ)ᵀ(Q_k λ_{k+1}) with each
    rank its share of the steps, then one all-reduce per parameter (and of the model
    calls). An error on one rank reaches every rank (they wait in the all-reduce)."""
    comm = _Comm(cfg.group, cfg.timeout, stats.sharding)
    grads: List[torch.Tensor] = []
    if adj.params:
        k0, k1 = even_split(0, adj.num_steps, comm.size)[comm.rank]
        total: List[Optional[torch.Tensor]] = [None] * len(adj.params)
        try:          # an error here must reach the peers, which wait in the all-reduce
            total = adj.param_grads(lam, chunk, k0, k1)
        except Exception as e:                         # noqa: BLE001
            comm.failed = e
        comm.gather_checked(torch.zeros(1, dtype=torch.float64, device=lam.device),
                            "parameter VJPs")
        for t, p in zip(total, adj.params):
            g = torch.zeros_like(p) if t is None else t.detach().clone()
            _all_reduce(comm, g, "parameter gradients")
            grads.append(g)
    calls = torch.tensor([float(adj.model_calls)], dtype=torch.float64, device=lam.device)
    _all_reduce(_Comm(cfg.group, cfg.timeout, stats.sharding), calls, "model call count")
    return grads, int(calls.to("cpu")[0])
