"""Gradients through the solved chain (DESIGN.md §4).

At the fixed point the states are the serial sampler's, u_{k+1} = P_k u_k + Q_k ē_k(u_k)
+ R_k, so the adjoint λ_k = dL/du_k obeys the backward recurrence

    λ_S = Vᵀ dL/dx0,    λ_k = P_k λ_{k+1} + J_kᵀ (Q_k λ_{k+1}),    J_k = ∂ē_k/∂u_k,

an upper-triangular system. ``AdjointSystem`` writes it in the forward system's form
(reversed step order, the carry is λ_S, the "model call" is ONE batched vector–Jacobian
product over all steps through a graph built once), so the same solvers, windows and
stopping rules solve it in parallel rounds; Picard is exact after S rounds. Then

    dL/dR_k = λ_{k+1},  dL/du_0 = λ_0,  dL/dθ = Σ_k (∂ē_k/∂θ)ᵀ (Q_k λ_{k+1}),

and autograd through the (cheap, elementwise) construction of u_0 and R gives the
gradients with respect to x_T and y.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from .solvers import fixed_point_solve
from .system import ChainSystem


class AdjointSystem:
    """λ as the states of an affine chain run backwards over the forward solution X."""

    def __init__(self, forward: ChainSystem, X: torch.Tensor, grad_uS: torch.Tensor,
                 params: Sequence[torch.Tensor] = ()):
        self.forward = forward
        c = forward.coeffs
        S = forward.num_steps
        self.S = S
        # Reverse the step axis: adjoint step r is forward step S-1-r.
        self.P = c.P.flip(0)
        self.Q = c.Q.flip(0)
        self.carry0 = grad_uS
        self.params = list(params)
        inputs = torch.cat([c.u0.unsqueeze(0), X[:-1]]).detach().requires_grad_(True)
        with torch.enable_grad():
            self.E = forward.eps_bar(inputs, 0)          # [S, B, ...], one graph kept
        self.inputs = inputs
        self.scale_value = float(grad_uS.abs().max().clamp_min(torch.finfo(grad_uS.dtype).tiny))

    @property
    def num_steps(self) -> int:
        return self.S

    def residual_scale(self, floor: float) -> torch.Tensor:
        return torch.full((self.S,), 1.0 / self.scale_value, dtype=torch.float64)

    def _vjp(self, cot: torch.Tensor, want_params: bool = False):
        """J_kᵀ(cot_k) for every forward step k at once (cot in forward order)."""
        targets = [self.inputs] + (self.params if want_params else [])
        grads = torch.autograd.grad(self.E, targets, grad_outputs=cot, retain_graph=True,
                                    allow_unused=True)
        first = torch.zeros_like(self.inputs) if grads[0] is None else grads[0]
        return first, grads[1:]

    def evaluate(self, A: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Adjoint states lo..hi-1 rebuilt from A's inputs (the adjoint of the state after
        each adjoint step): A_r = P'_r A_{r-1} + J'_rᵀ(Q'_r A_{r-1}), A_{-1} = λ_S."""
        carry = self.carry0 if lo == 0 else A[lo - 1]
        inp = torch.cat([carry.unsqueeze(0), A[lo:hi - 1]]) if hi - lo > 1 else carry.unsqueeze(0)
        cot = torch.zeros_like(self.E)
        # adjoint step r <-> forward step S-1-r: place the cotangents in forward order
        cot[self.S - hi:self.S - lo] = (self.Q[lo:hi] * inp).flip(0)
        vjp, _ = self._vjp(cot)
        V = vjp[self.S - hi:self.S - lo].flip(0)
        out = torch.empty_like(inp)
        u = carry
        for r in range(hi - lo):
            u = self.P[lo + r] * u + V[r]
            out[r] = u
        return out

    def lambdas(self, A: torch.Tensor) -> torch.Tensor:
        """[S+1, B, ...]: λ_0 .. λ_S in forward order from the solved adjoint states."""
        return torch.cat([A.flip(0), self.carry0.unsqueeze(0)])

    def param_grads(self, lam: torch.Tensor) -> List[Optional[torch.Tensor]]:
        if not self.params:
            return []
        cot = self.forward.coeffs.Q * lam[1:]
        return list(self._vjp(cot, want_params=True)[1])


def adjoint_gradients(system: ChainSystem, X: torch.Tensor, grad_x0: torch.Tensor, *,
                      x_T: torch.Tensor, noise: Optional[torch.Tensor], params=(),
                      y: Optional[torch.Tensor] = None,
                      solver: str = "triangular_anderson", tol: float = 1e-6,
                      max_iter: Optional[int] = None, **solver_kw) -> Dict[str, object]:
    """dL/dx_T, dL/dy and dL/dθ for dL/dx0 = ``grad_x0`` at the solution X (basis)."""
    chain = system.chain
    grad_uS = chain.to_basis(grad_x0.to(X.dtype))
    adj = AdjointSystem(system, X, grad_uS, params)
    A0 = grad_uS.unsqueeze(0).repeat(system.num_steps, *([1] * grad_uS.dim()))
    A, stats = fixed_point_solve(adj, A0, solver=solver, tol=tol, floor=1.0, max_iter=max_iter,
                                 **solver_kw)
    lam = adj.lambdas(A)
    out: Dict[str, object] = {"stats": stats, "lambda": lam}
    out["params"] = adj.param_grads(lam)
    # x_T and y enter through u_0 and R only: autograd through their construction.
    y = chain_y(chain) if y is None else y
    leaves = [t for t in (x_T, y) if t is not None and t.requires_grad]
    grads = {}
    if leaves:
        with torch.enable_grad():
            coeffs = chain.coefficients(x_T.to(X.dtype), noise, y)
            outs, cots = [coeffs.u0], [lam[0]]
            if coeffs.R is not None and coeffs.R.requires_grad:
                outs.append(coeffs.R)
                cots.append(_reduce_like(lam[1:], coeffs.R))
            g = torch.autograd.grad(outs, leaves, grad_outputs=cots, allow_unused=True)
        grads = dict(zip([id(t) for t in leaves], g))
    out["x_T"] = _or_zeros(grads.get(id(x_T)), x_T) if x_T.requires_grad else None
    out["y"] = (_or_zeros(grads.get(id(y)), y) if y is not None and y.requires_grad else None)
    return out


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
