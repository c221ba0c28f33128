"""Schedules, chains and noise that reproduce diffusers' serial samplers exactly.

``chain_from_diffusers(scheduler, num_inference_steps, eta)`` (also reached as
``dq.DDIM.from_diffusers`` and ``dq.Schedule.from_diffusers`` for the schedule alone)
turns a diffusers ``DDIMScheduler`` or ``DDPMScheduler`` (or its config, e.g. a
``scheduler_config.json`` loaded as a dict) into a chain that steps exactly as the
scheduler's ``step`` does, as of diffusers 0.42:

- timesteps: ``timestep_spacing`` "leading" (``+ steps_offset``), "trailing",
  "linspace", computed with numpy as ``set_timesteps`` does;
- DDIMScheduler steps from t to ᾱ(t - T // S), not to ᾱ of the next listed timestep
  (they differ for "trailing" and "linspace" when S does not divide T), and to
  ``final_alpha_cumprod`` (1, or ᾱ(0) with ``set_alpha_to_one=False``) below 0;
- DDPMScheduler steps to the next listed timestep (1 after the last), variance
  "fixed_small", "fixed_small_log" or "fixed_large"; it draws noise only where t > 0;
- ``prediction_type`` "sample" / "v_prediction": the chain stays the eps chain; the
  model's output is turned into eps by ``EpsModel(..., prediction_type=, schedule=)``
  (``eps_model`` below), eps = (x - sqrt(ᾱ) x0)/sqrt(1-ᾱ) or sqrt(ᾱ) v + sqrt(1-ᾱ) x;
- settings that make a step non-affine in the state (``clip_sample``, ``thresholding``,
  learned variances) raise a ValueError naming the setting and how to turn it off.

``draw_noise`` draws x_T and the per-step noise from a generator in the order the
diffusers pipelines draw them (x_T first, then one draw per noisy step), so that
``solve(model, chain, x_T, noise=noise)`` returns the serial pipeline's image.

diffusers itself is never imported here: a scheduler is read through its ``config``.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Optional, Tuple

import numpy as np
import torch

from ._checks import check_positive_int, check_unit_interval
from .chains import DDIM, Chain
from .schedules import Schedule, check_timesteps

SUPPORTED = ("DDIMScheduler", "DDPMScheduler")
SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
AFFINE_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large")

# diffusers 0.42.1 defaults (used for keys a config file leaves out).
_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
    "beta_schedule": "linear", "trained_betas": None, "clip_sample": True,
    "clip_sample_range": 1.0, "set_alpha_to_one": True, "steps_offset": 0,
    "prediction_type": "epsilon", "thresholding": False, "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False, "variance_type": "fixed_small",
}


# -- reading a scheduler or its config ------------------------------------------------
def _read(scheduler) -> Tuple[str, dict]:
    """(kind, config): kind is the supported base class name, or the class name itself."""
    if isinstance(scheduler, Mapping):
        cfg = dict(scheduler)
        kind = str(cfg.get("_class_name", ""))
    elif hasattr(scheduler, "config") and isinstance(getattr(scheduler, "config"), Mapping):
        cfg = dict(scheduler.config)
        names = [c.__name__ for c in type(scheduler).__mro__]
        kind = next((n for n in names if n in SUPPORTED), type(scheduler).__name__)
    else:
        raise TypeError(f"scheduler must be a diffusers scheduler or its config (a mapping), "
                        f"got {type(scheduler).__name__}")
    return kind, {**_DEFAULTS, **cfg}


def _betas_for_alpha_bar(n: int, kind: str, max_beta: float = 0.999) -> torch.Tensor:
    # diffusers' betas_for_alpha_bar, in the same (python float, then float32) arithmetic
    if kind == "cosine":
        def f(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    else:  # laplace
        def f(t):
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            snr = math.exp(lmb)
            return math.sqrt(snr / (1 + snr))
    return torch.tensor([min(1 - f((i + 1) / n) / f(i / n), max_beta) for i in range(n)],
                        dtype=torch.float32)


def alphas_cumprod_from_config(cfg: Mapping) -> torch.Tensor:
    """ᾱ_t (float32, as diffusers computes it) from a scheduler config."""
    cfg = {**_DEFAULTS, **dict(cfg)}
    T = cfg["num_train_timesteps"]
    check_positive_int("num_train_timesteps", T)
    bs, be, kind = cfg["beta_start"], cfg["beta_end"], cfg["beta_schedule"]
    if cfg["trained_betas"] is not None:
        betas = torch.tensor(cfg["trained_betas"], dtype=torch.float32)
    elif kind == "linear":
        betas = torch.linspace(bs, be, T, dtype=torch.float32)
    elif kind == "scaled_linear":
        betas = torch.linspace(bs ** 0.5, be ** 0.5, T, dtype=torch.float32) ** 2
    elif kind == "squaredcos_cap_v2":
        betas = _betas_for_alpha_bar(T, "cosine")
    elif kind == "laplace":
        betas = _betas_for_alpha_bar(T, "laplace")
    elif kind == "sigmoid":
        betas = torch.sigmoid(torch.linspace(-6, 6, T)) * (be - bs) + bs
    else:
        raise ValueError(f"beta_schedule {kind!r} is not supported; use one of 'linear', "
                         f"'scaled_linear', 'squaredcos_cap_v2' (or pass trained_betas)")
    _check_zero_snr(cfg)
    return torch.cumprod(1.0 - betas, dim=0)


def _check_zero_snr(cfg: Mapping) -> None:
    if cfg.get("rescale_betas_zero_snr"):
        raise ValueError("rescale_betas_zero_snr=True is not supported: it sets ᾱ = 0 at the last "
                         "training timestep, where the eps form of the step "
                         "(x0 = (x - sqrt(1-ᾱ) ε)/sqrt(ᾱ)) is undefined; build the scheduler "
                         "with rescale_betas_zero_snr=False")


def schedule_from_diffusers(scheduler) -> Schedule:
    """The ``Schedule`` (ᾱ_t, t = 0..T-1) of a diffusers scheduler or scheduler config.

    A scheduler object's own ``alphas_cumprod`` is taken (the float32 values it steps
    with, held in float64); a config (mapping) is evaluated as diffusers does."""
    kind, cfg = _read(scheduler)
    _check_zero_snr(cfg)
    if not isinstance(scheduler, Mapping) and isinstance(getattr(scheduler, "alphas_cumprod", None),
                                                        torch.Tensor):
        ac = scheduler.alphas_cumprod.detach().cpu()
    else:
        ac = alphas_cumprod_from_config(cfg)
    try:
        return Schedule(ac.to(torch.float64))
    except ValueError as exc:
        raise ValueError(f"the scheduler's alphas_cumprod cannot be used: {exc}") from None


def timesteps_from_config(cfg: Mapping, num_inference_steps: int) -> np.ndarray:
    """The descending timesteps of ``set_timesteps(num_inference_steps)`` (diffusers 0.42)."""
    cfg = {**_DEFAULTS, **dict(cfg)}
    T, S = cfg["num_train_timesteps"], num_inference_steps
    check_positive_int("num_inference_steps", S)
    if S > T:
        raise ValueError(f"num_inference_steps ({S}) cannot be larger than the scheduler's "
                         f"num_train_timesteps ({T})")
    spacing = cfg["timestep_spacing"]
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, S).round()[::-1].copy().astype(np.int64)
    elif spacing == "leading":
        ratio = T // S
        ts = (np.arange(0, S) * ratio).round()[::-1].copy().astype(np.int64)
        ts += cfg["steps_offset"]
    elif spacing == "trailing":
        ratio = T / S
        ts = np.round(np.arange(T, 0, -ratio)).astype(np.int64)
        ts -= 1
    else:
        raise ValueError(f"timestep_spacing {spacing!r} is not supported; use one of {SPACINGS}")
    if ts.min() < 0 or ts.max() >= T:
        raise ValueError(f"timestep_spacing={spacing!r} with steps_offset={cfg['steps_offset']} and "
                         f"{S} steps gives timesteps outside [0, {T - 1}] "
                         f"({int(ts.max())}..{int(ts.min())}); diffusers would fail on them too")
    return ts


def _check_affine(kind: str, cfg: Mapping, cls_name: str) -> None:
    pt = cfg["prediction_type"]
    if pt not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {pt!r} is not supported; use one of {PREDICTION_TYPES}")
    if cfg["thresholding"]:
        raise ValueError(
            f"{cls_name} has thresholding=True: dynamic thresholding of the predicted x0 makes "
            f"each step non-affine in the state, so the chain cannot be solved as one affine "
            f"system; build the scheduler with thresholding=False and clip_sample=False, e.g. "
            f"{cls_name}.from_config(scheduler.config, thresholding=False, clip_sample=False)")
    if cfg["clip_sample"]:
        raise ValueError(
            f"{cls_name} has clip_sample=True (diffusers' DDIMScheduler and DDPMScheduler clip "
            f"the predicted x0 to [-clip_sample_range, clip_sample_range] BY DEFAULT): clipping "
            f"makes each step non-affine in the state, so the chain cannot be solved as one "
            f"affine system; build the scheduler with clip_sample=False, e.g. "
            f"{cls_name}.from_config(scheduler.config, clip_sample=False) (and use the same "
            f"scheduler for the serial reference: its images change too)")
    if kind == "DDPMScheduler" and cfg["variance_type"] not in AFFINE_VARIANCES:
        vt = cfg["variance_type"]
        why = ("diffusers takes the square root of log(β), which is NaN"
               if vt == "fixed_large_log" else
               "the noise scale then depends on the model's output, which is not affine in the state")
        raise ValueError(f"DDPMScheduler variance_type={vt!r} is not supported ({why}); use one of "
                         f"{AFFINE_VARIANCES}, e.g. DDPMScheduler.from_config(scheduler.config, "
                         f"variance_type='fixed_small')")


# -- chains -----------------------------------------------------------------------------
def _as_alpha_next(schedule: Schedule, timesteps: torch.Tensor, alpha_next) -> torch.Tensor:
    an = torch.as_tensor(alpha_next, dtype=torch.float64).detach().cpu().flatten()
    if an.numel() != timesteps.numel():
        raise ValueError(f"alpha_next must hold one value per step ({timesteps.numel()}), "
                         f"got {an.numel()}")
    a = schedule.alphas_cumprod[timesteps]
    if not bool(torch.isfinite(an).all()) or bool((an <= 0).any()) or bool((an > 1).any()):
        raise ValueError("alpha_next must lie in (0, 1]")
    if bool((an < a).any()):
        raise ValueError("alpha_next must be >= ᾱ at each step's timestep (a step removes noise)")
    return an


def _as_affine(P: torch.Tensor, Q: torch.Tensor, Z: Optional[torch.Tensor], a: torch.Tensor):
    """(k0, kE, kY, kZ) for ``Chain._k`` such that the chain's P = k0/sqrt(a) and
    Q = kE - k0 sqrt(1-a)/sqrt(a) are the given per-step P and Q (float64, [S])."""
    shape = a.shape
    P = P.to(a).view(shape)
    Q = Q.to(a).view(shape)
    kZ = None if Z is None else Z.to(a).view(shape)
    return P * a.sqrt(), Q + P * (1 - a).sqrt(), None, kZ


class DiffusersDDIM(DDIM):
    """DDIM stepped as diffusers' ``DDIMScheduler.step`` steps it: the model runs at
    t_i, and the step lands on ᾱ = ``alpha_next[i]`` (ᾱ(t_i - T//S), or
    ``final_alpha_cumprod`` below 0), which need not be ᾱ of the next model timestep.
    The per-step scalars (sqrt(ᾱ), σ_t, the direction's weight) are computed in
    float32 in diffusers' order, from the scheduler's float32 ᾱ, so that the chain
    does the serial scheduler's arithmetic (in float64 they differ from it by ~1e-7
    relative per step, which a 100-step chain can grow past 1e-5).
    ``noise_draws[i]``: whether the serial pipeline draws a noise tensor at step i."""

    def __init__(self, schedule: Schedule, timesteps, alpha_next, eta: float = 0.0,
                 prediction_type: str = "epsilon"):
        super().__init__(schedule, timesteps, eta=eta, final_alpha=1.0)
        self.alpha_next = _as_alpha_next(schedule, self.timesteps, alpha_next)
        self.final_alpha = float(self.alpha_next[-1])
        self.prediction_type = prediction_type
        self.noise_draws = torch.full((self.num_steps,), self.eta > 0)
        f = torch.float32
        a, ap = self.alpha.to(f), self.alpha_next.to(f)           # exact: ᾱ came from float32
        bt = 1 - a
        variance = ((1 - ap) / bt) * (1 - a / ap)
        std = torch.tensor(self.eta, dtype=f) * variance ** 0.5
        direction = (1 - ap - std ** 2).clamp_min(0) ** 0.5
        sa, sb, sap = a ** 0.5, bt ** 0.5, ap ** 0.5
        d = torch.float64
        self._P = sap.to(d) / sa.to(d)
        self._Q = direction.to(d) - sap.to(d) * sb.to(d) / sa.to(d)
        self._Z = std.to(d) if self.eta > 0 else None

    def _k(self, a, an):
        return _as_affine(self._P, self._Q, self._Z, a)


class DDPM(Chain):
    """Ancestral DDPM sampling (Ho et al. 2020) over any descending timesteps, stepping
    to the next timestep (ᾱ = ``final_alpha`` after the last), as diffusers'
    ``DDPMScheduler.step`` does:

        x' = sqrt(a') β/(1-a) · x0 + sqrt(a/a') (1-a')/(1-a) · x + σ z,
        β = 1 - a/a',  σ² = max((1-a')/(1-a) β, 1e-20) ("fixed_small",
        "fixed_small_log") or β ("fixed_large").

    Like diffusers, no noise is drawn at a step with t = 0 (``noise_draws``).
    ``coefficient_dtype``: the precision of the per-step scalars; float32 (what
    ``from_diffusers`` uses) repeats the scheduler's float32 arithmetic, float64 (the
    default) is the exact DDPM."""

    def __init__(self, schedule: Schedule, timesteps, variance: str = "fixed_small",
                 final_alpha: float = 1.0, prediction_type: str = "epsilon",
                 coefficient_dtype: torch.dtype = torch.float64):
        super().__init__(schedule, timesteps, final_alpha)
        if variance not in AFFINE_VARIANCES:
            raise ValueError(f"variance must be one of {AFFINE_VARIANCES}, got {variance!r}")
        if coefficient_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"coefficient_dtype must be torch.float32 or torch.float64, "
                             f"got {coefficient_dtype}")
        self.variance = variance
        self.prediction_type = prediction_type
        self.noise_draws = self.timesteps > 0
        f = coefficient_dtype
        a, ap = self.alpha.to(f), self.alpha_next.to(f)
        bt, bp = 1 - a, 1 - ap
        cur_alpha = a / ap
        cur_beta = 1 - cur_alpha
        c0 = (ap ** 0.5 * cur_beta) / bt                   # on x0
        cs = cur_alpha ** 0.5 * bp / bt                     # on x
        small = torch.clamp(bp / bt * cur_beta, min=1e-20)
        if variance == "fixed_small":
            std = small ** 0.5
        elif variance == "fixed_small_log":
            std = torch.exp(0.5 * torch.log(small))
        else:
            std = cur_beta ** 0.5
        sa, sb = a ** 0.5, bt ** 0.5
        d = torch.float64
        self._P = c0.to(d) / sa.to(d) + cs.to(d)
        self._Q = -c0.to(d) * sb.to(d) / sa.to(d)
        self._Z = torch.where(self.noise_draws, std.to(d), torch.zeros((), dtype=d))

    @property
    def needs_noise(self) -> bool:
        return bool(self.noise_draws.any())

    def _k(self, a, an):
        return _as_affine(self._P, self._Q, self._Z, a)


def chain_from_diffusers(scheduler, num_inference_steps: Optional[int] = None,
                         eta: Optional[float] = None) -> Chain:
    """The chain that steps exactly as ``scheduler`` does after
    ``set_timesteps(num_inference_steps)``.

    - ``DDIMScheduler``: a ``DiffusersDDIM`` (a ``DDIM``) with ``eta`` (default 0).
    - ``DDPMScheduler``: a ``DDPM`` chain; ``eta`` must be None or 1 (DDPM is ancestral).
    ``num_inference_steps=None`` takes the scheduler's current ``set_timesteps`` setting.
    The chain's ``prediction_type`` says how to read the model's output (see
    ``eps_model``); its ``noise_draws`` which steps draw noise in the serial loop.
    """
    kind, cfg = _read(scheduler)
    if kind not in SUPPORTED:
        raise ValueError(f"unsupported scheduler {kind or 'config without _class_name'!r}: the "
                         f"parallel chain reproduces {' and '.join(SUPPORTED)}; convert with "
                         f"DDIMScheduler.from_config(scheduler.config, clip_sample=False)")
    _check_affine(kind, cfg, kind)
    if num_inference_steps is None:
        num_inference_steps = getattr(scheduler, "num_inference_steps", None)
        if num_inference_steps is None:
            raise ValueError("num_inference_steps is required (the scheduler has no "
                             "set_timesteps setting to take it from)")
        if getattr(scheduler, "custom_timesteps", False):
            raise ValueError("custom timesteps: pass num_inference_steps instead")
    if isinstance(num_inference_steps, numbers.Integral) and not isinstance(num_inference_steps, bool):
        num_inference_steps = int(num_inference_steps)          # numpy / torch integers too
    check_positive_int("num_inference_steps", num_inference_steps)
    schedule = schedule_from_diffusers(scheduler)
    if schedule.num_train_timesteps != cfg["num_train_timesteps"]:
        raise ValueError(f"the scheduler has {schedule.num_train_timesteps} alphas_cumprod values "
                         f"but num_train_timesteps={cfg['num_train_timesteps']}")
    ts = torch.from_numpy(timesteps_from_config(cfg, num_inference_steps))
    ts = check_timesteps(schedule, ts)
    ac = schedule.alphas_cumprod
    pt = cfg["prediction_type"]
    if kind == "DDIMScheduler":
        eta = 0.0 if eta is None else check_unit_interval("eta", eta)
        final = 1.0 if cfg["set_alpha_to_one"] else float(ac[0])
        prev = ts - cfg["num_train_timesteps"] // num_inference_steps
        an = torch.where(prev >= 0, ac[prev.clamp_min(0)], torch.tensor(final, dtype=torch.float64))
        return DiffusersDDIM(schedule, ts, an, eta=eta, prediction_type=pt)
    if eta is not None and check_unit_interval("eta", eta) != 1.0:
        raise ValueError(f"DDPMScheduler has no eta (it is ancestral sampling, eta=1); got "
                         f"eta={eta}. For DDIM with eta, use "
                         f"DDIMScheduler.from_config(scheduler.config)")
    return DDPM(schedule, ts, variance=cfg["variance_type"], final_alpha=1.0, prediction_type=pt,
                coefficient_dtype=torch.float32)


# -- models and noise ---------------------------------------------------------------------
def to_eps(out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, schedule: Schedule,
           prediction_type: str) -> torch.Tensor:
    """The eps a network's output stands for at (x, t): affine in (out, x) with
    coefficients from ᾱ(t) (as diffusers' steps derive ``pred_epsilon``)."""
    if prediction_type == "epsilon":
        return out
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if schedule is None:
        raise ValueError(f"prediction_type={prediction_type!r} needs the schedule (ᾱ_t)")
    t = torch.as_tensor(t, device=x.device).long().reshape(-1)
    # in x's dtype, as diffusers derives pred_epsilon (alpha_prod_t ** 0.5 etc.)
    a = schedule.alphas_cumprod.to(x.device)[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    sa, s1 = a ** 0.5, (1 - a) ** 0.5
    if prediction_type == "sample":
        return (x - sa * out) / s1
    return sa * out + s1 * x                                     # v_prediction


def eps_model(network, scheduler, max_batch: Optional[int] = None):
    """``EpsModel(network)`` reading the scheduler's ``prediction_type`` (eps from
    "sample" or "v_prediction" outputs) and schedule."""
    from .models import EpsModel
    _, cfg = _read(scheduler)
    return EpsModel(network, max_batch=max_batch, prediction_type=cfg["prediction_type"],
                    schedule=schedule_from_diffusers(scheduler))


def _randn(shape, generator, device, dtype):
    """diffusers' ``randn_tensor`` for CPU/same-device generators (a list of generators:
    one draw per batch element)."""
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        gdev = generator[0].device
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=gdev, dtype=dtype)
                          for g in generator]).to(device)
    gdev = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gdev, dtype=dtype).to(device)


def draw_noise(chain: Chain, shape, generator=None, device=None, dtype=torch.float32,
               randn=None):
    """(x_T, noise): x_T of ``shape`` and noise [S, *shape] drawn from ``generator`` in
    the order diffusers' DDIMPipeline / DDPMPipeline draw them: x_T first, then one draw
    per step in ``chain.noise_draws`` (zeros where a step draws none). ``randn``:
    ``randn(shape, generator, device, dtype)``, default a copy of diffusers'
    ``randn_tensor``."""
    randn = _randn if randn is None else randn
    shape = tuple(shape)
    device = torch.device("cpu") if device is None else torch.device(device)
    draws = getattr(chain, "noise_draws", None)
    if draws is None:
        draws = torch.full((chain.num_steps,), chain.needs_noise)
    x_T = randn(shape, generator, device, dtype)
    noise = torch.zeros((chain.num_steps, *shape), dtype=dtype, device=device)
    for i in range(chain.num_steps):
        if bool(draws[i]):
            noise[i] = randn(shape, generator, device, dtype)
    return x_T, noise
