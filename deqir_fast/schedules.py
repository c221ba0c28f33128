"""Noise schedules (ᾱ_t, the cumulative product of 1 - β_t) and timestep selection."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ._checks import check_positive_int


class Schedule:
    """A discrete variance-preserving schedule given by ᾱ_t for t = 0 .. T-1.

    ``Schedule(alphas_cumprod)`` takes any strictly decreasing sequence in (0, 1]; the
    last value may also be 0 (zero terminal SNR, diffusers' ``rescale_betas_zero_snr``):
    no chain may run the model at that timestep (``check_timesteps`` refuses it), since
    every step's eps form divides by sqrt(ᾱ) there.
    ``Schedule.linear`` and ``Schedule.cosine`` build the usual ones exactly as
    diffusers' ``DDPMScheduler`` does (``beta_schedule="linear"`` and
    ``"squaredcos_cap_v2"``), but in float64.
    """

    def __init__(self, alphas_cumprod):
        a = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu().flatten()
        if a.numel() < 1:
            raise ValueError("alphas_cumprod must hold at least one value")
        if (not bool(torch.isfinite(a).all()) or bool((a[:-1] <= 0).any()) or float(a[-1]) < 0
                or bool((a > 1).any())):
            raise ValueError("alphas_cumprod must lie in (0, 1] and be finite (the last value "
                             "may be 0: zero terminal SNR)")
        if a.numel() > 1 and not bool((a[1:] < a[:-1]).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing in t")
        self.alphas_cumprod = a

    @classmethod
    def linear(cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4,
               beta_end: float = 0.02) -> "Schedule":
        check_positive_int("num_train_timesteps", num_train_timesteps)
        if not 0.0 < beta_start <= beta_end < 1.0:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        return cls(torch.cumprod(1.0 - betas, 0))

    @classmethod
    def cosine(cls, num_train_timesteps: int = 1000, max_beta: float = 0.999) -> "Schedule":
        """Nichol & Dhariwal (2021) cosine schedule, betas capped at ``max_beta``."""
        check_positive_int("num_train_timesteps", num_train_timesteps)

        def f(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        n = num_train_timesteps
        betas = torch.tensor([min(1 - f((i + 1) / n) / f(i / n), max_beta) for i in range(n)],
                             dtype=torch.float64)
        return cls(torch.cumprod(1.0 - betas, 0))

    @classmethod
    def from_diffusers(cls, *args, **kwargs):
        """Moved to ``dq.schedule_from_diffusers(scheduler)`` (``deqir_fast.diffusers_compat``):
        the maths does not import the adapters (issue #23). Raises AttributeError."""
        raise AttributeError("Schedule.from_diffusers moved: use dq.schedule_from_diffusers("
                             "scheduler) (deqir_fast.diffusers_compat.schedule_from_diffusers)")

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    def __len__(self) -> int:
        return self.num_train_timesteps

    def __repr__(self) -> str:
        return f"Schedule(T={self.num_train_timesteps})"


def timesteps(schedule: Schedule, steps) -> torch.Tensor:
    """Descending training timesteps for a sampler of ``steps`` steps.

    An int S gives the uniform "leading" spacing of DDIM/DDRM/diffusers:
    ``t_i = (S - 1 - i) * (T // S)``, e.g. T=1000, S=20 -> [950, 900, ..., 0].
    An explicit sequence is validated (strictly descending, within [0, T-1]) and
    returned as a LongTensor.
    """
    T = schedule.num_train_timesteps
    if isinstance(steps, int) and not isinstance(steps, bool):
        check_positive_int("steps", steps)
        if steps > T:
            raise ValueError(f"steps must be <= the schedule's {T} timesteps, got {steps}")
        return torch.arange(steps - 1, -1, -1, dtype=torch.long) * (T // steps)
    return check_timesteps(schedule, steps)


def check_timesteps(schedule: Schedule, ts: Sequence[int] | torch.Tensor) -> torch.Tensor:
    if isinstance(ts, torch.Tensor):
        if ts.is_floating_point() or ts.is_complex() or ts.dtype == torch.bool:
            raise TypeError(f"timesteps must be integers, got dtype {ts.dtype}")
        ts = ts.detach().cpu().long().flatten()
    else:
        try:
            values = list(ts)
        except TypeError:
            raise TypeError(f"timesteps must be an int or a sequence of ints, "
                            f"got {type(ts).__name__}") from None
        if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
            raise TypeError("timesteps must be integers")
        ts = torch.tensor(values, dtype=torch.long)
    if ts.numel() < 1:
        raise ValueError("timesteps must not be empty")
    T = schedule.num_train_timesteps
    if bool((ts < 0).any()) or bool((ts >= T).any()):
        raise ValueError(f"timesteps must lie in [0, {T - 1}], got min {int(ts.min())}, "
                         f"max {int(ts.max())}")
    if ts.numel() > 1 and not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError("timesteps must be strictly descending")
    zero = schedule.alphas_cumprod[ts] == 0
    if bool(zero.any()):
        raise ValueError(f"timesteps must not include t = {int(ts[zero][0])}, where the schedule "
                         f"has ᾱ = 0 (zero terminal SNR): a step there divides by sqrt(ᾱ) "
                         f"(x0 = (x - sqrt(1-ᾱ) ε)/sqrt(ᾱ)); start below it")
    return ts


def schedule_from_sigmas(sigmas) -> tuple:
    """(Schedule, timesteps, final_alpha) of a chain over variance-exploding noise levels
    ``sigmas`` (descending; the last may be 0), k-diffusion's and diffusers' σ-space
    samplers: step i runs the model at ``sigmas[i]`` and lands on ``sigmas[i + 1]``. The
    schedule holds ᾱ = 1/(1 + σ²) of ``sigmas[:-1]`` by index (ᾱ decreasing in the index,
    so step i is timestep index ``len(sigmas) - 2 - i``); final_alpha is ᾱ of the last σ."""
    if not isinstance(sigmas, torch.Tensor):
        try:
            sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"sigmas must be a 1-D tensor of noise levels, got "
                            f"{type(sigmas).__name__}") from None
    if not (sigmas.is_floating_point() or sigmas.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"sigmas must be real numbers, got dtype {sigmas.dtype}")
    if sigmas.dim() != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D tensor of at least 2 noise levels, got shape "
                         f"{tuple(sigmas.shape)}")
    s = sigmas.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(s).all()):
        raise ValueError("sigmas contains NaN or Inf")
    if bool((s[:-1] <= 0).any()) or float(s[-1]) < 0:
        raise ValueError("sigmas must be > 0, except the last, which may be 0")
    if not bool((s[1:] < s[:-1]).all()):
        raise ValueError("sigmas must be strictly descending")
    n = s.numel() - 1
    schedule = Schedule(1.0 / (1.0 + s[:-1].flip(0) ** 2))   # index k <-> sigmas[n-1-k]
    timesteps = torch.arange(n - 1, -1, -1, dtype=torch.long)
    return schedule, timesteps, float(1.0 / (1.0 + s[-1] ** 2))
