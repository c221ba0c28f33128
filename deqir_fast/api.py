"""The public entry points: ``sample_serial`` (the reference loop) and ``solve`` (the
whole chain as one fixed-point system, in parallel)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ._checks import check_positive_int, check_tensor, state_dtype
from .chains import Chain
from .linearize import check_linearize
from .solvers import Planner, SolveOptions, SolverStats, fixed_point_solve, make_rule
from .solvers.loop import plan_regime
from .solvers.planner import SERIAL, as_planner
from .solvers.policy import shadow_applies
from .solvers.options import DEFAULT_TOL, FIELDS as OPTION_FIELDS
from .system import ChainSystem, Model

DEFAULT_FLOOR = SolveOptions.floor     # the noise-unit floor of the last states
DEFAULT_INIT = "auto"
INITS = ("auto", "jump", "pinv", "x_T")
# The initial guesses that cost one model call on B images (counted in nfe).
INITS_WITH_MODEL_CALL = ("auto", "jump", "pinv")
DEFAULT_SOLVER = "picard"
DEFAULT_LINEARIZE = "secant"


class _Handle:
    """What a backward pass needs from a forward solve (kept by ``SolveResult``):
    ``adjoint_kw``, the adjoint solve's settings (the forward solve's rule, window and
    final J; ``tol`` = ``grad_tol``); ``shard``, a sharded solve's ``distributed.GroupRef``
    (its backward shards the adjoint over the same group, which the handle holds only
    weakly), else None."""

    def __init__(self, system, X, x0, x_T, noise, params, adjoint_kw, shard=None):
        self.system, self.X, self.x0, self.x_T, self.noise = system, X, x0, x_T, noise
        self.params = params
        self.adjoint_kw = adjoint_kw
        self.shard = shard

    def gradients(self, grad_x0, params=None, x_T=None, **overrides):
        """The adjoint solve's gradients for dL/dx0 = ``grad_x0`` (``x_T``: the leaf to take
        dL/dx_T for, default the solve's; ``overrides``: e.g. ``tol``, ``y``)."""
        from .gradients import adjoint_gradients
        kw = dict(self.adjoint_kw, **overrides)
        if self.shard is not None:
            kw["process_group"] = self.shard.config()
        return adjoint_gradients(self.system, self.X, grad_x0,
                                 x_T=self.x_T if x_T is None else x_T, noise=self.noise,
                                 params=self.params if params is None else params, **kw)


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
    _check_model_timesteps(model, chain)
    check_tensor("x_T", x_T)
    chain.check_inputs(x_T)
    dtype = state_dtype(x_T.dtype)
    noise = _draw_noise(chain, x_T, noise, generator, dtype)
    with torch.set_grad_enabled(with_grad):
        source = x_T if with_grad else x_T.detach()
        coeffs = chain.coefficients(source.to(dtype), noise if chain.needs_noise else None)
    return ChainSystem(model, chain, coeffs, allow_tf32=bool(allow_tf32)), noise


def _check_model_timesteps(model, chain) -> None:
    """A chain from a diffusers σ-space scheduler numbers its steps 0..S-1 and keeps the
    network's timesteps in ``chain.model_timesteps``: a model that does not map them would
    run the network at the wrong times and return garbage, converged. Refused unless the
    model carries the same map (``models.eps_model(network, scheduler, chain=chain)``
    does; a callable of your own may set ``model_timesteps`` to the chain's)."""
    wanted = getattr(chain, "model_timesteps", None)
    if wanted is None:
        return
    got = getattr(model, "model_timesteps", None)
    if not (isinstance(got, torch.Tensor) and got.shape == wanted.shape
            and torch.equal(got.detach().cpu(), wanted)):
        raise ValueError(
            f"model must run the network at the scheduler's timesteps: this "
            f"{type(chain).__name__} (from {getattr(chain, 'scheduler_class', 'a diffusers scheduler')}) "
            f"calls model(x, t) with step indices t = 0..{chain.num_steps - 1}; build the "
            f"model with dq.models.eps_model(network, scheduler, chain=chain), or give your "
            f"callable a model_timesteps attribute equal to chain.model_timesteps and map t "
            f"through it")


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


