"""Samplers as elementwise-affine chains (docs/design.md §2).

In a fixed orthonormal basis (pixels for DDIM, the operator's Vᵀ for DDRM and DDNM)
every step of every supported sampler is

    u_{i+1} = P_i * u_i + Q_i * ē_i + R_i,          ē_i = Vᵀ model(V u_i, t_i).

Each chain writes its step as u_{i+1} = k0·x̄0 + kE·ē + kY·ȳ + kZ·z with the usual
prediction x̄0 = (u - sqrt(1-a)·ē)/sqrt(a), so that

    P = k0 / sqrt(a),   Q = kE - k0·sqrt(1-a)/sqrt(a),   R = kY·ȳ + kZ·z.

(a = ᾱ(t_i), a' = ᾱ(t_{i+1}), ȳ = Uᵀy laid out like Vᵀx, z = the step's noise draw.)
The serial sampler and the parallel solver both use these same coefficients, so a
converged parallel solve does the serial sampler's arithmetic.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._checks import check_nonnegative, check_tensor, check_unit_interval
from .operators import Operator
from .ops.fused_round import KernelSpec
from .schedules import Schedule, check_timesteps


class StepCoefficients:
    """The per-step affine maps of one prepared chain, in the chain's basis.

    ``P``, ``Q``: [S, 1, *spectral] (broadcast over the batch); ``R``: [S, B, ...] or
    None when it is zero; ``u0``: the state entering step 0, [B, C, H, W].

    ``Chain.coefficients`` builds P, Q and R on first access only (in float64, cast to
    the state dtype, under the grad mode of the call that made them): the fused round
    (``ops/fused_round.py``) computes them per element in-kernel for DDIM, DDRM and
    DDNM and never touches them, so a solve does not hold [S, 1, C, H, W] tensors.
    ``noise`` and ``ybar`` (ȳ = Uᵀy laid out like Vᵀx, or None) are what R is made of.
    ``P_minus_one``: P - 1 computed in float64 before the cast, for a chain that steps in
    increment form (``Chain.increment_form``), else None."""

    def __init__(self, P=None, Q=None, R=None, u0=None, *, build=None, noise=None, ybar=None):
        self._P, self._Q, self._R = P, Q, R
        self._P_minus_one = None
        self._build = build
        self.u0 = u0
        self.noise = noise
        self._ybar = ybar

    def _materialize(self):
        if self._build is not None:
            self._P, self._Q, self._R, self._P_minus_one = self._build()
            self._build = None

    @property
    def materialized(self) -> bool:
        """Whether P, Q and R exist as tensors (they are built on first access)."""
        return self._build is None

    @property
    def P(self) -> torch.Tensor:
        self._materialize()
        return self._P

    @property
    def Q(self) -> torch.Tensor:
        self._materialize()
        return self._Q

    @property
    def R(self) -> Optional[torch.Tensor]:
        self._materialize()
        return self._R

    @property
    def P_minus_one(self) -> Optional[torch.Tensor]:
        self._materialize()
        return self._P_minus_one

    @property
    def ybar(self) -> Optional[torch.Tensor]:
        if callable(self._ybar):
            self._ybar = self._ybar()
        return self._ybar


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den where den != 0, else 0 (only used where the 0-branch is discarded)."""
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


