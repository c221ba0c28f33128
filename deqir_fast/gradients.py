"""Gradients through the solved chain (docs/design.md §4).

At the fixed point the states are the serial sampler's, u_{k+1} = P_k u_k + Q_k ē_k(u_k)
+ R_k, so the adjoint λ_k = dL/du_k obeys the backward recurrence

    λ_S = Vᵀ dL/dx0,    λ_k = P_k λ_{k+1} + J_kᵀ (Q_k λ_{k+1}),    J_k = ∂ē_k/∂u_k,

an upper-triangular system. ``AdjointSystem`` writes it in the forward system's form
(reversed step order, the carry is λ_S, the "model term" is one batched vector–Jacobian
product over the active window), so the same solvers, windows and stopping rules solve
it in parallel rounds; Picard is exact after S rounds. Each round rebuilds the model's
graph for the window's steps only and frees it after the VJP, so memory is bounded by
the window, like the forward solve's; no graph over the whole chain is ever kept. The
forward solve's final Jacobian guess D (diagonal) linearises the adjoint scan too: the
transpose of a diagonal is itself, so adjoint step k uses P_k + D_k Q_k. Then

    dL/dR_k = λ_{k+1},  dL/du_0 = λ_0,  dL/dθ = Σ_k (∂ē_k/∂θ)ᵀ (Q_k λ_{k+1}),

and autograd through the (cheap, elementwise) construction of u_0 and R gives the
gradients with respect to x_T and y.

An order-2 chain (DPM-Solver++(2M), docs/design.md §2.8), whose step k also adds
C_k u_{k-1} + D_k ē_{k-1}(u_{k-1}), feeds u_j into steps j and j + 1, so

    λ_j = P_j λ_{j+1} + C_{j+1} λ_{j+2} + J_jᵀ (Q_j λ_{j+1} + D_{j+1} λ_{j+2}),

λ_{S+1} = 0: the adjoint is order 2 too. Its scan carries λ_{j+2} (the C term, exact);
the VJP's cotangent takes the D term at the round's inputs, like the rest of the model
term; dL/dθ sums (∂ē_j/∂θ)ᵀ of the same cotangent.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from .solvers import SolveOptions, fixed_point_solve
from .system import ChainSystem, ieee_float32


class _FixedJacobian:
    """A linearisation that does not learn: J for window [lo, hi) from a function."""

    def __init__(self, jacobian):
        self._jacobian = jacobian
        self.active = jacobian is not None

    def jacobian(self, lo, hi):
        return self._jacobian(lo, hi) if self.active else None

    def observe(self, lo, hi, U, E):
        pass

    def disable(self):
        self.active = False


class AdjointSystem:
    """λ as the states of an affine chain run backwards over the forward solution X."""

    def __init__(self, forward: ChainSystem, X: torch.Tensor, grad_uS: torch.Tensor,
                 params: Sequence[torch.Tensor] = (), forward_jacobian=None):
        self.forward = forward
        c = forward.coeffs
        self.S = forward.num_steps
        # Reverse the step axis: adjoint step r is forward step S-1-r.
        self.P = c.P.flip(0)
        self.Q = c.Q.flip(0)
        self.carry0 = grad_uS
        self.params = list(params)
        self.X = X.detach()
        self.forward_jacobian = forward_jacobian     # (lo, hi) -> D of forward steps, or None
        self.model_calls = 0                         # forward passes rebuilt for the VJPs
        # order 2: adjoint step r (forward j = S-1-r) takes C_{j+1}, D_{j+1} (0 for j = S-1)
        self.order = getattr(forward, "order", 1)
        if self.order == 2:
            self.C, self.D = (t.flip(0) for t in forward.next_previous_coefficients())
        self._two_back = None                        # (lo, A_{lo-2}) of the last ``inputs``
        self.scale_value = float(grad_uS.abs().max().clamp_min(torch.finfo(grad_uS.dtype).tiny))

    @property
    def num_steps(self) -> int:
        return self.S

    def residual_scale(self, floor: float) -> torch.Tensor:
        return torch.full((self.S,), 1.0 / self.scale_value, dtype=torch.float64)

    def _forward_inputs(self, k0: int, k1: int) -> torch.Tensor:
        """The solved states entering forward steps k0..k1-1."""
        u0 = self.forward.coeffs.u0.unsqueeze(0)
        if k0 == 0:
            return torch.cat([u0, self.X[:k1 - 1]]) if k1 > 1 else u0
        return self.X[k0 - 1:k1 - 1]

    def _vjp(self, k0: int, k1: int, cot: torch.Tensor, params=()):
        """(∂ē/∂u)ᵀ cot for forward steps k0..k1-1 (cot in forward order), through a
        graph built for these steps only and freed on return."""
        inputs = self._forward_inputs(k0, k1).detach().requires_grad_(True)
        with torch.enable_grad():
            E = self.forward.eps_bar(inputs, k0)
            # the backward convolutions in IEEE float32 too, like the forward (system.py)
            with ieee_float32(inputs.device, self.forward.allow_tf32):
                grads = torch.autograd.grad(E, [inputs, *params], grad_outputs=cot,
                                            allow_unused=True)
        self.model_calls += k1 - k0
        first = torch.zeros_like(inputs) if grads[0] is None else grads[0]
        return first, grads[1:]

    def carry(self, A: torch.Tensor, lo: int) -> torch.Tensor:
        """The state entering adjoint step ``lo``."""
        return self.carry0 if lo == 0 else A[lo - 1]

    def inputs(self, A: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        if self.order == 2:       # λ_{j+2} of the window's first step, for its model term and scan
            self._two_back = (lo, torch.zeros_like(self.carry0) if lo == 0 else self.carry(A, lo - 1))
        carry = self.carry(A, lo).unsqueeze(0)
        return torch.cat([carry, A[lo:hi - 1]]) if hi - lo > 1 else carry

    def _before(self, lo: int) -> torch.Tensor:
        if self._two_back is None or self._two_back[0] != lo:
            raise RuntimeError("an order-2 adjoint round takes the inputs that "
                               "AdjointSystem.inputs returned for the same window")
        return self._two_back[1]

    def step_slopes(self, lin, a: int, b: int, like: torch.Tensor) -> torch.Tensor:
        """M_r = P'_r + J_r for adjoint steps a..b-1 (Q = 1 in A_r = P'_r A_{r-1} + E_r +
        J_r (A_{r-1} - U_r)): each step's slope in its input, what a sharded solve's carry
        correction composes (``ChainSystem.step_slopes``)."""
        J = lin.jacobian(a, b)
        return self.P[a:b] if J is None else self.P[a:b] + J

    def previous_slopes(self, lin, a: int, b: int, like: torch.Tensor) -> torch.Tensor:
        """C'_k for adjoint steps k = a+1 .. b (0 past the last), order 2: the C term's slope
        (its D term is in the model term, held at the round's inputs), for a sharded
        adjoint's carry correction (``ChainSystem.previous_slopes``)."""
        return torch.cat([self.C, torch.zeros_like(self.C[:1])])[a + 1:b + 1]

    def model_term(self, Ain: torch.Tensor, lo: int) -> torch.Tensor:
        """J_kᵀ(Q_k A) for adjoint steps lo..lo+W-1 (forward steps S-lo-W .. S-lo-1)."""
        hi = lo + Ain.shape[0]
        cot = self.Q[lo:hi] * Ain
        if self.order == 2:       # + D_{j+1} λ_{j+2}: the previous row's input
            cot = cot + self.D[lo:hi] * torch.cat([self._before(lo)[None], Ain[:-1]])
        cot = cot.flip(0)                               # forward order
        vjp, _ = self._vjp(self.S - hi, self.S - lo, cot)
        return vjp.flip(0)

    def scan(self, E: torch.Tensor, U: torch.Tensor, lo: int, hi: int,
             J: Optional[torch.Tensor] = None) -> torch.Tensor:
        """A_r = P'_r A_{r-1} + E_r + J_r (A_{r-1} - U_r) from the carry U[0]."""
        from .ops import affine_scan
        ones = torch.ones((hi - lo,) + (1,) * (U.dim() - 1), dtype=U.dtype, device=U.device)
        previous = None
        if self.order == 2:       # + C_{j+1} λ_{j+2}, carried as the scan runs
            before = self._before(lo)
            previous = (self.C[lo:hi], torch.zeros_like(self.C[lo:hi]), before,
                        torch.zeros_like(before))
        return affine_scan(self.P[lo:hi], ones, E, None, U[0], J, None if J is None else U,
                           previous)

    def linearization(self, kind: str):
        if kind == "none" or self.forward_jacobian is None:
            return _FixedJacobian(None)

        def jacobian(lo, hi):
            D = self.forward_jacobian(self.S - hi, self.S - lo)
            return None if D is None else (D * self.forward.coeffs.Q[self.S - hi:self.S - lo]).flip(0)
        return _FixedJacobian(jacobian)

    def lambdas(self, A: torch.Tensor) -> torch.Tensor:
        """[S+1, B, ...]: λ_0 .. λ_S in forward order from the solved adjoint states."""
        return torch.cat([A.flip(0), self.carry0.unsqueeze(0)])

    def param_grads(self, lam: torch.Tensor, chunk: int, k0: int = 0,
                    k1: Optional[int] = None) -> List[Optional[torch.Tensor]]:
        """Σ_k (∂ē_k/∂θ)ᵀ(Q_k λ_{k+1}) over forward steps k0..k1-1 (default all),
        ``chunk`` steps per rebuilt graph."""
        if not self.params:
            return []
        k1 = self.S if k1 is None else k1
        total: List[Optional[torch.Tensor]] = [None] * len(self.params)
        cot_all = self.forward.coeffs.Q * lam[1:]
        if self.order == 2:       # + D_{j+1} λ_{j+2}, λ_{S+1} = 0
            cot_all = cot_all + self.D.flip(0) * torch.cat([lam[2:], torch.zeros_like(lam[:1])])
        for c0 in range(k0, k1, chunk):
            c1 = min(c0 + chunk, k1)
            _, gs = self._vjp(c0, c1, cot_all[c0:c1], self.params)
            total = [g if t is None else (t if g is None else t + g) for t, g in zip(total, gs)]
        return total


def adjoint_gradients(system: ChainSystem, X: torch.Tensor, grad_x0: torch.Tensor, *,
                      x_T: torch.Tensor, noise: Optional[torch.Tensor], params=(),
                      y: Optional[torch.Tensor] = None,
                      solver: str = "picard", linearize: str = "secant", tol: float = 1e-6,
                      max_iter: Optional[int] = None, window=None,
                      forward_jacobian=None, options: Optional[SolveOptions] = None,
                      process_group=None) -> Dict[str, object]:
    """dL/dx_T, dL/dy and dL/dθ for dL/dx0 = ``grad_x0`` at the solution X (basis).
    ``window`` bounds the steps (and so the graph) of each round; ``forward_jacobian``
    is the forward solve's final J as a function of (lo, hi), or None; ``options`` the
    adjoint loop's (default: floor 1, the adjoint states having no noise level).
    ``process_group``: shard the adjoint solve like the forward one (each round one VJP
    per rank over its block) and split the parameters' VJPs over the ranks, summed with
    one all-reduce; every rank gets the same result (X must be the same on every rank: it
    is, after a sharded ``solve``)."""
    chain = system.chain
    grad_uS = chain.to_basis(grad_x0.to(X.dtype))
    adj = AdjointSystem(system, X, grad_uS, params, forward_jacobian)
    A0 = grad_uS.unsqueeze(0).repeat(system.num_steps, *([1] * grad_uS.dim()))
    engine = cfg = None
    if process_group is not None:
        from .distributed import ShardedEngine, resolve
        cfg = resolve(process_group)
        engine = ShardedEngine(cfg)
    A, stats = fixed_point_solve(adj, A0, solver=solver, linearize=linearize, tol=tol,
                                 max_iter=max_iter, window=window,
                                 options=SolveOptions(floor=1.0) if options is None else options,
                                 engine=engine)
    lam = adj.lambdas(A)
    out: Dict[str, object] = {"stats": stats, "lambda": lam}
    # the parameters' graph is rebuilt ``chunk`` steps at a time: the window (the largest
    # one a planned solve ran), so memory stays bounded by it
    chunk = max(stats.plan.windows) if stats.plan is not None and stats.plan.windows else (
        window if isinstance(window, int) else system.num_steps)
    if cfg is None:
        out["params"] = adj.param_grads(lam, chunk)
        # Honest cost: every VJP needed a forward pass of the model on the same batch.
        out["model_calls"] = adj.model_calls
    else:
        from .distributed import sharded_param_grads
        out["params"], out["model_calls"] = sharded_param_grads(cfg, adj, lam, chunk, stats)
    out.update(input_gradients(chain, lam, x_T, noise, y, X.dtype))
    return out


def input_gradients(chain, lam: torch.Tensor, x_T: torch.Tensor, noise, y, dtype) -> dict:
    """{"x_T": dL/dx_T, "y": dL/dy} from the adjoint states λ (None where the input
    does not require grad). x_T and y enter through u_0 and R only: autograd through
    their construction."""
    y = chain_y(chain) if y is None else y
    leaves = [t for t in (x_T, y) if t is not None and t.requires_grad]
    grads = {}
    if leaves:
        with torch.enable_grad():
            coeffs = chain.coefficients(x_T.to(dtype), noise, y)
            outs, cots = [coeffs.u0], [lam[0]]
            if coeffs.R is not None and coeffs.R.requires_grad:
                outs.append(coeffs.R)
                cots.append(_reduce_like(lam[1:], coeffs.R))
            g = torch.autograd.grad(outs, leaves, grad_outputs=cots, allow_unused=True)
        grads = dict(zip([id(t) for t in leaves], g))
    return {"x_T": _or_zeros(grads.get(id(x_T)), x_T) if x_T.requires_grad else None,
            "y": _or_zeros(grads.get(id(y)), y) if y is not None and y.requires_grad else None}


def chain_y(chain) -> Optional[torch.Tensor]:
    return getattr(chain, "y", None)


def _reduce_like(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum a cotangent over the dimensions ``like`` broadcasts (y with batch 1)."""
    dims = [i for i, (a, b) in enumerate(zip(g.shape, like.shape)) if b == 1 and a != 1]
    return g.sum(dims, keepdim=True) if dims else g


def _or_zeros(g, like):
    return torch.zeros_like(like) if g is None else g


class _ImplicitX0(torch.autograd.Function):
    """x0 of a solved chain as a function of (x_T, y, *params); backward solves the
    adjoint system (``grad="ift"``)."""

    @staticmethod
    def forward(ctx, handle, x_T, y, *params):
        ctx.handle = handle
        return handle.x0.detach().clone()

    @staticmethod
    def backward(ctx, grad_x0):
        h = ctx.handle
        out = h.gradients(grad_x0)
        gx = out["x_T"] if ctx.needs_input_grad[1] else None
        gy = out["y"] if ctx.needs_input_grad[2] else None
        return (None, gx, gy, *out["params"])