def solve(model: Model, chain: Chain, x_T: torch.Tensor, *,
          noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
          solver: str = DEFAULT_SOLVER, linearize: str = DEFAULT_LINEARIZE,
          tol: float = DEFAULT_TOL, window=None, init=DEFAULT_INIT,
          max_iter: Optional[int] = None, callback: Optional[Callable[[dict], None]] = None,
          grad: str = "ift", process_group=None, options: Optional[SolveOptions] = None,
          **unknown) -> SolveResult:
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
        window: steps evaluated per round (sliding window; default all S). Steps
            entering it start on the chain from the last state with the last model
            output held (η = 0 chains; a copy of the last state otherwise), and a window
            with steps after it is accepted only at ``tol * freeze_ratio``
            (docs/design.md §3c). ``"auto"``: the throughput planner picks the window
            before every move from the model's cost per call measured on this device
            (cached per model, image shape, dtype and device for the process) and the
            front's advance in this solve, or switches to the serial sampler when that is
            faster (``res.stats.plan``; docs/design.md §3e). A ``Planner`` instance sets
            its options (clock, max_window, ...). The rounds then depend on timing; the
            result is within ``tol`` of serial as always.
        init: the initial guess of the stacked states: ``"auto"`` (the default:
            ``"pinv"`` for DDRM and DDNM, ``"jump"`` otherwise), ``"jump"`` (every state
            set to the one-step DDIM jump from x_T to its noise level; one extra model
            call on B images, counted in ``nfe``; 11 rounds against 12 for ``"x_T"`` on
            DDIM-100, bench/RESULTS.md), ``"pinv"`` (the same jump with x̂0 = A⁺y where
            the measurement sees the image, 0 elsewhere: 2-4 fewer rounds than
            ``"jump"`` on the restoration chains), ``"x_T"`` (every state set to the
            initial state, as DeqIR does), or a previous ``states`` tensor
            [S, *x_T.shape] to warm-start from.
        max_iter: rounds at most (default S).
        callback: called after every round with a dict (iteration, window,
            residuals, nfe, state: the live stacked iterate in the chain's basis; read
            it, do not modify it; a sharded solve adds rank and block).
        grad: when ``x_T`` or the chain's ``y`` requires grad, ``res.x0`` is
            differentiable: ``"ift"`` solves the adjoint (upper-triangular) system in
            parallel rounds of one batched vector–Jacobian product (to
            ``options.grad_tol``, relative to max|dL/dx0|); ``"phantom"`` backpropagates
            through ``options.phantom_steps`` damped rounds from the solution (cheap,
            approximate); ``"unrolled"`` through the serial chain (the reference; S model
            calls with a graph). The model's parameters that require grad receive
            gradients too.
        process_group: shard the steps across the ranks of a ``torch.distributed``
            group (gloo on CPU, nccl on CUDA; e.g. under ``torchrun``): each rank runs the
            model on its block of the window and exchanges O(1) states per round
            (``deqir_fast.distributed``). Every rank calls ``solve`` with the same
            arguments and gets the same result (x0, states, stats; the rank's own
            accounting in ``res.stats.sharding``). A ``ShardConfig`` sets the timeout
            and rebalancing. An error on any rank raises ``ShardError`` on every rank.
        options: the expert knobs, a ``SolveOptions`` (floor, freeze_ratio,
            serial_shadow, the Anderson rules' history, check_every, cuda_graph,
            allow_tf32, grad_tol, ...), each documented there; None: the defaults.
    """
    options = _check_arguments(solver, linearize, grad, tol, max_iter, window, process_group,
                               options, unknown)
    _check_order(chain, options)
    start = time.perf_counter()
    system, noise = _prepare(model, chain, x_T, noise, generator, allow_tf32=options.allow_tf32)
    with torch.no_grad():
        planner = as_planner(window)
        if (planner is not None and process_group is None and isinstance(init, str)
                and _starts_serial(planner, system, solver, linearize, tol, options)):
            init = "x_T"                 # the serial sampler needs no initial guess
        X, extra_nfe = _initial_guess(system, init, x_T)
        engine = shard = None
        if process_group is not None:
            from .distributed import GroupRef, ShardedEngine, resolve
            cfg = resolve(process_group)
            engine, shard = ShardedEngine(cfg), GroupRef(cfg)
        X, stats = fixed_point_solve(system, X, solver=solver, linearize=linearize,
                                     tol=float(tol), max_iter=max_iter,
                                     window=window if planner is None else planner,
                                     callback=callback, options=options,
                                     initial_nfe=extra_nfe, engine=engine)
        lin = stats.linearization
        states = chain.from_basis(X.flatten(0, 1)).view_as(X)
    params = [p for p in getattr(model, "parameters", lambda: [])() if p.requires_grad]
    adjoint_kw = dict(solver=solver, linearize=linearize, window=window, tol=options.grad_tol,
                      forward_jacobian=lin.jacobian if lin.active else None,
                      options=_adjoint_options(options))
    handle = _Handle(system, X, states[-1], x_T, noise, params, adjoint_kw, shard=shard)
    x0 = states[-1]
    y = getattr(chain, "y", None)
    if torch.is_grad_enabled() and (x_T.requires_grad or (y is not None and y.requires_grad)):
        x0 = _differentiable_x0(handle, model, chain, grad, options)
    return SolveResult(x0=x0, states=states, iterations=stats.iterations,
                       nfe=stats.nfe, converged=stats.converged,
                       residuals=stats.residual_trace, seconds=time.perf_counter() - start,
                       stats=stats, handle=handle)


def _check_arguments(solver, linearize, grad, tol, max_iter, window, process_group, options,
                     unknown) -> SolveOptions:
    """``solve``'s argument checks, before any work; returns the options to use."""
    if unknown:
        expert = [k for k in unknown if k in OPTION_FIELDS]
        if expert:
            shown = ", ".join(f"{k}={unknown[k]!r}" for k in expert)
            raise TypeError(f"{', '.join(expert)} {'is an' if len(expert) == 1 else 'are'} "
                            f"expert option{'s' if len(expert) > 1 else ''} of solve: pass "
                            f"options=deqir_fast.SolveOptions({shown})")
        raise TypeError(f"solve() got unexpected keyword argument(s) {sorted(unknown)}")
    options = SolveOptions() if options is None else options
    if not isinstance(options, SolveOptions):
        raise TypeError(f"options must be a deqir_fast.SolveOptions, got {type(options).__name__}")
    make_rule(solver, options)      # the rule's options checked before any work
    check_linearize(linearize)
    if grad not in GRADS:
        raise ValueError(f"grad must be one of {GRADS}, got {grad!r}")
    if not (isinstance(tol, (int, float)) and not isinstance(tol, bool) and math.isfinite(tol)
            and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    check_positive_int("max_iter", max_iter, allow_none=True)
    if isinstance(window, str) or isinstance(window, Planner):
        if not isinstance(window, Planner) and window != "auto":
            raise ValueError(f"window must be an int >= 1, None (the whole chain), 'auto' "
                             f"or a deqir_fast.Planner, got {window!r}")
    else:
        check_positive_int("window", window, allow_none=True)
    if process_group is not None:
        if options.history_dtype is not None:
            raise ValueError("history_dtype is not supported with process_group (the sharded "
                             "solve keeps its Anderson history in the state dtype)")
        if options.check_every != 1 or options.cuda_graph:
            raise ValueError("a sharded solve reads the residuals every round: check_every "
                             "must be 1 and cuda_graph False with process_group")
    return options


def _check_order(chain, options) -> None:
    """What an order-2 chain (DPM-Solver++(2M)) does not run yet: a ValueError before any
    work. Its step reads the state two steps back, which the captured rounds do not carry
    yet (docs/design.md §2.8)."""
    if getattr(chain, "order", 1) != 2:
        return
    name = type(chain).__name__
    if options.cuda_graph:
        raise ValueError(f"{name} (an order-2 chain) does not run in CUDA graphs yet: "
                         f"cuda_graph=False")


def _starts_serial(planner, system, solver, linearize, tol, options) -> bool:
    """Whether the planner runs the serial sampler from the first step (its probe runs
    here, before the initial guess's model call, which the serial sampler does not need)."""
    u0 = system.coeffs.u0
    planner.start(system, u0.expand(system.num_steps, *u0.shape),
                  regime=plan_regime(solver, linearize, float(tol), options))
    shadow = shadow_applies(system, tol, options.freeze_ratio, options.serial_shadow)
    return planner.choose(0, 0, shadow, exact=tol * options.freeze_ratio == 0) == SERIAL


def _initial_guess(system, init, x_T):
    """(stacked initial states in the chain's basis, the model calls they cost)."""
    if isinstance(init, str):
        return initial_states(system, init)
    S, u0 = system.num_steps, system.coeffs.u0
    check_tensor("init", init, shape=(S, *x_T.shape))
    return system.chain.to_basis(init.detach().to(u0).flatten(0, 1)).view(S, *u0.shape).clone(), 0


def _adjoint_options(options: SolveOptions) -> SolveOptions:
    """The adjoint solve's options: the forward solve's update rule settings, floor 1
    (the adjoint states have no noise level), the loop's other defaults."""
    return SolveOptions(floor=1.0, history=options.history, anderson_reg=options.anderson_reg,
                        anderson_damping=options.anderson_damping,
                        history_dtype=options.history_dtype, rule_options=options.rule_options)


def _differentiable_x0(handle: _Handle, model, chain, grad, options: SolveOptions):
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
        phantom_steps, phantom_damping = options.phantom_steps, options.phantom_damping
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
    overrides = {} if tol is None else {"tol": float(tol)}
    x_T = h.x_T.detach().requires_grad_(True)
    y = getattr(h.system.chain, "y", None)
    y = None if y is None else y.detach().requires_grad_(True)
    # the handle's own settings (sharded over the solve's group for a sharded solve)
    out = h.gradients(grad_x0, params=h.params if params else [], x_T=x_T, y=y, **overrides)
    if params:
        for p, g in zip(h.params, out["params"]):
            if g is not None:
                p.grad = g.detach().clone() if p.grad is None else p.grad + g
    return {"x_T": out["x_T"], "y": out["y"], "rounds": out["stats"].iterations,
            "nfe": out["stats"].nfe + out["model_calls"]}