class Chain:
    """Base class: a schedule, descending timesteps and ``final_alpha`` (ᾱ after the
    last step). Subclasses give the basis and the step coefficients."""

    operator: Optional[Operator] = None
    num_jacobian_classes = 1         # see ``jacobian_classes``
    # 2 for a multistep chain whose step also reads the previous step's state and model
    # output (``previous_coefficients``, docs/design.md §2.8)
    order = 1
    # x_T's factor into the first state (a diffusers σ-space scheduler's init_noise_sigma /
    # sqrt(1 + σ_0²)), and the final state's into the serial loop's result (1/sqrt(ᾱ') for
    # a variance-exploding loop that stops at σ > 0); set by the adapters
    initial_scale = 1.0
    output_scale = 1.0
    # step as u' = u + ((P - 1) u + Q ē + R), P - 1 from float64: the σ-space samplers'
    # own arithmetic x' = x + d·dt adds the increment to an exact state, and P ≈ 1 rounded
    # to float32 scales the whole state by up to 6e-8 a step: on the bundled UNet our
    # float32 Euler-20 was 1.8e-5 from diffusers' float32 loop, 6.3e-6 in this form
    # (`bench/samplers.py --diffusers-loop`, bench/RESULTS.md §18)
    increment_form = False

    def __init__(self, schedule: Schedule, timesteps, final_alpha: float = 1.0):
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a deqir_fast.Schedule, got {type(schedule).__name__}")
        self.schedule = schedule
        self.timesteps = check_timesteps(schedule, timesteps)
        final_alpha = check_unit_interval("final_alpha", final_alpha)
        if final_alpha <= 0.0:
            raise ValueError("final_alpha must be > 0")
        if final_alpha <= float(schedule.alphas_cumprod[self.timesteps[-1]]):
            raise ValueError("final_alpha must exceed ᾱ at the last timestep")
        self.final_alpha = final_alpha
        ac = schedule.alphas_cumprod
        self.alpha = ac[self.timesteps]                                        # a_i
        self.alpha_next = torch.cat([ac[self.timesteps[1:]],
                                     torch.tensor([final_alpha], dtype=torch.float64)])  # a'_i

    def _on_device(self, name: str, device: torch.device) -> torch.Tensor:
        """``alpha_next`` or the operator's singular values, float64, on ``device``, copied
        once per device: the secant asks for the class ids every round, and a copy from
        the host there would make each round wait for the host (and break graph capture).
        The copies are never refreshed: a chain's steps and operator are fixed once it is
        built (build a new chain for another operator)."""
        cache = self.__dict__.setdefault("_device_tables", {})
        key = (name, str(device))
        if key not in cache:
            src = self.alpha_next if name == "alpha_next" else self.operator.singulars
            cache[key] = src.to(device=device, dtype=torch.float64)
        return cache[key]

    @property
    def num_steps(self) -> int:
        return self.timesteps.numel()

    @property
    def needs_noise(self) -> bool:
        return True

    @property
    def noise_levels(self) -> torch.Tensor:
        """sqrt(1 - a'_i): the noise std of the state after each step, [S], float64."""
        return (1.0 - self.alpha_next).clamp_min(0.0).sqrt()

    # -- basis -------------------------------------------------------------------
    def to_basis(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.operator is None else self.operator.Vt(x)

    def from_basis(self, u: torch.Tensor) -> torch.Tensor:
        return u if self.operator is None else self.operator.V(u)

    # -- preparation ---------------------------------------------------------------
    def check_inputs(self, x_T: torch.Tensor) -> None:
        """Validate x_T against the chain (its measurement too); raise ValueError."""
        if x_T.dim() != 4:
            raise ValueError(f"x_T must have shape [B, C, H, W], got {tuple(x_T.shape)}")

    def coefficients(self, x_T: torch.Tensor, noise: Optional[torch.Tensor],
                     y: Optional[torch.Tensor] = None) -> StepCoefficients:
        """The affine maps for this x_T (state dtype/device), noise [S, *x_T.shape] and
        measurement (default the chain's ``y``; pass another tensor with the same
        values to differentiate with respect to it)."""
        like = x_T
        S = self.num_steps
        grad = torch.is_grad_enabled()

        def build():
            with torch.set_grad_enabled(grad):
                # Coefficients in float64 on the state's device, cast once at the end.
                a = self.alpha.to(like.device).view(S, 1, 1, 1, 1)
                an = self.alpha_next.to(like.device).view(S, 1, 1, 1, 1)
                k0, kE, kY, kZ = self._k(a, an)
                P = k0 / a.sqrt()
                Q = kE - k0 * (1.0 - a).sqrt() / a.sqrt()
                P_minus_one = (P - 1.0).to(like) if self.increment_form else None
                R = None
                if kY is not None:
                    ybar = self._ybar(like, y).to(torch.float64).unsqueeze(0)
                    R = kY * ybar
                if kZ is not None and noise is not None and bool((kZ != 0).any()):
                    Rz = kZ.to(like) * noise
                    R = Rz if R is None else R.to(like) + Rz
                if R is not None:
                    R = R.to(like)
                return P.to(like), Q.to(like), R, P_minus_one

        def ybar():
            with torch.set_grad_enabled(grad):
                return self._ybar(like, y)

        return StepCoefficients(u0=self._initial_state(x_T, y), build=build, noise=noise,
                                ybar=ybar if self.operator is not None else None)

    def kernel_spec(self):
        """What the fused round (``ops/fused_round.py``) needs to compute this chain's
        coefficients in-kernel, or None: then the solver reads the materialised
        ``coefficients()``. Only DDIM, DDRM and DDNM themselves have one; a subclass
        (e.g. ``diffusers_compat``'s float32 DDIM and DDPM) may step differently."""
        return None

    def _k(self, a, an):
        raise NotImplementedError

    def previous_coefficients(self) -> Optional[tuple]:
        """(C, D), each [S] float64, for a chain of order 2 whose step i also reads the
        previous step's input and model output: u_{i+1} = P u_i + Q ē_i + R_i + C_i u_{i-1}
        + D_i ē_{i-1}, with C_0 = D_0 = 0 (docs/design.md §2.8). None for order 1."""
        return None

    def jacobian_classes(self, lo: int, hi: int, like: torch.Tensor) -> Optional[torch.Tensor]:
        """Which coefficient class each spectral element of steps lo..hi-1 is in, as
        small ints broadcastable to [hi-lo, 1, *like.shape[1:]], or None when every element
        of a step is treated alike. The linearised scan fits one slope of ∂ē/∂u per
        (step, batch item, class) (docs/design.md §3a): the chain updates the classes
        differently, so their errors travel differently."""
        return None

    def _ybar(self, like, y=None) -> torch.Tensor:
        raise NotImplementedError

    def _initial_state(self, x_T: torch.Tensor, y=None) -> torch.Tensor:
        return x_T if self.initial_scale == 1.0 else x_T * self.initial_scale

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.num_steps}, t={self.timesteps[0]}..{self.timesteps[-1]})"


