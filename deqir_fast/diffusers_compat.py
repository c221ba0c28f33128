"""Schedules, chains and noise that reproduce diffusers' serial samplers exactly.

``chain_from_diffusers(scheduler, num_inference_steps, eta)`` (``dq.chain_from_diffusers``;
``schedule_from_diffusers``, ``dq.schedule_from_diffusers``, for the schedule alone)
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
  (``deqir_fast.models.eps_model``), eps = (x - sqrt(ᾱ) x0)/sqrt(1-ᾱ) or
  sqrt(ᾱ) v + sqrt(1-ᾱ) x,
  and the chain's coefficients are those of diffusers' own step on (x, model output)
  (x0 and eps each taken from the output as diffusers takes them) composed with that
  conversion, so that the two together do diffusers' arithmetic (``_eps_form``);
- ``rescale_betas_zero_snr=True`` (ᾱ = 0 at the last training timestep): supported
  wherever no step runs the model at that timestep ("leading" spacing, unless
  ``steps_offset`` puts a step there); refused where one does ("trailing",
  "linspace"), because at ᾱ = 0 the eps form of the step cannot carry the model's
  prediction;
- settings that make a step non-affine in the state (``clip_sample``, ``thresholding``,
  learned variances) raise a ValueError naming the setting and how to turn it off;
- a subclass of ``DDIMScheduler`` / ``DDPMScheduler`` that overrides a method the
  serial loop runs (``step``, ``set_timesteps``, ...) raises a TypeError: the chain
  reproduces diffusers' own step, not the override.

``draw_noise`` draws x_T and the per-step noise from a generator in the order the
diffusers pipelines draw them (x_T first, then one draw per noisy step), so that
``solve(model, chain, x_T, noise=noise)`` returns the serial pipeline's image.

diffusers itself is never imported here: a scheduler is read through its ``config``.
This module sits above the chains (docs/design.md §7): the chains and schedules do not
import it, and the model adapters (``models``) import it, not the other way round.
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
# The σ-space schedulers (issue #25): their chains come from the scheduler's own
# set_timesteps (sigmas and model timesteps), so every spacing, interpolation and sigma
# option diffusers has is the scheduler's own arithmetic.
SIGMA_SCHEDULERS = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                    "DPMSolverMultistepScheduler")
# What the serial loop runs of each σ-space scheduler (a subclass overriding one steps
# differently from the chain).
SIGMA_STEPPING_METHODS = ("set_timesteps", "scale_model_input", "step", "_sigma_to_t",
                          "_convert_to_karras", "_convert_to_exponential", "_convert_to_beta",
                          "_convert_to_lu", "convert_model_output", "_sigma_to_alpha_sigma_t",
                          "dpm_solver_first_order_update",
                          "multistep_dpm_solver_second_order_update", "_threshold_sample")
SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
AFFINE_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large")
# The beta_schedule values each class's __init__ accepts (diffusers 0.42.1; anything else
# raises NotImplementedError there). A config of another or no class is read with the
# widest set (DDPMScheduler's): only its ᾱ is used.
BETA_SCHEDULES = {
    "DDIMScheduler": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "DDPMScheduler": ("linear", "scaled_linear", "squaredcos_cap_v2", "laplace", "sigmoid"),
}
ALL_BETA_SCHEDULES = BETA_SCHEDULES["DDPMScheduler"]
# Methods of DDIMScheduler / DDPMScheduler whose behaviour the chain reproduces from the
# config alone: what the serial loop calls (set_timesteps, scale_model_input, step) and
# what step calls. A subclass overriding any of them steps differently.
STEPPING_METHODS = ("set_timesteps", "scale_model_input", "step", "_get_variance",
                    "previous_timestep", "_threshold_sample")

# diffusers 0.42.1 defaults (used for keys a config file leaves out).
_DEFAULTS = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
    "beta_schedule": "linear", "trained_betas": None, "clip_sample": True,
    "clip_sample_range": 1.0, "set_alpha_to_one": True, "steps_offset": 0,
    "prediction_type": "epsilon", "thresholding": False, "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False, "variance_type": "fixed_small",
}


# -- reading a scheduler or its config ------------------------------------------------
def _diffusers_base(cls) -> Optional[type]:
    """diffusers' own DDIMScheduler / DDPMScheduler among ``cls``'s bases, or None (a
    class of that name from another package is not diffusers')."""
    for c in cls.__mro__:
        if c.__name__ in SUPPORTED + SIGMA_SCHEDULERS and c.__module__.split(".")[0] == "diffusers":
            return c
    return None


def _read(scheduler) -> Tuple[str, dict]:
    """(kind, config): kind is the supported diffusers base class name, or the class name
    itself (module-qualified for a class that is not diffusers')."""
    if isinstance(scheduler, Mapping):
        cfg = dict(scheduler)
        kind = str(cfg.get("_class_name", ""))
    elif hasattr(scheduler, "config") and isinstance(getattr(scheduler, "config"), Mapping):
        cfg = dict(scheduler.config)
        cls = type(scheduler)
        base = _diffusers_base(cls)
        kind = base.__name__ if base is not None else f"{cls.__module__}.{cls.__qualname__}"
    else:
        raise TypeError(f"scheduler must be a diffusers scheduler or its config (a mapping), "
                        f"got {type(scheduler).__name__}")
    return kind, {**_DEFAULTS, **cfg}


def _check_not_overridden(scheduler) -> None:
    """TypeError for a subclass of DDIMScheduler / DDPMScheduler (or an instance) that
    overrides a method the serial loop runs: the chain is built from the config and
    would step as diffusers' own class, silently ignoring the override."""
    if isinstance(scheduler, Mapping):
        return
    cls = type(scheduler)
    base = _diffusers_base(cls)
    if base is None:
        return
    above = cls.__mro__[:cls.__mro__.index(base)]          # the subclasses between cls and base
    own = getattr(scheduler, "__dict__", {})              # methods set on the instance itself
    methods = SIGMA_STEPPING_METHODS if base.__name__ in SIGMA_SCHEDULERS else STEPPING_METHODS
    changed = [m for m in methods if any(m in vars(c) for c in above) or m in own]
    if changed:
        what = (f"of class {cls.__qualname__} (a subclass of diffusers' {base.__name__})"
                if cls is not base else f"({base.__name__}) has an instance attribute that")
        raise TypeError(
            f"scheduler {what} overrides {', '.join(changed)}: the parallel chain is built "
            f"from the config and reproduces {base.__name__}'s own step, so it would not step "
            f"as the override does. "
            f"Use {base.__name__} itself, e.g. {base.__name__}.from_config(scheduler.config), "
            f"or a subclass that leaves {', '.join(methods)} as they are")


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


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    # diffusers' rescale_zero_terminal_snr (Lin et al. 2023, Alg. 1), same float32 ops:
    # ᾱ at the last training timestep becomes exactly 0.
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= last
    alphas_bar_sqrt *= first / (first - last)
    alphas_bar = alphas_bar_sqrt ** 2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def alphas_cumprod_from_config(cfg: Mapping, kind: Optional[str] = None) -> torch.Tensor:
    """ᾱ_t (float32, as diffusers computes it) from a scheduler config.

    ``kind``: the scheduler class (default the config's ``_class_name``); its own set of
    ``beta_schedule`` values is accepted (``BETA_SCHEDULES``), any class's for another
    or no class. With ``rescale_betas_zero_snr`` the last value is 0."""
    cfg = {**_DEFAULTS, **dict(cfg)}
    kind = str(cfg.get("_class_name", "")) if kind is None else kind
    T = cfg["num_train_timesteps"]
    check_positive_int("num_train_timesteps", T)
    bs, be, schedule = cfg["beta_start"], cfg["beta_end"], cfg["beta_schedule"]
    accepted = BETA_SCHEDULES.get(kind, ALL_BETA_SCHEDULES)
    if cfg["trained_betas"] is not None:                   # diffusers ignores beta_schedule then
        betas = torch.tensor(cfg["trained_betas"], dtype=torch.float32)
    elif schedule not in accepted:
        who = (f"diffusers' {kind} accepts only" if kind in BETA_SCHEDULES
               else "use one of")
        raise ValueError(f"beta_schedule {schedule!r} is not supported: {who} "
                         f"{', '.join(map(repr, accepted))} (or pass trained_betas)")
    elif schedule == "linear":
        betas = torch.linspace(bs, be, T, dtype=torch.float32)
    elif schedule == "scaled_linear":
        betas = torch.linspace(bs ** 0.5, be ** 0.5, T, dtype=torch.float32) ** 2
    elif schedule == "squaredcos_cap_v2":
        betas = _betas_for_alpha_bar(T, "cosine")
    elif schedule == "laplace":
        betas = _betas_for_alpha_bar(T, "laplace")
    else:  # sigmoid
        betas = torch.sigmoid(torch.linspace(-6, 6, T)) * (be - bs) + bs
    if cfg["rescale_betas_zero_snr"]:
        betas = _rescale_zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0)


