"""Initialization optimization: choose x_T so that the restored x0 minimises a loss,
with implicit gradients and warm-started solves (docs/design.md §4)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Union

import torch

from .api import solve
from .chains import Chain


@dataclass
class InitOptimization:
    x_T: torch.Tensor                 # the optimized initial noise
    x0: torch.Tensor                  # the restoration it gives (solved to ``tol``)
    losses: List[float] = field(default_factory=list)   # loss before each Adam step
    rounds: List[int] = field(default_factory=list)     # solver rounds of each solve
    result: Optional[object] = None   # the last SolveResult


def measurement_loss(chain: Chain) -> Callable[[torch.Tensor], torch.Tensor]:
    """||A x0 - y||² summed over the batch (measurement consistency)."""
    op, y = chain.operator, chain.y
    if op is None:
        raise ValueError("the measurement loss needs a chain with an operator and y (DDRM, DDNM)")
    return lambda x0: (op.A(x0) - y.to(x0)).pow(2).sum()


def reference_loss(reference: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """||x0 - reference||² summed over the batch."""
    return lambda x0: (x0 - reference.to(x0)).pow(2).sum()


def optimize_init(model, chain: Chain, x_T: torch.Tensor,
                  loss: Union[str, Callable[[torch.Tensor], torch.Tensor]] = "measurement",
                  steps: int = 10, lr: float = 0.05, reference: Optional[torch.Tensor] = None,
                  noise: Optional[torch.Tensor] = None,
                  generator: Optional[torch.Generator] = None, warm_start: bool = True,
                  callback: Optional[Callable[[dict], None]] = None, **solve_kw) -> InitOptimization:
    """Adam over x_T for ``steps`` steps; each step solves the chain (warm-started from
    the previous solution with ``warm_start``) and backpropagates the loss implicitly.

    ``loss``: ``"measurement"`` (||A x0 - y||²), ``"reference"`` (||x0 - reference||²,
    pass ``reference``) or any callable x0 -> scalar tensor. The noise is drawn once
    (from ``generator``) and kept, so only x_T changes between solves.
    """
    if isinstance(loss, str):
        if loss == "measurement":
            loss_fn = measurement_loss(chain)
        elif loss == "reference":
            if reference is None:
                raise ValueError("loss='reference' needs reference=<image tensor>")
            loss_fn = reference_loss(reference)
        else:
            raise ValueError(f"loss must be 'measurement', 'reference' or a callable, got {loss!r}")
    elif callable(loss):
        loss_fn = loss
    else:
        raise TypeError(f"loss must be a string or a callable, got {type(loss).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    from .api import _draw_noise
    from ._checks import check_tensor, state_dtype
    check_tensor("x_T", x_T)
    noise = _draw_noise(chain, x_T, noise, generator, state_dtype(x_T.dtype))
    z = x_T.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    out = InitOptimization(x_T=z, x0=None)
    from .api import DEFAULT_INIT
    init = solve_kw.pop("init", DEFAULT_INIT)
    for step in range(steps + 1):
        res = solve(model, chain, z, noise=noise, init=init, **solve_kw)
        out.rounds.append(res.iterations)
        out.result = res
        if step == steps:
            break
        value = loss_fn(res.x0)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ValueError(f"loss must return a scalar tensor, got "
                             f"{type(value).__name__}{tuple(getattr(value, 'shape', ()))}")
        out.losses.append(float(value.detach()))
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        if warm_start:
            init = res.states
        if callback is not None:
            callback({"step": step, "loss": out.losses[-1], "rounds": res.iterations})
    out.x_T = z.detach()
    out.x0 = out.result.x0.detach()
    return out