class DDIM(Chain):
    """DDIM (Song et al. 2021, Eq. 12) in pixel space; ``eta=1`` is DDPM-like ancestral
    sampling, ``eta=0`` deterministic."""

    def __init__(self, schedule: Schedule, timesteps, eta: float = 0.0, final_alpha: float = 1.0):
        super().__init__(schedule, timesteps, final_alpha)
        self.eta = check_unit_interval("eta", eta)

    @property
    def needs_noise(self) -> bool:
        return self.eta > 0

    @classmethod
    def from_diffusers(cls, *args, **kwargs):
        """Moved to ``dq.chain_from_diffusers(scheduler, num_inference_steps, eta)``
        (``deqir_fast.diffusers_compat``): the maths does not import the adapters
        (issue #23). Raises AttributeError."""
        raise AttributeError("DDIM.from_diffusers moved: use dq.chain_from_diffusers(scheduler, "
                             "num_inference_steps, eta) (deqir_fast.diffusers_compat."
                             "chain_from_diffusers)")

    def kernel_spec(self):
        if type(self) is not DDIM:
            return None
        return KernelSpec("ddim", self.alpha, self.alpha_next, eta=self.eta,
                          uses_noise=self.eta > 0)

    def _k(self, a, an):
        # 1. σ_t(η) = η sqrt((1-a')/(1-a)) sqrt(1 - a/a')   (Eq. 16)
        sigma = self.eta * ((1 - an) / (1 - a)).sqrt() * (1 - a / an).clamp_min(0).sqrt()
        # 2. x' = sqrt(a') x̂0 + sqrt(1 - a' - σ²) ε + σ z    (Eq. 12)
        k0 = an.sqrt()
        kE = (1 - an - sigma ** 2).clamp_min(0).sqrt()
        return k0, kE, None, (sigma if self.eta > 0 else None)