def _check_zero_snr_timesteps(cfg: Mapping, ts: np.ndarray) -> None:
    """ValueError where a step would run the model at the zero-SNR timestep (ᾱ = 0)."""
    T = cfg["num_train_timesteps"]
    if not cfg["rescale_betas_zero_snr"] or int(ts.max()) != T - 1:
        return
    pt = cfg["prediction_type"]
    if pt == "epsilon":
        theirs = ("with prediction_type='epsilon' diffusers' own step divides by sqrt(ᾱ) = 0 "
                  "there and returns inf/NaN")
    else:
        theirs = (f"diffusers' step is defined there for prediction_type={pt!r} (it uses the "
                  f"model's x0 directly), but deqir_fast's chains take ε, and at ᾱ = 0 ε = x "
                  f"carries nothing of the model's prediction, so that step cannot be written "
                  f"in their form")
    raise ValueError(
        f"rescale_betas_zero_snr=True sets ᾱ = 0 at t = {T - 1}, and "
        f"timestep_spacing={cfg['timestep_spacing']!r} with steps_offset={cfg['steps_offset']} "
        f"and {len(ts)} steps runs the model at t = {T - 1}: {theirs}. Use "
        f"timestep_spacing='leading' with a steps_offset that keeps the timesteps below "
        f"{T - 1} (there the chain is exact), or rescale_betas_zero_snr=False")


