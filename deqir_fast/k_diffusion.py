"""k-diffusion's samplers, solved as one parallel fixed-point system: ``sample_euler``
(also ``sample_deq``), ``sample_euler_ancestral`` and ``sample_dpmpp_2m`` have the call
signatures of k-diffusion's functions of the same names and return their results.

k-diffusion's conventions: ``model(x, sigma, **extra_args)`` is a wrapped denoiser
returning D(x, σ) ≈ x0 for the variance-exploding state x = x0 + σ n (``sigma`` a
tensor [batch]); ``sigmas`` is descending and usually ends in 0; ``x`` enters already
scaled to ``sigmas[0]`` (``x = noise * sigmas[0]``).

Euler (Karras et al. 2022, Alg. 2 with s_churn = 0) is exactly DDIM with eta = 0 in
variance-preserving form: with ᾱ = 1/(1+σ²) and u = x/sqrt(1+σ²),
x0 = D(x, σ) and eps = (x - D)/σ, the DDIM step u' = sqrt(ᾱ') x0 + sqrt(1-ᾱ') eps is
x' = D + σ' eps = x + (σ' - σ)(x - D)/σ, Euler's step. So the sigmas become a
``Schedule`` of ᾱ values (``schedules.schedule_from_sigmas``), the denoiser an eps
model, and ``solve`` does the rest; Euler-ancestral and DPM-Solver++(2M) are the chains
``EulerAncestral`` and ``DPMSolverPP`` on the same state (docs/design.md §2.8).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ._checks import check_nonnegative, check_tensor, state_dtype
from .api import DEFAULT_SOLVER, DEFAULT_TOL, sample_serial, solve
from .chains import DPMSolverPP, Euler, EulerAncestral
from .schedules import schedule_from_sigmas


def chain_from_sigmas(sigmas: torch.Tensor) -> Euler:
    """The Euler chain (DDIM, eta = 0) over k-diffusion ``sigmas`` (descending, ending in 0 or
    in the noise level to stop at): step i runs the model at ``sigmas[i]`` (its
    timestep index is ``len(sigmas) - 2 - i``) and lands on ``sigmas[i + 1]``."""
    schedule, ts, final_alpha = schedule_from_sigmas(sigmas)
    return Euler(schedule, ts, final_alpha=final_alpha)


def _repeat_batch(obj, times: int, batch: int):
    """extra_args for a call on ``times`` stacked copies of the batch (step-major)."""
    if times == 1:
        return obj
    if isinstance(obj, torch.Tensor):
        if obj.dim() >= 1 and obj.shape[0] == batch:
            return obj.repeat(times, *([1] * (obj.dim() - 1)))
        return obj
    if isinstance(obj, dict):
        return {k: _repeat_batch(v, times, batch) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_repeat_batch(v, times, batch) for v in obj)
    return obj


class DenoiserAsEps:
    """eps = model(x_vp, t) for a k-diffusion denoiser D(x, σ): x = x_vp sqrt(1+σ²),
    eps = (x - D(x, σ))/σ, σ = ``sigmas[n-1-t]``. ``shape``: the per-image shape of
    the caller's x (the chain works on [B, numel, 1, 1] when x is not 4-D)."""

    def __init__(self, model: Callable, sigmas: torch.Tensor, shape, batch: int,
                 extra_args: Optional[dict] = None):
        self.model = model
        n = sigmas.numel() - 1
        self.sigma_t = sigmas[:-1].flip(0)                       # by timestep index, caller's dtype
        self.scale_t = (1.0 + sigmas[:-1].detach().to(torch.float64).flip(0) ** 2).sqrt()
        self.shape = tuple(shape)
        self.batch = batch
        self.extra_args = {} if extra_args is None else extra_args
        self.num_steps = n

    def denoise(self, x_vp: torch.Tensor, t: torch.Tensor):
        """(x, σ, D): the VE input, its σ per image, and the denoiser's output."""
        t = t.to(self.sigma_t.device).long()
        sigma = self.sigma_t[t].to(device=x_vp.device, dtype=x_vp.dtype)
        scale = self.scale_t.to(x_vp.device)[t.to(x_vp.device)].to(x_vp.dtype)
        x = (x_vp.reshape(x_vp.shape[0], -1) * scale[:, None]).reshape(x_vp.shape[0], *self.shape)
        times = x.shape[0] // self.batch
        denoised = self.model(x, sigma, **_repeat_batch(self.extra_args, times, self.batch))
        if not isinstance(denoised, torch.Tensor) or denoised.shape != x.shape:
            raise ValueError(f"the denoiser must return a tensor shaped like its input "
                             f"{tuple(x.shape)}, got "
                             f"{getattr(denoised, 'shape', type(denoised).__name__)}")
        return x, sigma, denoised.to(x.dtype)

    def __call__(self, x_vp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x, sigma, denoised = self.denoise(x_vp, t)
        eps = (x - denoised) / sigma.view(-1, *([1] * (x.dim() - 1)))
        return eps.reshape(x_vp.shape)


_SOLVER_SETTINGS = """Solver settings are keyword-only: ``solver``, ``tol`` (default the package's; ``tol=0``
    reproduces the serial loop to float rounding after at most len(sigmas) - 1 rounds),
    ``max_iter``, ``window``, ``init`` and the rest of ``deqir_fast.solve``'s.
    ``return_result=True`` returns ``(x, SolveResult)`` (rounds, nfe, residuals);
    ``serial=True`` runs the serial sampler instead (one model call a step; the
    SolveResult is then None)."""


def sample_euler(model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Optional[dict] = None,
                 callback: Optional[Callable[[dict], None]] = None, disable=None,
                 s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"),
                 s_noise: float = 1.0, *, solver: str = DEFAULT_SOLVER,
                 tol: float = DEFAULT_TOL, max_iter: Optional[int] = None,
                 window=None, init="jump", return_result: bool = False, serial: bool = False,
                 **solve_kwargs):
    """k-diffusion's ``sample_euler`` (s_churn = 0), solved in parallel.

    Same arguments and result as ``k_diffusion.sampling.sample_euler``: ``model`` a
    wrapped denoiser ``model(x, sigma, **extra_args)``, ``x`` the initial state at
    ``sigmas[0]`` (``noise * sigmas[0]``), ``sigmas`` descending (usually ending in 0).
    Tensors in ``extra_args`` whose first dimension is the batch size are repeated for
    the batched call over many steps (so conditioning works as in k-diffusion); other
    values are passed as they are. ``callback`` is called after the solve for every
    step i, in order, with k-diffusion's dict ``{x, i, sigma, sigma_hat, denoised}``
    (one extra batched model call over all steps computes ``denoised``). ``disable``
    (the progress bar) is accepted and ignored: there is no per-step loop to show.

    SOLVER_SETTINGS

    Only the deterministic sampler: ``s_churn > 0`` raises (its noise makes a
    different chain); ``s_tmin``, ``s_tmax`` and ``s_noise`` only matter with churn.
    """
    if not (isinstance(s_churn, (int, float)) and s_churn == 0):
        raise ValueError(f"sample_euler supports only s_churn=0 (Euler without churn, "
                         f"deterministic); got s_churn={s_churn!r}")
    return _sample(Euler, model, x,
                   sigmas, extra_args, callback, None, dict(
                       solver=solver, tol=tol, max_iter=max_iter, window=window, init=init,
                       **solve_kwargs), return_result, serial)


sample_deq = sample_euler          # the name of issue #9's drop-in


def sample_euler_ancestral(model, x: torch.Tensor, sigmas: torch.Tensor,
                           extra_args: Optional[dict] = None,
                           callback: Optional[Callable[[dict], None]] = None, disable=None,
                           eta: float = 1.0, s_noise: float = 1.0, noise_sampler=None, *,
                           solver: str = DEFAULT_SOLVER, tol: float = DEFAULT_TOL,
                           max_iter: Optional[int] = None, window=None, init="jump",
                           return_result: bool = False, serial: bool = False, **solve_kwargs):
    """k-diffusion's ``sample_euler_ancestral``, solved in parallel (``dq.EulerAncestral``).

    Arguments as ``sample_euler`` plus k-diffusion's ``eta`` (the ancestral noise share,
    ``get_ancestral_step``), ``s_noise`` and ``noise_sampler``: ``noise_sampler(sigma,
    sigma_next)`` is called once per step with ``sigma_next > 0``, in step order, before
    the solve (k-diffusion calls it between model calls; the draws are the same when the
    model itself draws no random numbers). Default: ``torch.randn_like(x)``, as
    k-diffusion's ``default_noise_sampler``.

    SOLVER_SETTINGS
    """
    eta = check_nonnegative("eta", eta)
    s_noise = check_nonnegative("s_noise", s_noise)
    if noise_sampler is not None and not callable(noise_sampler):
        raise TypeError(f"noise_sampler must be callable as noise_sampler(sigma, sigma_next), "
                        f"got {type(noise_sampler).__name__}")
    sampler = noise_sampler if noise_sampler is not None else (lambda s, sn: torch.randn_like(x))

    def draws(s):
        # called as k-diffusion calls it, also where σ_up is 0 (eta or s_noise 0): the
        # default sampler then advances torch's generator as the serial loop does
        return [None if not float(s[i + 1]) > 0 else sampler(s[i], s[i + 1])
                for i in range(s.numel() - 1)]
    return _sample(lambda sched, ts, fa: EulerAncestral(sched, ts, eta=eta, s_noise=s_noise,
                                                        final_alpha=fa),
                   model, x, sigmas, extra_args, callback, draws,
                   dict(solver=solver, tol=tol, max_iter=max_iter, window=window, init=init,
                        **solve_kwargs), return_result, serial)


def sample_dpmpp_2m(model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Optional[dict] = None,
                    callback: Optional[Callable[[dict], None]] = None, disable=None, *,
                    solver: str = DEFAULT_SOLVER, tol: float = DEFAULT_TOL,
                    max_iter: Optional[int] = None, window=None, init="jump",
                    return_result: bool = False, serial: bool = False, **solve_kwargs):
    """k-diffusion's ``sample_dpmpp_2m`` (DPM-Solver++(2M)), solved in parallel
    (``dq.DPMSolverPP``, an order-2 chain: first order at the first step and at a step to
    σ = 0, as k-diffusion steps). Arguments as ``sample_euler`` without churn.

    SOLVER_SETTINGS
    """
    return _sample(lambda sched, ts, fa: DPMSolverPP(sched, ts, final_alpha=fa), model, x,
                   sigmas, extra_args, callback, None,
                   dict(solver=solver, tol=tol, max_iter=max_iter, window=window, init=init,
                        **solve_kwargs), return_result, serial)


for _f in (sample_euler, sample_euler_ancestral, sample_dpmpp_2m):
    _f.__doc__ = _f.__doc__.replace("SOLVER_SETTINGS", _SOLVER_SETTINGS)


def _sample(make_chain, model, x, sigmas, extra_args, callback, draws, solve_kwargs,
            return_result, serial):
    """The k-diffusion samplers' shared part: the chain over ``sigmas`` (``make_chain(
    schedule, timesteps, final_alpha)``), the denoiser as an eps model on the variance-
    preserving state, the per-step noise (``draws(sigmas)``: a draw or None per step),
    the solve, the result back at ``sigmas[-1]`` and the callbacks."""
    check_tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must have a batch dimension, got shape {tuple(x.shape)}")
    if not isinstance(sigmas, torch.Tensor):
        sigmas = torch.as_tensor(sigmas, dtype=x.dtype, device=x.device)
    if sigmas.dim() == 1 and sigmas.numel() == 1:
        return (x, None) if return_result else x
    chain = make_chain(*schedule_from_sigmas(sigmas))
    B, shape = x.shape[0], tuple(x.shape[1:])
    eps_model = DenoiserAsEps(model, sigmas, shape, B, extra_args)
    dtype = state_dtype(x.dtype)
    scale0 = float((1.0 + sigmas[0].detach().double() ** 2).sqrt())
    flat = x.reshape(B, -1, 1, 1) if x.dim() != 4 else x
    x_T = flat.to(dtype) / scale0
    noise = None
    if draws is not None:
        noise = torch.zeros((chain.num_steps, *flat.shape), dtype=dtype, device=x.device)
        for i, z in enumerate(draws(sigmas)):
            if z is not None:
                check_tensor("noise_sampler's draw", z, shape=tuple(x.shape))
                noise[i] = z.reshape(flat.shape).to(dtype)
        if not chain.needs_noise:
            noise = None          # drawn for the generator's sake only (σ_up = 0)
    if serial:
        res = None
        states = sample_serial(eps_model, chain, x_T, noise=noise, return_states=True)
        final = states[-1]
    else:
        res = solve(eps_model, chain, x_T, noise=noise, **solve_kwargs)
        states, final = res.states, res.x0            # x0 carries the gradient (grad mode)
    last = float(sigmas[-1])
    out = final if last == 0 else final * (1.0 + last ** 2) ** 0.5     # back to x at sigmas[-1]
    out = out.reshape(x.shape).to(x.dtype)
    if callback is not None:
        _replay(eps_model, chain, states, x_T, sigmas, callback, solve_kwargs.get("window"))
    return (out, res) if return_result else out


@torch.no_grad()
def _replay(eps_model: DenoiserAsEps, chain, states, x_T, sigmas, callback, window):
    """k-diffusion's per-step callbacks from the solved states (one batched model
    call per ``window`` steps, all at once by default)."""
    S = chain.num_steps
    inputs = torch.cat([x_T.unsqueeze(0), states[:-1]])                # [S, B, ...]
    B = x_T.shape[0]
    chunk = window if isinstance(window, int) and not isinstance(window, bool) else S
    for lo in range(0, S, chunk):
        hi = min(S, lo + chunk)
        u = inputs[lo:hi].reshape((hi - lo) * B, *x_T.shape[1:])
        t = chain.timesteps[lo:hi].repeat_interleave(B)
        x, _, denoised = eps_model.denoise(u, t)
        x = x.view(hi - lo, B, *x.shape[1:])
        denoised = denoised.view(hi - lo, B, *denoised.shape[1:])
        for i in range(lo, hi):
            callback({"x": x[i - lo], "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                      "denoised": denoised[i - lo]})