class Euler(DDIM):
    """Euler on the probability-flow ODE in σ-space (k-diffusion's ``sample_euler`` without
    churn, diffusers' ``EulerDiscreteScheduler``): with ᾱ = 1/(1 + σ²) and the variance-
    preserving state u = x / sqrt(1 + σ²) it is DDIM with η = 0 (``k_diffusion`` shows the
    algebra), stepped in increment form (``increment_form``) on the generic scan."""

    increment_form = True

    def __init__(self, schedule: Schedule, timesteps, final_alpha: float = 1.0):
        super().__init__(schedule, timesteps, eta=0.0, final_alpha=final_alpha)


class _Restoration(Chain):
    """Shared set-up of the chains that condition on y = A x + σ_y n."""

    def __init__(self, schedule, timesteps, operator, y, sigma_y, final_alpha):
        super().__init__(schedule, timesteps, final_alpha)
        if not isinstance(operator, Operator):
            raise TypeError(f"operator must be a deqir_fast.operators.Operator, "
                            f"got {type(operator).__name__}")
        self.operator = operator
        self.y = check_tensor("y", y, ndim=4)
        self.sigma_y = check_nonnegative("sigma_y", sigma_y)

    def check_inputs(self, x_T):
        self.operator.check_x("x_T", x_T)
        self.operator.check_y("y", self.y, tuple(x_T.shape))

    def _ybar(self, like, y=None):
        return self.operator.Ut((self.y if y is None else y).to(like))

    def _s(self, device) -> torch.Tensor:
        return self._on_device("singulars", device)


class DDRM(_Restoration):
    """DDRM (Kawar et al. 2022, Sec. 3): per spectral element, by s·σ' against σ_y
    (σ' = sqrt((1-a')/a'), the variance-exploding noise level of the next step)."""

    def __init__(self, schedule: Schedule, timesteps, operator: Operator, y: torch.Tensor,
                 sigma_y: float = 0.0, eta: float = 0.85, eta_b: float = 1.0,
                 final_alpha: float = 1.0):
        super().__init__(schedule, timesteps, operator, y, sigma_y, final_alpha)
        self.eta = check_unit_interval("eta", eta)
        self.eta_b = check_unit_interval("eta_b", eta_b)

    def _cases(self, sigma_next):
        s = self._s(sigma_next.device)
        before = (s > 0) & (s * sigma_next > self.sigma_y)   # noisier than y
        after = (s > 0) & (s * sigma_next < self.sigma_y)    # less noisy than y
        return s, before, after

    num_jacobian_classes = 3

    def kernel_spec(self):
        if type(self) is not DDRM:
            return None
        return KernelSpec("ddrm", self.alpha, self.alpha_next, eta=self.eta, eta_b=self.eta_b,
                          sigma_y=self.sigma_y, singulars=self.operator.singulars,
                          uses_y=True, uses_noise=True)

    def jacobian_classes(self, lo, hi, like):
        """0: missing (s = 0), 1: less noisy than y, 2: noisier than y (by s·σ' vs σ_y)."""
        an = self._on_device("alpha_next", like.device)[lo:hi].view(-1, 1, 1, 1, 1)
        _, before, after = self._cases(((1 - an) / an).sqrt())
        return (after.to(torch.int8) + 2 * before.to(torch.int8))

    def _k(self, a, an):
        sn = ((1 - an) / an).sqrt()                         # σ' (VE)
        s, before, after = self._cases(sn)
        eta, eta_b, sy = self.eta, self.eta_b, self.sigma_y
        keep = (1 - eta ** 2) ** 0.5
        one = torch.ones_like(s * sn)
        # 1. missing (s = 0):      x̄' = x̄0 + sqrt(1-η²) σ' ē + η σ' z
        c0, cE, cY, cZ = one, keep * sn * one, 0 * one, eta * sn * one
        # 2. less noisy than y:    x̄' = x̄0 + sqrt(1-η²) σ' (ȳ - s x̄0)/σ_y + η σ' z
        if sy > 0:
            c0 = torch.where(after, 1 - keep * sn * s / sy, c0)
            cE = torch.where(after, 0 * one, cE)
            cY = torch.where(after, keep * sn / sy * one, cY)
        # 3. noisier than y:       x̄' = (1-η_b) x̄0 + η_b ȳ/s + sqrt(σ'² - σ_y² η_b²/s²) z
        inv_s = _safe_div(torch.ones_like(s), s)
        c0 = torch.where(before, (1 - eta_b) * one, c0)
        cE = torch.where(before, 0 * one, cE)
        cY = torch.where(before, eta_b * inv_s * one, cY)
        cZ = torch.where(before, (sn ** 2 - (sy * eta_b * inv_s) ** 2).clamp_min(0).sqrt(), cZ)
        # 4. back to the variance-preserving state: u' = sqrt(a') x̄'
        r = an.sqrt()
        return r * c0, r * cE, r * cY, r * cZ

    def _initial_state(self, x_T, y=None):
        # p(x_T | y) (Sec. 3): x̄_T = ȳ/s + sqrt(σ_T² - σ_y²/s²) z where s σ_T > σ_y,
        # else σ_T z; the variance-preserving state is sqrt(a_0) x̄_T.
        a0 = float(self.alpha[0])
        sT = ((1 - a0) / a0) ** 0.5
        s = self.operator.singulars_as(x_T)
        seen = (s > 0) & (s * sT > self.sigma_y)
        inv_s = _safe_div(torch.ones_like(s), s)
        ybar = self._ybar(x_T, y)
        spread = torch.where(seen, (sT ** 2 - (self.sigma_y * inv_s) ** 2).clamp_min(0).sqrt(),
                             torch.full_like(s, sT))
        mean = torch.where(seen, ybar * inv_s, torch.zeros_like(ybar))
        return a0 ** 0.5 * (mean + spread * x_T)


