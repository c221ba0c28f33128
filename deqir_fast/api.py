"""The public entry points: ``sample_serial`` (the reference loop) and ``solve`` (the
whole chain as one fixed-point system, in parallel)."""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ._checks import check_positive_int, check_tensor, state_dtype
from .chains import Chain
from .linearize import check_linearize
from .solvers import FREEZE_RATIO, SolverStats, check_history_dtype, check_solver, fixed_point_solve
from .system import ChainSystem, Model

# Default stopping rule: stop when every step has max|F(X)_i - X_i| <= TOL * max(σ_i, FLOOR).
# Calibrated by `bench/calibrate.py` (bench/RESULTS.md §8, "The stopping rule") on 372 recorded
# solves: the bundled UNet and photo16 (9 chains, S = 20 and 100) and 300 seeds of the
# README's Gaussian-mixture problems. At TOL = 0.01 none ends over one grey level
# (2/255; worst 8.4e-4); the first failures (mode selection on the mixture prior, 1.7
# off) appear at 0.03, so 0.01 keeps a 3x margin. 3e-3 costs 0.4 more rounds on average.
DEFAULT_TOL = 1e-2
DEFAULT_FLOOR = 0.1
DEFAULT_INIT = "auto"
INITS = ("auto", "jump", "pinv", "x_T")
# The initial guesses that cost one model call on B images (counted in nfe).
INITS_WITH_MODEL_CALL = ("auto", "jump", "pinv")
DEFAULT_SOLVER = "picard"
DEFAULT_LINEARIZE = "secant"
# Adjoint stopping rule, relative to max|dL/dx0|. Measured on DDIM-100 with the bundled
# model (bench/HISTORY.md §4): 1e-3 stops after 12 adjoint rounds, 1e-8 runs all 100,
# and both leave the same 1.8e-4 relative error against autograd through the serial
# chain: the forward solve's tolerance dominates.
DEFAULT_GRAD_TOL = 1e-3


class _Handle:
    """What a backward pass needs from a forward solve (kept by ``SolveResult``).
    ``shard``: a sharded solve's ``distributed.GroupRef`` (its backward shards the adjoint
    over the same group, which the handle holds only weakly), else None."""

    def __init__(self, system, X, x0, x_T, noise, params, solve_kw, shard=None):
        self.system, self.X, self.x0, self.x_T, self.noise = system, X, x0, x_T, noise
        self.params = params
        self.solve_kw = solve_kw
        self.shard = shard

    def adjoint(self):
        """The adjoint solver of this solve: ``gradients.adjoint_gradients``, or its
        sharded version bound to the solve's process group."""
        if self.shard is None:
            from .gradients import adjoint_gradients
            return adjoint_gradients
        from .distributed import sharded_adjoint_gradients
        return functools.partial(sharded_adjoint_gradients, process_group=self.shard.config())

    def gradients(self, grad_x0, params=None):
        return self.adjoint()(self.system, self.X, grad_x0, x_T=self.x_T, noise=self.noise,
                              params=self.params if params is None else params, **self.solve_kw)


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
    handle: Optional[_Handle] = None


def _draw_noise(chain: Chain, x_T, noise, generator, dtype):
    S = chain.num_steps
    if noise is None:
        if chain.needs_noise:
            return torch.randn((S, *x_T.shape), generator=generator, dtype=dtype, device=x_T.device)
        return None
    check_tensor("noise", noise, shape=(S, *x_T.shape))
    if noise.device != x_T.device:
        raise ValueError(f"noise is on {noise.device} but x_T is on {x_T.device}")
    return noise.to(dtype)


def initial_states(system, init: str = DEFAULT_INIT):
    """The stacked initial states of ``system`` for a named ``init`` (see ``solve``) and the
    model calls they cost: ``"auto"`` is ``"pinv"`` for a chain with an operator, else
    ``"jump"``."""
    if init == "auto":
        init = "pinv" if system.chain.operator is not None else "jump"
    if init == "x_T":
        u0 = system.coeffs.u0
        return u0.unsqueeze(0).repeat(system.chain.num_steps, *([1] * u0.dim())), 0
    if init == "jump":
        return system.jump_init(), 1
    if init == "pinv":
        return system.pinv_init(), 1
    raise ValueError(f"init must be one of {INITS} or a states tensor, got {init!r}")


