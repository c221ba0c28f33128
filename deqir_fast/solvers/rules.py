"""Update rules: how the window's next iterate follows from X and F(X) (docs/design.md §3).

A rule is registered once (``@register_solver(name)``) and runs in every engine: the
eager loop, the batched read-back (``check_every``) and the sharded solve, where each
rank calls it on its block of the window. Its contract:

- ``__call__(X, FX, G)`` or ``__call__(X, FX, G, ctx)`` (the parameter named ``ctx``):
  the next iterate of a block of steps, [b-a, B, ...], from X, F(X) and G = F(X) - X (G
  only when ``uses_residual``), in every round with steps left to update. A rule that
  keeps per-step history or couples steps takes ``ctx`` (``RoundContext``): the block's
  absolute steps, the most rows a block can have, and, in a sharded solve,
  ``ctx.prefix``, an exclusive sum over the window's blocks before this one (at most one
  call per round: it is a collective). It may be called with an empty block (a rank with
  no steps this round): it must then take part in the same ``ctx.prefix`` call as its
  peers and keep any round counter in step.
- ``start(ctx)``: once before the first round (and for the new rule of a restart);
  ``drop(n)``: the first n steps of the window froze; ``forget()``: clear all history.
- ``export_steps(s0, s1)`` / ``import_steps(s0, s1, tensors)``: the per-step history of
  steps s0..s1-1 as tensors, for a step that moves to another rank (stateless rules
  have none). The receiver sizes its buffers from its own ``export_steps(s0, s1)``, so
  their shapes must not depend on the data; neither may raise (a rank failing there
  leaves its peers to the collective timeout).
A duck-typed rule (any class with ``__call__``) gets ``Update``'s defaults for the rest.
Options come from ``SolveOptions``: a rule's constructor gets the fields it declares
(``history``, ``anderson_reg``, ...) and ``SolveOptions.rule_options``; an option it does
not take is an error, not ignored.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from ..ops.anderson import AndersonRing, DifferenceRing

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


@dataclass
class RoundContext:
    """Where a rule's block sits in the round: absolute steps [a, b) of the window
    [lo, hi); ``rows``, the most steps a block can hold (sizes per-step buffers);
    ``like``, one step's state [B, ...] (dtype and device); ``prefix``, in a sharded
    solve, a function of this block's partial sum returning the sum over the window's
    blocks before it (one collective: every rank calls it alike), None otherwise."""
    lo: int
    hi: int
    a: int
    b: int
    rows: int
    like: torch.Tensor
    prefix: Optional[Callable] = None


class Update:
    """An update rule (see the module docstring)."""

    uses_residual = True            # whether __call__ reads G (Picard does not)

    def __call__(self, X: torch.Tensor, FX: torch.Tensor, G: Optional[torch.Tensor],
                 ctx: Optional[RoundContext] = None) -> torch.Tensor:
        raise NotImplementedError

    def start(self, ctx: RoundContext) -> None:
        """Called once before the first round (and after a restart's new rule) with the
        first window's context: allocate per-step buffers here (``ctx.rows``, ``ctx.like``)."""

    def drop(self, n: int) -> None:
        pass

    def forget(self) -> None:
        pass

    def export_steps(self, s0: int, s1: int) -> List[torch.Tensor]:
        return []

    def import_steps(self, s0: int, s1: int, tensors: List[torch.Tensor]) -> None:
        pass


RULE_FIELDS = ("history", "anderson_reg", "anderson_damping", "history_dtype")


def make_rule(name: str, options) -> Update:
    """The rule ``name`` built with the ``SolveOptions`` fields its constructor takes (all
    of them for a ``**kwargs`` constructor) and ``options.rule_options``; a changed option
    it does not take is a ValueError, not ignored."""
    factory = SOLVERS[check_solver(name)]
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    kwargs = {k: getattr(options, k) for k in RULE_FIELDS if k in params or takes_any}
    unused = [k for k in RULE_FIELDS if k in options.changed() and k not in kwargs]
    if unused:
        raise ValueError(f"{', '.join(unused)} {'is' if len(unused) == 1 else 'are'} not an "
                         f"option of solver={name!r} (the anderson solvers take them)")
    both = sorted(set(kwargs) & set(options.rule_options))
    if both:
        raise ValueError(f"rule_options sets {', '.join(both)}, a SolveOptions field: set it "
                         f"as SolveOptions({both[0]}=...)")
    rule = factory(**kwargs, **options.rule_options)
    for method in ("start", "drop", "forget", "export_steps", "import_steps"):
        if not hasattr(rule, method):           # a duck-typed rule: Update's defaults
            setattr(rule, method, getattr(Update, method).__get__(rule))
    if not hasattr(rule, "uses_residual"):
        rule.uses_residual = True
    return rule


def takes_context(rule: Update) -> bool:
    """Whether the rule's ``__call__`` has a parameter named ``ctx`` (passed by keyword)."""
    return "ctx" in inspect.signature(rule.__call__).parameters


@register_solver("picard")
class Picard(Update):
    """X <- F(X) (Jacobi; exact after at most S rounds)."""

    uses_residual = False

    def __call__(self, X, FX, G, ctx=None):
        return FX


@register_solver("anderson")
class Anderson(Update):
    """Anderson acceleration with one set of weights per (step, batch item): history
    ``history``, regularisation ``anderson_reg`` (relative to the largest residual
    norm), damping ``anderson_damping`` (Walker & Ni 2011; DeqIR, DEQ-DDIM)."""

    prefix = False
    uses_residual = False           # G = F(X) - X is written straight into the ring

    def __init__(self, history: int = 4, anderson_reg: float = 1e-4,
                 anderson_damping: float = 1.0, history_dtype: Optional[torch.dtype] = None):
        self.history, self.reg, self.damping = history, anderson_reg, anderson_damping
        # history_dtype: keep the history as differences in that dtype (DifferenceRing,
        # e.g. bfloat16: 3.5 stacked states for history 4 instead of 8)
        self.history_dtype = history_dtype
        # The history lives in a preallocated ring (ops/anderson.py): entries are indexed
        # by absolute step, so frozen steps leave and new steps enter without re-stacking
        # (and a step can move to another rank with its rows), and each round adds one
        # Gram row instead of recomputing the m x m matrices. ``start`` gives its size,
        # ``ctx.rows``: the first window (later ones only lose steps at the front or are
        # cut at S), or the largest block of a sharded solve. It is allocated on first use
        # (after round 1's model call: not beside its U and E at the memory peak).
        self.ring = None

    def start(self, ctx):
        self._shape = (ctx.rows, ctx.like)

    def _ring(self):
        if self.ring is None:
            rows, like = self._shape
            self.ring = AndersonRing(self.history, rows, like) if self.history_dtype is None \
                else DifferenceRing(self.history, rows, like, self.history_dtype)
        return self.ring

    def __call__(self, X, FX, G, ctx):
        a, b = ctx.a, ctx.b
        if self.history_dtype is not None:
            if ctx.prefix is not None:
                raise ValueError("history_dtype is not supported in a sharded solve")
            return self._ring().update(a, b, X, FX, reg=self.reg, damping=self.damping,
                                       prefix=self.prefix)
        offset = None
        if self.prefix and ctx.prefix is not None:
            # the Gram sums of the window's steps on the ranks before this block
            shape = (ctx.like.shape[0], self.history, self.history)
            offset = lambda block_sum: ctx.prefix(block_sum, shape)  # noqa: E731
        if b == a:                  # no steps here: keep the slot count (and a collective)
            self._ring().skip()
            if offset is not None:
                offset(None)
            return X
        self._ring().push(a, b, X, FX=FX)
        # The ring holds copies of the entries, so the mix can overwrite X in place (one
        # stacked state less at the peak; bench/round.py --memory). (The first active
        # step needs no special case: it always freezes at F(X).)
        return self.ring.mix(a, b, reg=self.reg, damping=self.damping, prefix=self.prefix,
                             offset=offset, out=X)

    def forget(self):
        if self.ring is not None:
            self.ring.forget()

    def export_steps(self, s0, s1):
        return self._ring().export_rows(s0, s1)

    def import_steps(self, s0, s1, tensors):
        self._ring().import_rows(s0, s1, tensors)


@register_solver("triangular_anderson")
class TriangularAnderson(Anderson):
    """Anderson whose Gram matrix at step s sums those of steps lo..s (ParaTAA, Tang et
    al. 2024): a step's weights also see the residuals of the steps that feed it."""

    prefix = True