class DDNM(_Restoration):
    """DDNM (Wang et al. 2023): range–null-space decomposition; DDNM+ when σ_y > 0.

    x̂0 = x0 - Σ A⁺(A x0 - y) with Σ = λ·I per spectral element (Eq. 17, 19): λ = 1 and
    γ = sqrt(σ'² - (sqrt(a') λ σ_y/s)²) while σ' ≥ sqrt(a') σ_y/s, else λ = σ' s/(sqrt(a') σ_y)
    and γ = 0; here σ' = sqrt(1 - a'). Then x' = sqrt(a') x̂0 + γ (η z + sqrt(1-η²) ε).
    With σ_y = 0 this is DDNM's x' = sqrt(a') x̂0 + sqrt(1-a') (η z + sqrt(1-η²) ε).
    """

    def __init__(self, schedule: Schedule, timesteps, operator: Operator, y: torch.Tensor,
                 sigma_y: float = 0.0, eta: float = 0.0, final_alpha: float = 1.0):
        super().__init__(schedule, timesteps, operator, y, sigma_y, final_alpha)
        self.eta = check_unit_interval("eta", eta)

    def _split(self, an):
        """σ' (VP), 1/s, the noise std of sqrt(a') A⁺y, and where λ = 1 (Eq. 19)."""
        s = self._s(an.device)
        sn = (1 - an).sqrt()
        inv_s = _safe_div(torch.ones_like(s), s)
        y_noise = an.sqrt() * self.sigma_y * inv_s
        return s, sn, inv_s, y_noise, (s > 0) & (sn >= y_noise)

    num_jacobian_classes = 3

    def kernel_spec(self):
        if type(self) is not DDNM:
            return None
        return KernelSpec("ddnm", self.alpha, self.alpha_next, eta=self.eta,
                          sigma_y=self.sigma_y, singulars=self.operator.singulars,
                          uses_y=True, uses_noise=self.eta > 0)

    def jacobian_classes(self, lo, hi, like):
        """0: null space (s = 0), 1: range with λ = 1, 2: range with λ < 1 (DDNM+)."""
        s, _, _, _, full = self._split(self._on_device("alpha_next", like.device)[lo:hi].view(-1, 1, 1, 1, 1))
        return full.to(torch.int8) + 2 * ((s > 0) & ~full).to(torch.int8)

    def _k(self, a, an):
        s, sn, inv_s, y_noise, full = self._split(an)
        # 1. λ, γ per element (Eq. 19); λ = 0 in the null space
        lam = torch.where(full, torch.ones_like(y_noise),
                          torch.where(s > 0, _safe_div(sn * s, an.sqrt() * self.sigma_y * torch.ones_like(s)),
                                      torch.zeros_like(y_noise)))
        gamma = torch.where(full, (sn ** 2 - y_noise ** 2).clamp_min(0).sqrt(),
                            torch.where(s > 0, torch.zeros_like(y_noise), sn * torch.ones_like(s)))
        # 2. x' = sqrt(a') ((1-λ) x̄0 + λ ȳ/s) + γ (η z + sqrt(1-η²) ē)
        k0 = an.sqrt() * (1 - lam)
        kE = gamma * (1 - self.eta ** 2) ** 0.5
        kY = an.sqrt() * lam * inv_s
        kZ = gamma * self.eta
        return k0, kE, kY, (kZ if self.eta > 0 else None)

    @property
    def needs_noise(self) -> bool:
        return self.eta > 0