def _prepare(model, chain: Chain, x_T, noise, generator, with_grad: bool = False,
             allow_tf32: bool = False):
    if not isinstance(chain, Chain):
        raise TypeError(f"chain must be a deqir_fast chain (DDIM, DDRM, DDNM), "
                        f"got {type(chain).__name__}")
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, t), got {type(model).__name__}")
    check_tensor("x_T", x_T)
    chain.check_inputs(x_T)
    dtype = state_dtype(x_T.dtype)
    noise = _draw_noise(chain, x_T, noise, generator, dtype)
    with torch.set_grad_enabled(with_grad):
        source = x_T if with_grad else x_T.detach()
        coeffs = chain.coefficients(source.to(dtype), noise if chain.needs_noise else None)
    return ChainSystem(model, chain, coeffs, allow_tf32=bool(allow_tf32)), noise


def sample_serial(model: Model, chain: Chain, x_T: torch.Tensor,
                  noise: Optional[torch.Tensor] = None,
                  generator: Optional[torch.Generator] = None,
                  callback: Optional[Callable[[dict], None]] = None,
                  return_states: bool = False, allow_tf32: bool = False):
    """Run the sampler step by step (S model calls). Returns x0, or [S, *x_T.shape]
    states with ``return_states=True``.

    ``x_T`` and ``noise`` ([S, *x_T.shape]) are standard-normal draws in the chain's
    basis; with ``noise=None`` it is drawn from ``generator`` exactly as ``solve`` does.
    When ``x_T`` or the chain's ``y`` requires grad (and grad mode is on) the result is
    differentiable by plain autograd through the whole chain: the reference gradient.
    On CUDA the model runs without TF32 unless ``allow_tf32`` (see ``solve``).
    """
    y = getattr(chain, "y", None)
    with_grad = torch.is_grad_enabled() and (
        (isinstance(x_T, torch.Tensor) and x_T.requires_grad) or (y is not None and y.requires_grad))
    with torch.set_grad_enabled(with_grad):
        system, _ = _prepare(model, chain, x_T, noise, generator, with_grad=with_grad,
                             allow_tf32=allow_tf32)
        U = system.serial(callback)
        states = chain.from_basis(U.flatten(0, 1)).view_as(U)
    return states if return_states else states[-1]


GRADS = ("ift", "phantom", "unrolled")