def schedule_from_diffusers(scheduler) -> Schedule:
    """The ``Schedule`` (ᾱ_t, t = 0..T-1) of a diffusers scheduler or scheduler config
    (``dq.schedule_from_diffusers``).

    A scheduler object's own ``alphas_cumprod`` is taken (the float32 values it steps
    with, held in float64); a config (mapping, e.g. a loaded ``scheduler_config.json``) is
    evaluated as diffusers does: ``beta_schedule`` as the config's class accepts it
    (DDIMScheduler: linear, scaled_linear, squaredcos_cap_v2; DDPMScheduler also laplace
    and sigmoid) or ``trained_betas``; ``rescale_betas_zero_snr`` makes the last ᾱ 0."""
    kind, cfg = _read(scheduler)
    if not isinstance(scheduler, Mapping) and isinstance(getattr(scheduler, "alphas_cumprod", None),
                                                        torch.Tensor):
        ac = scheduler.alphas_cumprod.detach().cpu()
    else:
        ac = alphas_cumprod_from_config(cfg, kind)
    try:
        return Schedule(ac.to(torch.float64))
    except ValueError as exc:
        raise ValueError(f"the scheduler's alphas_cumprod cannot be used: {exc}") from None


def _raw_timesteps(cfg: Mapping, S: int) -> np.ndarray:
    """``set_timesteps(S)``'s timesteps, computed with numpy as diffusers 0.42 does, unchecked."""
    T, spacing = cfg["num_train_timesteps"], cfg["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, T - 1, S).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = T // S
        ts = (np.arange(0, S) * ratio).round()[::-1].copy().astype(np.int64)
        return ts + cfg["steps_offset"]
    if spacing == "trailing":
        ratio = T / S
        ts = np.round(np.arange(T, 0, -ratio)).astype(np.int64)
        ts -= 1
        return ts
    raise ValueError(f"timestep_spacing {spacing!r} is not supported; use one of {SPACINGS}")


def _in_range(ts: np.ndarray, T: int) -> bool:
    return bool(ts.min() >= 0 and ts.max() < T)


def timesteps_from_config(cfg: Mapping, num_inference_steps: int) -> np.ndarray:
    """The descending timesteps of ``set_timesteps(num_inference_steps)`` (diffusers 0.42)."""
    cfg = {**_DEFAULTS, **dict(cfg)}
    T, S = cfg["num_train_timesteps"], num_inference_steps
    check_positive_int("num_inference_steps", S)
    if S > T:
        raise ValueError(f"num_inference_steps ({S}) cannot be larger than the scheduler's "
                         f"num_train_timesteps ({T})")
    spacing = cfg["timestep_spacing"]
    ts = _raw_timesteps(cfg, S)
    if not _in_range(ts, T):
        setting = (f"timestep_spacing={spacing!r} with steps_offset={cfg['steps_offset']} and "
                   f"{S} steps gives")
        if ts.max() >= T:
            # diffusers indexes alphas_cumprod[t] with it and fails there
            raise ValueError(f"{setting} timesteps up to {int(ts.max())}, outside [0, {T - 1}]; "
                             f"diffusers' step fails on them too (IndexError on its "
                             f"alphas_cumprod of {T} values). Use a smaller steps_offset")
        what = (f"{len(ts)} timesteps for {S} steps (numpy's arange overshoots by one), the "
                f"last of them {int(ts[-1])}" if len(ts) != S else
                f"timesteps down to {int(ts.min())}")
        near = sorted((n for n in range(max(1, S - 20), min(T, S + 20) + 1)
                       if n != S and _in_range(_raw_timesteps(cfg, n), T)),
                      key=lambda n: (abs(n - S), n))[:2]
        hint = f"num_inference_steps={' or '.join(map(str, sorted(near)))}, " if near else ""
        raise ValueError(
            f"{setting} {what}. diffusers runs them without an error, but wrongly: at a "
            f"negative t it calls the model at that timestep and steps with "
            f"alphas_cumprod[t], which Python's negative indexing makes ᾱ({T} + t) (ᾱ({T - 1}), "
            f"the noisiest value, for t = -1); it treats a nearly clean image as noise, and "
            f"x0 = (x - sqrt(1-ᾱ) ε)/sqrt(ᾱ) divides by that tiny sqrt(ᾱ), so the image comes "
            f"out far off. The parallel chain refuses to reproduce that: use {hint}"
            f"timestep_spacing='linspace', or 'leading' with steps_offset >= 0")
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
def _check_prediction_type(prediction_type) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, "
                         f"got {prediction_type!r}")
    return prediction_type


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