class EulerAncestral(Chain):
    """Euler-ancestral on the probability-flow ODE in σ-space (k-diffusion's
    ``sample_euler_ancestral``, diffusers' ``EulerAncestralDiscreteScheduler``), in the
    variance-preserving state u = x / sqrt(1 + σ²) (σ² = (1-ᾱ)/ᾱ).

    With x0 = D(x, σ) and ε = (x - x0)/σ the step is x' = x0 + σ_down ε + s_noise σ_up z,
    so in u it is affine like every other chain. ``eta = 0`` is Euler (= DDIM, η = 0)."""

    increment_form = True

    def __init__(self, schedule: Schedule, timesteps, eta: float = 1.0, s_noise: float = 1.0,
                 final_alpha: float = 1.0):
        super().__init__(schedule, timesteps, final_alpha)
        self.eta = check_nonnegative("eta", eta)
        self.s_noise = check_nonnegative("s_noise", s_noise)

    @property
    def needs_noise(self) -> bool:
        return self.eta > 0 and self.s_noise > 0

    def _k(self, a, an):
        # 1. σ = sqrt((1-ᾱ)/ᾱ) of this step's input and of the next state
        sigma, sigma_next = ((1 - a) / a).sqrt(), ((1 - an) / an).sqrt()
        # 2. σ_up = min(σ', η sqrt(σ'² (σ² - σ'²)/σ²)), σ_down = sqrt(σ'² - σ_up²)
        #    (k-diffusion ``get_ancestral_step``)
        up = torch.minimum(sigma_next, self.eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2)
                                                   / sigma ** 2).clamp_min(0).sqrt())
        down = (sigma_next ** 2 - up ** 2).clamp_min(0).sqrt()
        # 3. x' = x0 + σ_down ε + s_noise σ_up z, and u' = sqrt(ᾱ') x'
        r = an.sqrt()
        return r, r * down, None, (r * up * self.s_noise if self.needs_noise else None)