def solve(model: Model, chain: Chain, x_T: torch.Tensor, noise: Optional[torch.Tensor] = None,
          generator: Optional[torch.Generator] = None, solver: str = DEFAULT_SOLVER,
          linearize: str = DEFAULT_LINEARIZE,
          tol: float = DEFAULT_TOL, max_iter: Optional[int] = None, window: Optional[int] = None,
          init=DEFAULT_INIT, floor: float = DEFAULT_FLOOR, freeze_ratio: float = FREEZE_RATIO,
          history: int = 4, history_dtype: Optional[torch.dtype] = None,
          anderson_reg: float = 1e-4, anderson_damping: float = 1.0,
          callback: Optional[Callable[[dict], None]] = None, grad: str = "ift",
          grad_tol: float = DEFAULT_GRAD_TOL, phantom_steps: int = 5, phantom_damping: float = 0.5,
          check_every: int = 1, cuda_graph: bool = False, allow_tf32: bool = False,
          process_group=None, serial_shadow: bool = True,
          ) -> SolveResult:
    """Solve the whole sampling chain as one fixed-point system, in parallel.

    Each round evaluates ``model`` once on every active step's state (a batch of
    window x B images) and rebuilds all states with the linearised affine scan. Steps
    converge front to back and are frozen once the steps before them have converged;
    with ``max_iter >= S`` (the default) the result always reaches the serial sampler's.

    Args:
        model: ``model(x, t) -> eps``, x: [N, C, H, W], t: LongTensor [N].
        chain: a ``DDIM``, ``DDRM`` or ``DDNM`` chain.
        x_T, noise, generator: as for ``sample_serial`` (same seed, same result).
        solver: the update rule, a name in ``deqir_fast.solvers.SOLVERS``:
            ``"picard"`` (X <- F(X); the default), ``"anderson"`` (per-step weights) or
            ``"triangular_anderson"`` (prefix-summed Gram matrices).
        linearize: the Jacobian guess J folded into the scan (docs/design.md §3a):
            ``"secant"`` (the default: a Gaussian-prior start refitted every round per
            step, batch item and coefficient class), ``"gaussian"``, ``"paradigms"``
            (J = (1-P)/Q, ParaDiGMS' update) or ``"none"`` (J = 0, DeqIR's map). The
            fixed point, and so the answer, is the same for every choice.
        tol: stop when every step has max|F(X)_i - X_i| / max(σ_i, floor) <= tol.
        max_iter: rounds at most (default S).
        window: steps evaluated per round (sliding window; default all S). Steps
            entering it start on the chain from the last state with the last model
            output held (η = 0 chains; a copy of the last state otherwise), and a window
            with steps after it is accepted only at ``tol * freeze_ratio``
            (docs/design.md §3c).
        floor: the residual of a nearly noise-free state is measured against
            max(σ_i, floor), so the last states need not be exact to the last bit.
        freeze_ratio: leading steps are frozen (and leave the window) once every step
            before them has a residual <= tol * freeze_ratio. 1 freezes at tol itself,
            as ParaDiGMS does; that locks in errors the chain then amplifies
            (bench/RESULTS.md), hence the default 0.01.
        init: the initial guess of the stacked states: ``"auto"`` (the default:
            ``"pinv"`` for DDRM and DDNM, ``"jump"`` otherwise), ``"jump"`` (every state
            set to the one-step DDIM jump from x_T to its noise level; one extra model
            call on B images, counted in ``nfe``; 11 rounds against 12 for ``"x_T"`` on
            DDIM-100, bench/RESULTS.md), ``"pinv"`` (the same jump with x̂0 = A⁺y where
            the measurement sees the image, 0 elsewhere: 2-4 fewer rounds than
            ``"jump"`` on the restoration chains), ``"x_T"`` (every state set to the
            initial state, as DeqIR does), or a previous ``states`` tensor
            [S, *x_T.shape] to warm-start from.
        history, anderson_reg, anderson_damping: Anderson history size,
            regularisation and damping.
        history_dtype: keep Anderson's history in this dtype (e.g. ``torch.bfloat16``) as
            differences between rounds, which shrink with the residual, so rounding them
            does not stop the solve from reaching the serial answer: history 4 then holds
            3.5 stacked float32 states instead of 8 (bench/RESULTS.md §13). None (the
            default) keeps it in the state dtype.
        callback: called after every round with a dict (iteration, window,
            residuals, nfe, state: the live stacked iterate in the chain's basis;
            read it, do not modify it).
        grad: when ``x_T`` or the chain's ``y`` requires grad, ``res.x0`` is
            differentiable: ``"ift"`` solves the adjoint (upper-triangular) system in
            parallel rounds of one batched vector–Jacobian product (to ``grad_tol``,
            relative to max|dL/dx0|); ``"phantom"`` backpropagates through
            ``phantom_steps`` damped rounds X <- (1-τ)X + τF(X) from the solution
            (τ = ``phantom_damping``; cheap, approximate); ``"unrolled"`` through the
            serial chain (the reference; S model calls with a graph). The model's
            parameters that require grad receive gradients too.
        check_every: read the residuals back (the solver's one host synchronisation)
            once every k rounds; between reads the window and the freeze rule stay on
            the device. 1 (the default) reads every round. k > 1 re-evaluates frozen
            steps until the next read (counted in ``nfe``); S rounds still reach the
            serial answer.
        cuda_graph: on CUDA with ``check_every`` > 1 and the Picard solver, replay the
            rounds between two reads from a captured CUDA graph (falls back to eager
            rounds when the model cannot be captured; ``res.stats.graph_rounds``).
        allow_tf32: let the model's float32 matmuls and convolutions use TF32 on CUDA.
            Off by default: TF32 makes the model's output depend on the batch it runs
            in, and the chain amplifies that past one grey level (H200, DDIM-100:
            1.2e-2 from serial with TF32, 2.9e-4 without; bench/RESULTS.md §11), so
            ``converged`` could not promise the serial answer. The flags are set only
            inside the model calls and restored after.
        process_group: shard the steps across the ranks of a ``torch.distributed``
            group (gloo on CPU, nccl on CUDA; e.g. under ``torchrun``): each rank runs the
            model on its block of the window and exchanges O(1) states per round
            (``deqir_fast.distributed``). Every rank calls ``solve`` with the same
            arguments and gets the same result (x0, states, stats; the rank's own
            accounting in ``res.stats.sharding``). A ``ShardConfig`` sets the timeout
            and rebalancing. An error on any rank raises ``ShardError`` on every rank.
        serial_shadow: run the serial sampler alongside, one step per round inside the
            round's model call (one more step evaluation per round, counted in ``nfe``),
            and compare its state with the solve's wherever it reaches a step that is
            already frozen (docs/design.md §3d). A frozen state more than ``tol`` noise
            units off means the chain amplifies what the freeze rule accepts past what
            ``converged`` may promise (DDNM with η = 0 on a sharp mixture prior: up to
            0.13 off serial without it): the solve restarts after the shadow's step and
            freezes exact states only (``res.stats.serial_mismatch`` names the step),
            within S rounds in all. Steps beyond the rounds run are not checked. The
            states it compared are returned as its serial ones. Off (or
            ``tol * freeze_ratio == 0``, where every frozen state is exact already): no
            shadow.
    """
    check_solver(solver)
    check_linearize(linearize)
    if grad not in GRADS:
        raise ValueError(f"grad must be one of {GRADS}, got {grad!r}")
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    if not (isinstance(freeze_ratio, (int, float)) and 0 <= freeze_ratio <= 1):
        raise ValueError(f"freeze_ratio must be a number in [0, 1], got {freeze_ratio!r}")
    if not (isinstance(floor, (int, float)) and floor > 0):
        raise ValueError(f"floor must be a number > 0, got {floor!r}")
    check_positive_int("max_iter", max_iter, allow_none=True)
    check_positive_int("window", window, allow_none=True)
    check_positive_int("history", history)
    check_history_dtype(history_dtype)
    if history_dtype is not None and process_group is not None:
        raise ValueError("history_dtype is not supported with process_group (the sharded "
                         "solve keeps its Anderson history in the state dtype)")
    check_positive_int("check_every", check_every)
    if not isinstance(serial_shadow, bool):
        raise TypeError(f"serial_shadow must be True or False, got {serial_shadow!r}")
    start = time.perf_counter()
    system, noise = _prepare(model, chain, x_T, noise, generator, allow_tf32=allow_tf32)
    u0 = system.coeffs.u0
    S = chain.num_steps
    extra_nfe = 0
    with torch.no_grad():
        if isinstance(init, str):
            X, extra_nfe = initial_states(system, init)
        else:
            check_tensor("init", init, shape=(S, *x_T.shape))
            X = chain.to_basis(init.detach().to(u0).flatten(0, 1)).view(S, *u0.shape).clone()
        solve_kw = dict(solver=solver, history=history, anderson_reg=anderson_reg,
                        anderson_damping=anderson_damping)
        if history_dtype is not None:
            solve_kw["history_dtype"] = history_dtype
        if process_group is not None:
            from .distributed import sharded_fixed_point_solve
            solve_fn = functools.partial(sharded_fixed_point_solve, process_group=process_group)
        else:
            solve_fn = fixed_point_solve
        X, stats = solve_fn(system, X, linearize=linearize, tol=float(tol),
                            floor=float(floor), freeze_ratio=float(freeze_ratio),
                            max_iter=max_iter, window=window,
                            callback=callback, initial_nfe=extra_nfe,
                            check_every=check_every, cuda_graph=bool(cuda_graph),
                            serial_shadow=serial_shadow, **solve_kw)
        lin = stats.linearization
        solve_kw.update(linearize=linearize, window=window,
                        forward_jacobian=lin.jacobian if lin.active else None)
        states = chain.from_basis(X.flatten(0, 1)).view_as(X)
    params = [p for p in getattr(model, "parameters", lambda: [])() if p.requires_grad]
    shard = None
    if process_group is not None:         # its backward shards the adjoint the same way
        from .distributed import GroupRef, resolve
        shard = GroupRef(resolve(process_group))
    handle = _Handle(system, X, states[-1], x_T, noise, params, dict(solve_kw, tol=grad_tol),
                     shard=shard)
    x0 = states[-1]
    y = getattr(chain, "y", None)
    if torch.is_grad_enabled() and (x_T.requires_grad or (y is not None and y.requires_grad)):
        x0 = _differentiable_x0(handle, model, chain, grad, phantom_steps, phantom_damping)
    return SolveResult(x0=x0, states=states, iterations=stats.iterations,
                       nfe=stats.nfe, converged=stats.converged,
                       residuals=stats.residual_trace, seconds=time.perf_counter() - start,
                       stats=stats, handle=handle)