def _conversion_scalars(a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sqrt(ᾱ), sqrt(1-ᾱ)) as ``to_eps`` uses them: from the float64 ᾱ, in float64 (then
    cast to the state's dtype). The chains below compose their steps with exactly these."""
    a = a.to(torch.float64)
    return a ** 0.5, (1 - a) ** 0.5


def _eps_form(prediction_type: str, a: torch.Tensor, sa, sb, c_x0, c_eps, c_x):
    """(P, Q), float64 [S]: the chain x' = P x + Q ε̂ (+ noise) where ε̂ = ``to_eps(out)``.

    diffusers' step is x' = c_x0·x0 + c_eps·ε + c_x·x, with x0 and ε taken from the model's
    output ``out`` as its ``step`` takes them for ``prediction_type``, with its own scalars
    ``sa`` = sqrt(ᾱ), ``sb`` = sqrt(1-ᾱ) (float32 for diffusers' schedulers):
      epsilon: x0 = (x - sb·out)/sa,  ε = out
      sample:  x0 = out,              ε = (x - sa·out)/sb
      v:       x0 = sa·x - sb·out,    ε = sa·out + sb·x.
    That is x' = A x + B out. ``to_eps`` turns out into ε̂ = c1·out + c2·x with its own
    scalars (``_conversion_scalars``), so Q = B/c1 and P = A - Q·c2 make P x + Q ε̂ = A x +
    B out exactly (up to float64 rounding). Deriving x0 from ε̂ with float32 scalars
    instead, as the eps chain does, is off by (1 - sa² - sb²)/sa, which is large where ᾱ is
    tiny (1e-6 in float64 on a cosine schedule's first step, issue #22)."""
    d = torch.float64
    sa, sb, c_x0, c_eps, c_x = (v.to(d) for v in (sa, sb, c_x0, c_eps, c_x))
    if prediction_type == "epsilon":             # the eps chain itself (to_eps is the identity)
        return c_x0 / sa + c_x, c_eps - c_x0 * sb / sa
    csa, csb = _conversion_scalars(a)
    if prediction_type == "v_prediction":
        A = c_x0 * sa + c_eps * sb + c_x
        B = c_eps * sa - c_x0 * sb
        Q = B / csa                                             # ε̂ = csa·v + csb·x
        return A - Q * csb, Q
    if prediction_type == "sample":
        A = c_eps / sb + c_x
        B = c_x0 - c_eps * sa / sb
        Q = -B * csb / csa                                      # ε̂ = (x - csa·x0)/csb
        return A - Q / csb, Q
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


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
        self.prediction_type = _check_prediction_type(prediction_type)
        self.noise_draws = torch.full((self.num_steps,), self.eta > 0)
        f = torch.float32
        a, ap = self.alpha.to(f), self.alpha_next.to(f)           # exact: ᾱ came from float32
        bt = 1 - a
        variance = ((1 - ap) / bt) * (1 - a / ap)
        std = torch.tensor(self.eta, dtype=f) * variance ** 0.5
        direction = (1 - ap - std ** 2).clamp_min(0) ** 0.5
        sa, sb, sap = a ** 0.5, bt ** 0.5, ap ** 0.5
        d = torch.float64
        # x' = sqrt(a') x0 + direction ε (+ σ z), with x0 and ε as diffusers takes them
        self._P, self._Q = _eps_form(prediction_type, self.alpha, sa, sb, sap, direction,
                                     torch.zeros_like(sa))
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
    ``chain_from_diffusers`` uses) repeats the scheduler's float32 arithmetic, float64 (the
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
        self.prediction_type = _check_prediction_type(prediction_type)
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
        # x' = c0 x0 + cs x (+ σ z), with x0 as diffusers takes it
        self._P, self._Q = _eps_form(prediction_type, self.alpha, sa, sb, c0,
                                     torch.zeros_like(c0), cs)
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
    ``deqir_fast.models.eps_model``); its ``noise_draws`` which steps draw noise in the
    serial loop. ``dq.chain_from_diffusers`` is this function.
    Raises a TypeError for a subclass that overrides a method the serial loop runs, and a
    ValueError for settings the chain cannot reproduce (each message says why), among them
    ``rescale_betas_zero_snr`` where a step runs the model at ᾱ = 0.
    """
    kind, cfg = _read(scheduler)
    if kind in SIGMA_SCHEDULERS:
        _check_not_overridden(scheduler)
        return _sigma_chain(scheduler, kind, cfg, num_inference_steps, eta)
    if kind not in SUPPORTED:
        raise ValueError(f"unsupported scheduler {kind or 'config without _class_name'!r}: the "
                         f"parallel chain reproduces {', '.join(SUPPORTED + SIGMA_SCHEDULERS)}; "
                         f"convert with DDIMScheduler.from_config(scheduler.config, "
                         f"clip_sample=False)")
    _check_not_overridden(scheduler)
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
    ts = timesteps_from_config(cfg, num_inference_steps)
    _check_zero_snr_timesteps(cfg, ts)
    ts = check_timesteps(schedule, torch.from_numpy(ts))
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


def _sigma_scheduler(scheduler, kind: str):
    """A scheduler instance to run ``set_timesteps`` on: a copy of ``scheduler`` (its own
    state stays as it was), or one built from a config by diffusers itself."""
    import copy
    if isinstance(scheduler, Mapping):
        try:
            import diffusers
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(f"a {kind} config needs diffusers to compute its sigmas: pip "
                              f"install 'deqir_fast[demo]', or pass the scheduler") from exc
        cfg = {k: v for k, v in scheduler.items() if not k.startswith("_")}
        return getattr(diffusers, kind).from_config(cfg)
    return copy.deepcopy(scheduler)


def _check_sigma_config(kind: str, cfg: Mapping, eta) -> None:
    """ValueError for a σ-space scheduler setting the chain does not reproduce."""
    pt = cfg.get("prediction_type", "epsilon")
    allowed = ("epsilon", "v_prediction") if kind == "EulerAncestralDiscreteScheduler" \
        else PREDICTION_TYPES
    if pt not in allowed:
        raise ValueError(f"{kind} with prediction_type={pt!r} is not supported (one of "
                         f"{allowed}{'; diffusers itself raises for sample' if pt == 'sample' else ''})")
    if eta is not None:
        raise ValueError(f"{kind} has no eta argument (pass eta=None); "
                         f"{'EulerAncestralDiscreteScheduler adds the full ancestral noise' if 'Ancestral' in kind else 'it is deterministic'}")
    if kind != "DPMSolverMultistepScheduler":
        return
    checks = [
        (cfg.get("algorithm_type", "dpmsolver++") == "dpmsolver++",
         "algorithm_type must be 'dpmsolver++' (DPM-Solver++, data prediction); 'dpmsolver' and "
         "the SDE variants are not supported"),
        (cfg.get("solver_order", 2) in (1, 2),
         f"solver_order must be 1 or 2 (DPM-Solver++(2M)), got {cfg.get('solver_order')!r}"),
        (cfg.get("solver_type", "midpoint") in ("midpoint", "heun"),
         f"solver_type must be 'midpoint' or 'heun', got {cfg.get('solver_type')!r}"),
        (not cfg.get("thresholding", False),
         "thresholding=True clips the predicted x0 per step, which is not affine in the "
         "state: build the scheduler with thresholding=False"),
        (cfg.get("variance_type") is None,
         f"variance_type={cfg.get('variance_type')!r} (learned variances) is not supported: "
         f"use variance_type=None with an eps half of the output"),
        (not cfg.get("use_flow_sigmas", False) and not cfg.get("use_dynamic_shifting", False),
         "flow-matching sigmas (use_flow_sigmas, use_dynamic_shifting) are not supported"),
    ]
    for ok, why in checks:
        if not ok:
            raise ValueError(f"DPMSolverMultistepScheduler: {why}")


def _sigma_chain(scheduler, kind: str, cfg: Mapping, num_inference_steps, eta) -> Chain:
    """The chain of a σ-space scheduler (``SIGMA_SCHEDULERS``) after
    ``set_timesteps(num_inference_steps)``: its sigmas become the chain's ᾱ = 1/(1 + σ²)
    (``schedule_from_sigmas``), its timesteps the values the network is called with
    (``chain.model_timesteps``, by the chain's timestep index: see ``models.eps_model``)."""
    from .chains import DPMSolverPP, Euler, EulerAncestral
    from .schedules import schedule_from_sigmas
    _check_sigma_config(kind, cfg, eta)
    if num_inference_steps is None:
        raise ValueError(f"num_inference_steps is required for {kind}")
    if isinstance(num_inference_steps, numbers.Integral) and not isinstance(num_inference_steps, bool):
        num_inference_steps = int(num_inference_steps)
    check_positive_int("num_inference_steps", num_inference_steps)
    sched = _sigma_scheduler(scheduler, kind)
    sched.set_timesteps(num_inference_steps)
    model_ts = sched.timesteps.detach().to("cpu")
    # the loop steps once per timestep, from sigmas[i] to sigmas[i + 1] (with
    # interpolation_type="log_linear" diffusers makes one sigma more than it steps through)
    sigmas = sched.sigmas.detach().to("cpu")[:model_ts.numel() + 1]
    # A last step from σ to the same σ (final_sigmas_type="sigma_min" where the spacing
    # ends at t = 0 or Karras sigmas end at σ_min) leaves diffusers' sample as it is (its
    # first-order update has h = 0): the chain stops before it.
    S_loop = model_ts.numel()
    S = S_loop
    while S > 1 and float(sigmas[S]) == float(sigmas[S - 1]):
        S -= 1
    sigmas, model_ts = sigmas[:S + 1], model_ts[:S]
    try:
        schedule, ts, final_alpha = schedule_from_sigmas(sigmas)
    except ValueError as exc:
        raise ValueError(f"{kind} after set_timesteps({num_inference_steps}) has sigmas the chain "
                         f"cannot step: {exc}") from None
    if kind == "DPMSolverMultistepScheduler":
        # diffusers' step: first order while no earlier output exists and at a
        # ``lower_order_final`` last step of the loop (which may be the dropped one)
        last_low = (cfg.get("euler_at_final", False)
                    or (cfg.get("lower_order_final", True) and S_loop < 15)
                    or cfg.get("final_sigmas_type", "zero") == "zero")
        first = torch.zeros(S, dtype=torch.bool)
        if S == S_loop:
            first[-1] = bool(last_low)
        chain = DPMSolverPP(schedule, ts, solver_order=int(cfg.get("solver_order", 2)),
                            solver_type=cfg.get("solver_type", "midpoint"), first_order=first,
                            final_alpha=final_alpha)
        chain.noise_draws = torch.zeros(S, dtype=torch.bool)
        # the state is diffusers' own (variance preserving): x_T = randn · init_noise_sigma
        chain.initial_scale = float(torch.as_tensor(sched.init_noise_sigma, dtype=torch.float64))
    else:
        # the state is the variance-exploding x = u sqrt(1 + σ²): x_T = randn ·
        # init_noise_sigma enters as u_0 = x_T · init_noise_sigma / sqrt(1 + σ_0²), and the
        # loop's result is u / sqrt(ᾱ') (1 at a final σ of 0)
        if kind == "EulerAncestralDiscreteScheduler":
            chain = EulerAncestral(schedule, ts, eta=1.0, final_alpha=final_alpha)
            chain.noise_draws = torch.ones(S, dtype=torch.bool)     # every step draws
        else:
            chain = Euler(schedule, ts, final_alpha=final_alpha)
            chain.noise_draws = torch.zeros(S, dtype=torch.bool)
        init_sigma = float(torch.as_tensor(sched.init_noise_sigma, dtype=torch.float64))
        chain.initial_scale = init_sigma / (1.0 + float(sigmas[0]) ** 2) ** 0.5
        chain.output_scale = 1.0 / final_alpha ** 0.5
    # step i runs the network at model_ts[i]; its timestep index is S - 1 - i
    chain.model_timesteps = model_ts.flip(0)
    chain.prediction_type = cfg.get("prediction_type", "epsilon")
    chain.scheduler_class = kind
    return chain


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
    # sqrt(ᾱ), sqrt(1-ᾱ) in float64, then in x's dtype: the diffusers chains' coefficients
    # are composed with exactly these values (``_eps_form``), so that conversion and step
    # together do diffusers' arithmetic.
    sa, s1 = _conversion_scalars(schedule.alphas_cumprod.to(x.device)[t])
    shape = (-1, *([1] * (x.dim() - 1)))
    sa, s1 = sa.to(x.dtype).view(shape), s1.to(x.dtype).view(shape)
    if prediction_type == "sample":
        return (x - sa * out) / s1
    return sa * out + s1 * x                                     # v_prediction


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


def __getattr__(name):
    if name == "eps_model":                  # moved (issue #23): models imports this module
        raise AttributeError("deqir_fast.diffusers_compat.eps_model moved: use "
                             "deqir_fast.models.eps_model(network, scheduler, max_batch)")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