class DPMSolverPP(Chain):
    """DPM-Solver++ (Lu et al. 2022), multistep, data prediction, on the variance-
    preserving state (k-diffusion's ``sample_dpmpp_2m``; diffusers'
    ``DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"``).

    With α = sqrt(ᾱ), σ = sqrt(1-ᾱ), λ = log(α/σ), h_i = λ_{i+1} - λ_i, r_i = h_{i-1}/h_i and
    the data prediction m_i = (u_i - σ_i ε_i)/α_i, step i is (Lu et al., Alg. 2)

        u_{i+1} = (σ_{i+1}/σ_i) u_i + α_{i+1}(1 - e^{-h_i}) m_i + κ_i (m_i - m_{i-1}),

    κ_i = α_{i+1}(1 - e^{-h_i})/(2 r_i) ("midpoint") or α_{i+1}((e^{-h_i} - 1)/h_i + 1)/r_i
    ("heun"), and κ_i = 0 at a first-order step: ``first_order[i]`` (``solver_order=1``:
    every step; step 0 and a step to σ' = 0, ᾱ' = 1, always, as both libraries do: that
    step lands on m_i). The m_{i-1} term makes the chain order 2
    (``previous_coefficients``)."""

    order = 2
    increment_form = True
    SOLVER_TYPES = ("midpoint", "heun")

    def __init__(self, schedule: Schedule, timesteps, solver_order: int = 2,
                 solver_type: str = "midpoint", first_order=None, final_alpha: float = 1.0):
        super().__init__(schedule, timesteps, final_alpha)
        if isinstance(solver_order, bool) or not isinstance(solver_order, int) or solver_order not in (1, 2):
            raise ValueError(f"solver_order must be 1 or 2, got {solver_order!r}")
        if solver_type not in self.SOLVER_TYPES:
            raise ValueError(f"solver_type must be one of {self.SOLVER_TYPES}, got {solver_type!r}")
        S = self.num_steps
        if first_order is None:
            first_order = torch.zeros(S, dtype=torch.bool)
        try:
            flags = torch.as_tensor(first_order)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"first_order must be a sequence of bools, one per step, got "
                            f"{type(first_order).__name__}") from None
        if flags.dtype != torch.bool:
            raise TypeError(f"first_order must hold bools (one per step), got dtype {flags.dtype}")
        if flags.shape != (S,):
            raise ValueError(f"first_order must have one flag per step ({S}), got shape "
                             f"{tuple(flags.shape)}")
        first_order = flags.clone()
        first_order[0] = True
        first_order |= self.alpha_next >= 1.0            # h = inf: no second-order term
        if solver_order == 1:
            first_order[:] = True
        self.solver_order, self.solver_type, self.first_order = solver_order, solver_type, first_order
        self.order = 1 if bool(first_order.all()) else 2

    @property
    def needs_noise(self) -> bool:
        return False

    def _terms(self):
        """Per step [S] float64: ρ = σ'/σ, the first-order weight K = α'(1 - e^{-h}) of m_i,
        and κ of (m_i - m_{i-1})."""
        a, an = self.alpha, self.alpha_next
        sig, sig_n = (1 - a).sqrt(), (1 - an).sqrt()
        lam = a.sqrt().log() - sig.log()
        lam_n = an.sqrt().log() - sig_n.log()                     # +inf where ᾱ' = 1
        h = lam_n - lam
        K = an.sqrt() * -torch.expm1(-h)
        h_prev = torch.cat([h.new_ones(1), h[:-1]])              # h_{i-1} (unused at step 0)
        r = h_prev / h
        if self.solver_type == "midpoint":
            kappa = K / (2 * r)
        else:
            kappa = an.sqrt() * (torch.expm1(-h) / h + 1) / r
        kappa = torch.where(self.first_order, torch.zeros_like(kappa), kappa)
        return sig_n / sig, K, kappa

    def _k(self, a, an):
        rho, K, kappa = (v.to(a.device).view_as(a) for v in self._terms())
        # 1. u' = ρ u + (K + κ) m_i - κ m_{i-1}; ρ u = ρ (sqrt(a) m + sqrt(1-a) ε)
        return rho * a.sqrt() + K + kappa, rho * (1 - a).sqrt(), None, None

    def previous_coefficients(self):
        if self.order == 1:
            return None
        _, _, kappa = self._terms()
        # 2. -κ m_{i-1} = -κ/α_{i-1} u_{i-1} + κ σ_{i-1}/α_{i-1} ε_{i-1}
        a_prev = torch.cat([self.alpha.new_ones(1), self.alpha[:-1]])
        C = -kappa / a_prev.sqrt()
        D = kappa * (1 - a_prev).sqrt() / a_prev.sqrt()
        return C, D