def _differentiable_x0(handle: _Handle, model, chain, grad, phantom_steps, phantom_damping):
    from .gradients import _ImplicitX0
    x_T = handle.x_T
    y = getattr(chain, "y", None)
    if grad == "ift":
        y_in = y if y is not None else x_T.new_zeros(0)
        return _ImplicitX0.apply(handle, x_T, y_in, *handle.params)
    value = handle.x0.detach()
    if grad == "unrolled":
        ref = sample_serial(model, chain, x_T, noise=handle.noise,
                            allow_tf32=handle.system.allow_tf32)
    else:
        check_positive_int("phantom_steps", phantom_steps)
        with torch.enable_grad():
            coeffs = chain.coefficients(x_T.to(handle.X.dtype), handle.noise)
            system = ChainSystem(model, chain, coeffs, allow_tf32=handle.system.allow_tf32)
            X = handle.X.detach()
            for _ in range(phantom_steps):
                X = (1 - phantom_damping) * X + phantom_damping * system.evaluate(X, 0, X.shape[0])
            ref = chain.from_basis(X[-1])
    return value + (ref - ref.detach())


def backward(result: SolveResult, grad_x0: torch.Tensor, params: bool = False,
             tol: Optional[float] = None) -> dict:
    """Gradients of a loss L(x0) from dL/dx0, without an autograd graph over the chain.

    Solves the adjoint system of ``result``'s chain in parallel rounds (the same solver,
    window and linearisation as the forward solve; ``tol`` relative to max|grad_x0|,
    default the solve's ``grad_tol``). Each round rebuilds the model's graph for the
    window's steps and frees it after one batched vector–Jacobian product, so memory is
    bounded by the window. Returns ``{"x_T": dL/dx_T, "y": dL/dy or None, "rounds":
    adjoint rounds, "nfe": model evaluations (each rebuilt forward and each VJP counts,
    one per step and round)}``. With ``params=True`` the model's parameters that
    require grad get dL/dθ added to their ``.grad``.
    """
    if not isinstance(result, SolveResult) or result.handle is None:
        raise TypeError("result must be the SolveResult of deqir_fast.solve")
    h = result.handle
    check_tensor("grad_x0", grad_x0, shape=tuple(h.x0.shape))
    kw = dict(h.solve_kw)
    if tol is not None:
        kw["tol"] = float(tol)
    adjoint_gradients = h.adjoint()                # sharded for a sharded solve
    x_T = h.x_T.detach().requires_grad_(True)
    y = getattr(h.system.chain, "y", None)
    y = None if y is None else y.detach().requires_grad_(True)
    out = adjoint_gradients(h.system, h.X, grad_x0, x_T=x_T, noise=h.noise, y=y,
                            params=h.params if params else [], **kw)
    if params:
        for p, g in zip(h.params, out["params"]):
            if g is not None:
                p.grad = g.detach().clone() if p.grad is None else p.grad + g
    return {"x_T": out["x_T"], "y": out["y"], "rounds": out["stats"].iterations,
            "nfe": out["stats"].nfe + out["model_calls"]}
