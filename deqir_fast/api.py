"""The public entry points: ``sample_serial`` (the reference loop) and ``solve`` (the
whole chain as one fixed-point system, in parallel)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ._checks import check_positive_int, check_tensor, state_dtype
from .chains import Chain
from .solvers import SOLVERS, SolverStats, fixed_point_solve
from .system import ChainSystem, Model

# Default stopping rule, calibrated in bench/RESULTS.md ("Calibrating the default
# tolerance"): per-step max|F(X) - X| <= TOL * max(σ_i, FLOOR).
DEFAULT_TOL = 1e-2
DEFAULT_FLOOR = 0.1


@dataclass
class SolveResult:
    """What ``solve`` returns. ``states``: [S, *x_T.shape], the image after each step
    (pixel space; ``states[-1]`` is ``x0``). ``residuals``: [rounds, S], per-step
    residuals in noise units (NaN where a step was already frozen)."""
    x0: torch.Tensor
    states: torch.Tensor
    iterations: int
    nfe: int
    converged: bool
    residuals: torch.Tensor
    seconds: float
    stats: SolverStats


def _prepare(model, chain: Chain, x_T, noise, generator):
    if not isinstance(chain, Chain):
        raise TypeError(f"chain must be a deqir_fast chain (DDIM, DDRM, DDNM), "
                        f"got {type(chain).__name__}")
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, t), got {type(model).__name__}")
    check_tensor("x_T", x_T)
    chain.check_inputs(x_T)
    dtype = state_dtype(x_T.dtype)
    x_T = x_T.to(dtype)
    S = chain.num_steps
    if noise is None:
        if chain.needs_noise:
            noise = torch.randn((S, *x_T.shape), generator=generator, dtype=dtype,
                                device=x_T.device)
    else:
        check_tensor("noise", noise, shape=(S, *x_T.shape))
        if noise.device != x_T.device:
            raise ValueError(f"noise is on {noise.device} but x_T is on {x_T.device}")
        noise = noise.to(dtype)
    coeffs = chain.coefficients(x_T, noise if chain.needs_noise else None)
    return ChainSystem(model, chain, coeffs)


@torch.no_grad()
def sample_serial(model: Model, chain: Chain, x_T: torch.Tensor,
                  noise: Optional[torch.Tensor] = None,
                  generator: Optional[torch.Generator] = None,
                  callback: Optional[Callable[[dict], None]] = None,
                  return_states: bool = False):
    """Run the sampler step by step (S model calls). Returns x0, or [S, *x_T.shape]
    states with ``return_states=True``.

    ``x_T`` and ``noise`` ([S, *x_T.shape]) are standard-normal draws in the chain's
    basis; with ``noise=None`` it is drawn from ``generator`` exactly as ``solve`` does.
    """
    system = _prepare(model, chain, x_T, noise, generator)
    U = system.serial(callback)
    states = chain.from_basis(U.flatten(0, 1)).view_as(U)
    return states if return_states else states[-1]


@torch.no_grad()
def solve(model: Model, chain: Chain, x_T: torch.Tensor, noise: Optional[torch.Tensor] = None,
          generator: Optional[torch.Generator] = None, solver: str = "triangular_anderson",
          tol: float = DEFAULT_TOL, max_iter: Optional[int] = None, window: Optional[int] = None,
          init="x_T", floor: float = DEFAULT_FLOOR, history: int = 4,
          lam: float = 1e-4, beta: float = 1.0,
          callback: Optional[Callable[[dict], None]] = None) -> SolveResult:
    """Solve the whole sampling chain as one fixed-point system, in parallel.

    Each round evaluates ``model`` once on every active step's state (a batch of
    window x B images) and rebuilds all states with the affine scan. Steps converge
    front to back and are frozen once their residual, in noise units, is below
    ``tol``; with ``max_iter >= S`` (the default) the result always reaches the serial
    sampler's.

    Args:
        model: ``model(x, t) -> eps``, x: [N, C, H, W], t: LongTensor [N].
        chain: a ``DDIM``, ``DDRM`` or ``DDNM`` chain.
        x_T, noise, generator: as for ``sample_serial`` (same seed, same result).
        solver: ``"picard"``, ``"anderson"`` (per-step weights) or
            ``"triangular_anderson"`` (prefix-summed Gram matrices; the default).
        tol: per-step stopping threshold on max|F(X)_i - X_i| / max(σ_i, floor).
        max_iter: rounds at most (default S).
        window: steps evaluated per round (sliding window; default all S).
        init: the initial guess of the stacked states: ``"x_T"`` (every state set to
            the initial state, as DeqIR does), ``"jump"`` (every state set to the
            one-step DDIM jump from x_T to its noise level: one extra model call on
            B images, counted in ``nfe``), or a previous ``states`` tensor
            [S, *x_T.shape] to warm-start from.
        history, lam, beta: Anderson history size, regularisation and damping.
        callback: called after every round with a dict (iteration, window,
            residuals, nfe).
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    if not (isinstance(floor, (int, float)) and floor > 0):
        raise ValueError(f"floor must be a number > 0, got {floor!r}")
    check_positive_int("max_iter", max_iter, allow_none=True)
    check_positive_int("window", window, allow_none=True)
    check_positive_int("history", history)
    start = time.perf_counter()
    system = _prepare(model, chain, x_T, noise, generator)
    u0 = system.coeffs.u0
    S = chain.num_steps
    extra_nfe = 0
    if isinstance(init, str):
        if init == "x_T":
            X = u0.unsqueeze(0).repeat(S, *([1] * u0.dim()))
        elif init == "jump":
            X = system.jump_init()
            extra_nfe = 1
        else:
            raise ValueError(f"init must be 'x_T', 'jump' or a states tensor, got {init!r}")
    else:
        check_tensor("init", init, shape=(S, *x_T.shape))
        X = chain.to_basis(init.to(u0).flatten(0, 1)).view(S, *u0.shape).clone()
    X, stats = fixed_point_solve(system, X, solver=solver, tol=float(tol), floor=float(floor),
                                 max_iter=max_iter, window=window, history=history,
                                 lam=lam, beta=beta, callback=callback)
    stats.nfe += extra_nfe
    states = chain.from_basis(X.flatten(0, 1)).view_as(X)
    return SolveResult(x0=states[-1], states=states, iterations=stats.iterations,
                       nfe=stats.nfe, converged=stats.converged,
                       residuals=stats.residual_trace, seconds=time.perf_counter() - start,
                       stats=stats)
