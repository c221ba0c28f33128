"""Today's samplers in parallel (issue #25): Euler, Euler-ancestral, DPM-Solver++(2M).

1. k-diffusion: ``deqir_fast.k_diffusion.sample_euler_ancestral`` / ``sample_dpmpp_2m``
   (serial and parallel at tol = 0) against k-diffusion's published loops, transcribed
   below (k-diffusion is not installed here), over step counts 10, 20, 25, 50, Karras
   and evenly spaced sigmas, eta and s_noise: float64 <= 1e-12, float32 <= 1e-5
   (relative to max(1, max|x|)).
2. diffusers: ``chain_from_diffusers`` for EulerDiscreteScheduler,
   EulerAncestralDiscreteScheduler and DPMSolverMultistepScheduler, end to end in float32
   against diffusers' own loop (``scale_model_input``, ``step`` with the same generator)
   on a tiny UNet, <= 1e-5 relative, over a covering set of steps x spacing x prediction
   type x Karras x the DPM options; in float64 against a transcription of diffusers'
   step (diffusers' own ``step`` upcasts to float32, so it cannot be the float64
   reference), <= 1e-12.
3. Parallel at the default tol: within one grey level (2/255) of serial, ``converged``
   honest, through windows, the planner, every rule and linearisation and the serial
   shadow (an order-2 chain's window reads the state two steps back).
4. Clear errors for what is not reproduced.

All comparisons use tolerances (no exact float equality), so the file passes on any CPU
and with ATEN_CPU_CAPABILITY=default.
"""
import copy
import itertools

import pytest
import torch

import deqir_fast as dq
from deqir_fast import k_diffusion as kd
from deqir_fast.chains import DPMSolverPP, Euler, EulerAncestral
from deqir_fast.diffusers_compat import draw_noise
from deqir_fast.schedules import schedule_from_sigmas
from test_dropin_k_diffusion import Denoiser, get_sigmas_karras

GREY = 2 / 255


def rel(a, b):
    """max|a - b| / max(1, max|b|)."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


# -- k-diffusion's loops, transcribed (k_diffusion/sampling.py, v0.1.1) ------------------
def ancestral_step(sigma_from, sigma_to, eta=1.0):
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2)
                                    / sigma_from ** 2) ** 0.5)
    return (sigma_to ** 2 - sigma_up ** 2) ** 0.5, sigma_up


@torch.no_grad()
def euler_ancestral_reference(model, x, sigmas, eta=1.0, s_noise=1.0, noise_sampler=None):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def dpmpp_2m_reference(model, x, sigmas):
    s_in = x.new_ones([x.shape[0]])
    sigma_fn, t_fn = (lambda t: t.neg().exp()), (lambda sigma: sigma.log().neg())
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            r = (t - t_fn(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


def fixed_noise(x, n, seed=7):
    """A noise_sampler that hands out the same n draws in order, again after reset()."""
    g = torch.Generator().manual_seed(seed)
    draws = [torch.randn(x.shape, generator=g, dtype=x.dtype) for _ in range(n)]

    class Sampler:
        def __init__(self):
            self.k = 0

        def __call__(self, sigma, sigma_next):
            self.k += 1
            return draws[self.k - 1]
    return Sampler


def sigmas_for(kind, n, dtype):
    if kind == "karras":
        return get_sigmas_karras(n, 0.03, 14.6).to(dtype)
    return torch.cat([torch.linspace(14.6, 0.03, n), torch.zeros(1)]).to(dtype)   # even, to 0


KD_GRID = list(itertools.product((10, 20, 25, 50), ("karras", "even")))
BOUND = {torch.float64: 1e-12, torch.float32: 1e-5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,kind", KD_GRID)
def test_dpmpp_2m_equals_k_diffusion(n, kind, dtype):
    den = Denoiser().to(dtype)
    sigmas = sigmas_for(kind, n, dtype)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(n), dtype=dtype) * sigmas[0]
    ref = dpmpp_2m_reference(den, x, sigmas)
    assert rel(kd.sample_dpmpp_2m(den, x, sigmas, serial=True), ref) <= BOUND[dtype]
    out, res = kd.sample_dpmpp_2m(den, x, sigmas, tol=0, return_result=True)
    assert rel(out, ref) <= BOUND[dtype] and res.converged
    out, res = kd.sample_dpmpp_2m(den, x, sigmas, return_result=True)     # default tol
    assert res.converged and float((out - ref).abs().max()) < GREY
    assert res.iterations < n


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,kind", KD_GRID)
@pytest.mark.parametrize("eta,s_noise", [(1.0, 1.0), (0.5, 0.8), (1.5, 1.0)])     # 1.5: σ_up capped
def test_euler_ancestral_equals_k_diffusion(n, kind, eta, s_noise, dtype):
    den = Denoiser().to(dtype)
    sigmas = sigmas_for(kind, n, dtype)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(n), dtype=dtype) * sigmas[0]
    Sampler = fixed_noise(x, n)
    ref = euler_ancestral_reference(den, x, sigmas, eta, s_noise, Sampler())
    kw = dict(eta=eta, s_noise=s_noise)
    assert rel(kd.sample_euler_ancestral(den, x, sigmas, noise_sampler=Sampler(), serial=True,
                                         **kw), ref) <= BOUND[dtype]
    out, res = kd.sample_euler_ancestral(den, x, sigmas, noise_sampler=Sampler(), tol=0,
                                         return_result=True, **kw)
    assert rel(out, ref) <= BOUND[dtype] and res.converged
    out, res = kd.sample_euler_ancestral(den, x, sigmas, noise_sampler=Sampler(),
                                         return_result=True, **kw)
    assert res.converged and float((out - ref).abs().max()) < GREY


def test_euler_ancestral_default_noise_is_torch_randn_in_step_order():
    """noise_sampler=None draws torch.randn_like(x) once per step with sigma_next > 0, in
    step order, as k-diffusion's default_noise_sampler does (from the global generator)."""
    den = Denoiser().double()
    sigmas = get_sigmas_karras(12, 0.03, 14.6).double()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64) * sigmas[0]
    torch.manual_seed(3)
    ref = euler_ancestral_reference(den, x, sigmas, noise_sampler=lambda s, sn: torch.randn_like(x))
    after_ref = torch.rand(1)
    torch.manual_seed(3)
    out = kd.sample_euler_ancestral(den, x, sigmas, tol=0)
    after = torch.rand(1)
    assert rel(out, ref) <= 1e-12
    assert torch.equal(after, after_ref)   # exact: no draw for the step to σ = 0, as k-diffusion
    pairs = []
    kd.sample_euler_ancestral(den, x, sigmas, noise_sampler=lambda s, sn: pairs.append(
        (float(s), float(sn))) or torch.randn_like(x))
    assert pairs == [(float(sigmas[i]), float(sigmas[i + 1])) for i in range(len(sigmas) - 2)]


def test_eta_zero_is_euler_and_stopping_above_zero():
    """eta = 0 is Euler; its noise_sampler is still called once per step with sigma_next > 0,
    as k-diffusion calls it (the default one advances torch's generator as the loop does);
    sigmas ending above 0 return x at that sigma."""
    den = Denoiser().double()
    sigmas = get_sigmas_karras(15, 0.5, 14.6).double()[:-1]            # ends at 0.5, no 0
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64) * sigmas[0]
    euler = kd.sample_euler(den, x, sigmas, serial=True)
    calls = []

    def sampler(s, sn):
        calls.append(1)
        return torch.randn_like(x)
    out = kd.sample_euler_ancestral(den, x, sigmas, eta=0.0, tol=0, noise_sampler=sampler)
    assert len(calls) == len(sigmas) - 1 and rel(out, euler) <= 1e-12
    torch.manual_seed(5)
    kd.sample_euler_ancestral(den, x, sigmas, eta=0.0, s_noise=0.0)
    after = torch.rand(1)
    torch.manual_seed(5)
    euler_ancestral_reference(den, x, sigmas, 0.0, 0.0, lambda s, sn: torch.randn_like(x))
    assert torch.equal(after, torch.rand(1))       # exact: the same generator state
    assert rel(kd.sample_dpmpp_2m(den, x, sigmas, tol=0),
               dpmpp_2m_reference(den, x, sigmas)) <= 1e-12


def test_callbacks_carry_k_diffusion_payloads():
    den = Denoiser().double()
    sigmas = get_sigmas_karras(8, 0.03, 14.6).double()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64) * sigmas[0]
    seen = []
    kd.sample_dpmpp_2m(den, x, sigmas, tol=0, callback=seen.append)
    assert [c["i"] for c in seen] == list(range(8))
    assert set(seen[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"}
    assert rel(seen[0]["x"], x) <= 1e-12                              # the state entering step 0
    assert rel(seen[3]["denoised"], den(seen[3]["x"], sigmas[3].view(1))) <= 1e-12


def test_order_two_scan_carries_the_linearised_pair():
    """The reference scan with ``previous`` against the 2x2 recurrence written out: the
    previous step's input as the scan ran it and its model term linearised with its own J
    (u_{i+1} = P u_i + Q e_i + C u_{i-1} + D e_{i-1} + R, e_i = E_i + J_i (u_i - U_i))."""
    from deqir_fast.ops.scan import affine_scan_reference
    g = torch.Generator().manual_seed(0)
    S, shape = 6, (2, 3, 4, 5)
    r = lambda *sh: torch.randn(sh, generator=g, dtype=torch.float64)      # noqa: E731
    P, Q, C, D, J = r(S, 1, 3, 4, 5), r(S, 1, 3, 4, 5), r(S, 1, 1, 1, 1), r(S, 1, 3, 4, 5), r(S, 2, 1, 1, 1)
    E, U, R, u0, up, ep = r(S, *shape), r(S, *shape), r(S, *shape), r(*shape), r(*shape), r(*shape)
    out = affine_scan_reference(P, Q, E, R, u0, J, U, (C, D, up, ep))
    u, want = u0, []
    for i in range(S):
        e = E[i] + J[i] * (u - U[i])
        u, up, ep = P[i] * u + Q[i] * e + C[i] * up + D[i] * ep + R[i], u, e
        want.append(u)
    assert torch.allclose(out, torch.stack(want), rtol=1e-12, atol=1e-12)


# -- the chains' maths -------------------------------------------------------------------
def test_dpm_solver_order_one_is_ddim_and_heun_differs_from_midpoint():
    """solver_order=1 is DDIM (η = 0) step for step in float64; heun and midpoint are the
    same chain's first step and differ afterwards (a wrong κ would show here)."""
    sched, ts, fa = schedule_from_sigmas(get_sigmas_karras(10, 0.03, 14.6).double())
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    one = DPMSolverPP(sched, ts, solver_order=1, final_alpha=fa).coefficients(x, None)
    ddim = dq.DDIM(sched, ts, final_alpha=fa).coefficients(x, None)
    assert torch.allclose(one.P, ddim.P, rtol=1e-12, atol=1e-12)
    assert torch.allclose(one.Q, ddim.Q, rtol=1e-12, atol=1e-12)
    assert DPMSolverPP(sched, ts, solver_order=1).previous_coefficients() is None
    mid = DPMSolverPP(sched, ts, final_alpha=fa).previous_coefficients()
    heun = DPMSolverPP(sched, ts, solver_type="heun", final_alpha=fa).previous_coefficients()
    assert float(mid[0][0]) == 0 and float(heun[0][0]) == 0            # step 0: first order
    assert float(mid[0][-1]) == 0                                      # to σ = 0: first order
    assert not torch.allclose(mid[0][1:-1], heun[0][1:-1])


# -- diffusers ---------------------------------------------------------------------------
diffusers = pytest.importorskip("diffusers")
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler,  # noqa: E402
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler)
from test_dropin_diffusers import close, tiny_unet  # noqa: E402

CLASSES = {"euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler,
           "dpm": DPMSolverMultistepScheduler}
SHAPE = (2, 3, 8, 8)


@pytest.fixture(scope="module")
def unets():
    return {p: tiny_unet(p) for p in ("epsilon", "sample", "v_prediction")}


@torch.no_grad()
def diffusers_loop(unet, sched, n, seed=0, dtype=torch.float32):
    """The serial loop of diffusers' pipelines for these schedulers."""
    sched.set_timesteps(n)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=gen, dtype=dtype) * sched.init_noise_sigma
    for t in sched.timesteps:
        out = unet(sched.scale_model_input(x, t), t).sample
        x = sched.step(out, t, x, generator=gen).prev_sample
    return x


def ours(unet, sched, n, tol, seed=0, serial=False, **kw):
    chain = dq.chain_from_diffusers(sched, n)
    x_T, noise = draw_noise(chain, SHAPE, torch.Generator().manual_seed(seed))
    eps = dq.models.eps_model(unet, sched, chain=chain)
    if serial:
        return dq.sample_serial(eps, chain, x_T, noise=noise) * chain.output_scale, None
    res = dq.solve(eps, chain, x_T, noise=noise, tol=tol, **kw)
    return res.x0 * chain.output_scale, res


# A covering set: every class x step count; spacing, Karras, prediction type and the
# DPM options each appear with more than one step count and class.
E2E = [
    ("euler", 10, dict()),
    ("euler", 20, dict(use_karras_sigmas=True)),
    ("euler", 25, dict(timestep_spacing="trailing", prediction_type="v_prediction")),
    ("euler", 50, dict(timestep_spacing="leading", steps_offset=1, prediction_type="sample")),
    ("euler", 25, dict(final_sigmas_type="sigma_min", timestep_spacing="leading", steps_offset=1)),
    ("euler", 10, dict(final_sigmas_type="sigma_min")),        # a last step from σ_min to σ_min
    ("euler", 20, dict(interpolation_type="log_linear")),
    ("euler_a", 10, dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
    ("euler_a", 20, dict(timestep_spacing="trailing")),
    ("euler_a", 25, dict(prediction_type="v_prediction")),
    ("euler_a", 50, dict(timestep_spacing="leading", steps_offset=1)),
    ("dpm", 10, dict()),
    ("dpm", 20, dict(use_karras_sigmas=True)),
    ("dpm", 25, dict(solver_type="heun", prediction_type="v_prediction")),
    ("dpm", 50, dict(timestep_spacing="trailing", prediction_type="sample")),
    ("dpm", 20, dict(final_sigmas_type="sigma_min", lower_order_final=False)),
    ("dpm", 10, dict(final_sigmas_type="sigma_min", euler_at_final=True, use_karras_sigmas=True)),
    ("dpm", 25, dict(solver_order=1, timestep_spacing="leading")),
    ("dpm", 10, dict(final_sigmas_type="sigma_min", timestep_spacing="trailing")),   # S < 15
]


@pytest.mark.parametrize("name,n,cfg", E2E, ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(E2E)])
def test_serial_and_parallel_equal_the_diffusers_loop(unets, name, n, cfg):
    unet = unets[cfg.get("prediction_type", "epsilon")]
    cls = CLASSES[name]
    ref = diffusers_loop(unet, cls(**cfg), n)
    serial, _ = ours(unet, cls(**cfg), n, 0.0, serial=True)
    assert close(serial, ref, 1e-5)
    exact, res = ours(unet, cls(**cfg), n, 0.0)
    assert close(exact, ref, 1e-5) and res.converged
    fast, res = ours(unet, cls(**cfg), n, dq.api.DEFAULT_TOL)
    assert res.converged and float((fast - ref).abs().max()) < GREY
    assert res.iterations <= n


@torch.no_grad()
def diffusers_step_float64(sched, i, x, out, prev_x0, z):
    """diffusers' step i of ``sched`` (after set_timesteps) transcribed in float64 from
    scheduling_euler_discrete / _euler_ancestral_discrete / _dpmsolver_multistep (0.42):
    returns (x', the x0 it used)."""
    sig = sched.sigmas.double()
    sigma, sigma_next = sig[i], sig[i + 1]
    cfg = sched.config
    if not isinstance(sched, DPMSolverMultistepScheduler):
        x0 = {"epsilon": lambda: x - sigma * out,
              "v_prediction": lambda: out * (-sigma / (sigma ** 2 + 1) ** 0.5) + x / (sigma ** 2 + 1),
              "sample": lambda: out}[cfg.prediction_type]()
        if isinstance(sched, EulerAncestralDiscreteScheduler):
            up = (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5
            down = (sigma_next ** 2 - up ** 2) ** 0.5
            return x + (x - x0) / sigma * (down - sigma) + z * up, x0
        return x + (x - x0) / sigma * (sigma_next - sigma), x0
    alpha_sigma = (lambda s: (1 / (s ** 2 + 1) ** 0.5, s / (s ** 2 + 1) ** 0.5))
    a_s, s_s = alpha_sigma(sigma)
    x0 = {"epsilon": lambda: (x - s_s * out) / a_s, "sample": lambda: out,
          "v_prediction": lambda: a_s * x - s_s * out}[cfg.prediction_type]()
    a_t, s_t = alpha_sigma(sigma_next)
    lam = lambda a, s: torch.log(a) - torch.log(s)            # noqa: E731
    h = lam(a_t, s_t) - lam(a_s, s_s)
    S = len(sched.timesteps)
    low_final = i == S - 1 and (cfg.euler_at_final or (cfg.lower_order_final and S < 15)
                                or cfg.final_sigmas_type == "zero")
    if cfg.solver_order == 1 or prev_x0 is None or low_final:
        return (s_t / s_s) * x - (a_t * (torch.exp(-h) - 1.0)) * x0, x0
    a_p, s_p = alpha_sigma(sig[i - 1])
    r0 = (lam(a_s, s_s) - lam(a_p, s_p)) / h
    D0, D1 = x0, (1.0 / r0) * (x0 - prev_x0)
    if cfg.solver_type == "midpoint":
        return ((s_t / s_s) * x - (a_t * (torch.exp(-h) - 1.0)) * D0
                - 0.5 * (a_t * (torch.exp(-h) - 1.0)) * D1), x0
    return ((s_t / s_s) * x - (a_t * (torch.exp(-h) - 1.0)) * D0
            + (a_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1), x0


F64 = [("euler", 20, dict(use_karras_sigmas=True, prediction_type="v_prediction")),
       ("euler", 25, dict(timestep_spacing="trailing", final_sigmas_type="sigma_min")),
       ("euler_a", 25, dict(prediction_type="v_prediction")),
       ("euler_a", 10, dict(timestep_spacing="linspace")),
       ("dpm", 10, dict()),
       ("dpm", 20, dict(use_karras_sigmas=True, solver_type="heun")),
       ("dpm", 25, dict(final_sigmas_type="sigma_min", prediction_type="v_prediction")),
       ("dpm", 50, dict(final_sigmas_type="sigma_min", prediction_type="sample",
                        lower_order_final=False))]


@pytest.mark.parametrize("name,n,cfg", F64, ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(F64)])
def test_chain_equals_diffusers_step_in_float64(unets, name, n, cfg):
    """Our serial sampler in float64 (a float64 copy of the tiny UNet) against diffusers'
    step transcribed in float64, the same draws: <= 1e-12 relative."""
    pt = cfg.get("prediction_type", "epsilon")
    unet = copy.deepcopy(unets[pt]).double()
    sched = CLASSES[name](**cfg)
    chain = dq.chain_from_diffusers(sched, n)
    x_T, noise = draw_noise(chain, SHAPE, torch.Generator().manual_seed(0), dtype=torch.float64)
    eps = dq.models.eps_model(unet, sched, chain=chain)
    out = dq.sample_serial(eps, chain, x_T, noise=noise) * chain.output_scale
    sched.set_timesteps(n)
    x, prev = x_T * sched.init_noise_sigma, None
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            scale = 1.0 if name == "dpm" else (sched.sigmas[i].double() ** 2 + 1) ** 0.5
            model_out = unet(x / scale, t).sample
            x, prev = diffusers_step_float64(sched, i, x, model_out, prev, noise[i])
    assert rel(out, x) <= 1e-12
    par = dq.solve(eps, chain, x_T, noise=noise, tol=0)
    assert rel(par.x0 * chain.output_scale, x) <= 1e-12


def test_dpm_drop_in_ddpm_pipeline_equals_the_serial_pipeline(unets):
    from diffusers import DDPMPipeline
    unet = unets["epsilon"]
    sched = DPMSolverMultistepScheduler()
    serial = DDPMPipeline(unet=unet, scheduler=sched)(
        batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=20,
        output_type="pt").images
    pipe = dq.ParallelDDPMPipeline(unet=unet, scheduler=DPMSolverMultistepScheduler())
    out = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=20,
               output_type="pt", tol=0)
    assert close(out.images, serial, 1e-5) and out.converged and out.rounds <= 20
    with pytest.raises(ValueError, match="scale_model_input"):
        dq.ParallelDDPMPipeline(unet=unet, scheduler=EulerDiscreteScheduler())(num_inference_steps=5)


def test_config_dict_and_scheduler_state_untouched(unets):
    sched = DPMSolverMultistepScheduler(use_karras_sigmas=True)
    sched.set_timesteps(7)
    before = sched.timesteps.clone()
    a = dq.chain_from_diffusers(sched, 20)
    assert torch.equal(sched.timesteps, before)          # exact: the same tensor, untouched
    b = dq.chain_from_diffusers({**sched.config, "_class_name": "DPMSolverMultistepScheduler"}, 20)
    assert torch.allclose(a.alpha, b.alpha, rtol=0, atol=0)   # the same float32 sigmas
    assert torch.equal(a.model_timesteps, b.model_timesteps)


# -- the order-2 chain through the solver's machinery ------------------------------------
def dpm_problem(n=25, dtype=torch.float32):
    den = Denoiser().to(dtype)
    sigmas = get_sigmas_karras(n, 0.03, 14.6).to(dtype)
    sched, ts, final_alpha = schedule_from_sigmas(sigmas)
    chain = DPMSolverPP(sched, ts, final_alpha=final_alpha)
    assert chain.order == 2
    model = kd.DenoiserAsEps(den, sigmas, (3, 8, 8), 2)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5), dtype=dtype)
    return model, chain, x_T


@pytest.mark.parametrize("window", [1, 2, 3, 7, None, "auto"])
@pytest.mark.parametrize("solver", ["picard", "anderson", "triangular_anderson"])
def test_order_two_windows_and_rules_reach_serial(window, solver):
    """A window from lo > 0 needs the state entering step lo - 1 (one more row of its model
    call): every window size and rule reaches the serial result exactly at tol = 0 and
    within a grey level at the default tol."""
    model, chain, x_T = dpm_problem(dtype=torch.float64)
    ref = dq.sample_serial(model, chain, x_T)
    exact = dq.solve(model, chain, x_T, tol=0, window=window, solver=solver)
    assert rel(exact.x0, ref) <= 1e-12 and exact.converged
    model, chain, x_T = dpm_problem()
    ref = dq.sample_serial(model, chain, x_T)
    res = dq.solve(model, chain, x_T, window=window, solver=solver)
    assert res.converged and float((res.x0 - ref).abs().max()) < GREY


def test_order_two_shadow_leaves_the_states_the_window_reads(monkeypatch):
    """The shadow returns its serial state only for a step the window no longer reads: an
    order-2 window from lo reads lo - 1 (the carry) and lo - 2 (its first step's previous
    input). Window 2 puts the front two steps ahead of the shadow, where it matters."""
    from deqir_fast.solvers.engines import EagerEngine
    seen, real = [], EagerEngine.take_serial

    def spy(self, loop, p, q=None):
        seen.append((p, loop.lo))
        return real(self, loop, p, q)
    monkeypatch.setattr(EagerEngine, "take_serial", spy)
    model, chain, x_T = dpm_problem()
    assert dq.solve(model, chain, x_T, window=2).converged
    assert seen and all(p < lo - 2 for p, lo in seen), seen


@pytest.mark.parametrize("window,init", [(None, "jump"), (4, "jump"), (1, "x_T")])
def test_order_two_nfe_counts_every_row_the_model_evaluates(window, init):
    """nfe is the rows the model was called on: a window from lo > 0 adds the state
    entering step lo - 1, and the shadow its own."""
    model, chain, x_T = dpm_problem()
    rows = []

    def counted(x, t):
        rows.append(x.shape[0] // x_T.shape[0])
        return model(x, t)
    res = dq.solve(counted, chain, x_T, window=window, init=init)
    assert res.converged and res.nfe == sum(rows), (res.nfe, sum(rows))


@pytest.mark.parametrize("linearize", ["secant", "gaussian", "paradigms", "none"])
@pytest.mark.parametrize("init", ["jump", "x_T"])
def test_order_two_linearisations_and_inits(linearize, init):
    model, chain, x_T = dpm_problem()
    ref = dq.sample_serial(model, chain, x_T)
    res = dq.solve(model, chain, x_T, linearize=linearize, init=init, window=6)
    assert res.converged and float((res.x0 - ref).abs().max()) < GREY


def perturb_before_restart(monkeypatch, engine: str):
    """Before a restart puts the shadow's states in, move the state before the bad one by
    1e-7 (a frozen state that passed the shadow's check at tol but is not exact): the
    restart must replace it with the shadow's previous state, which an order-2 window
    reads beside the carry."""
    import deqir_fast.solvers.engines as engines
    cls = getattr(engines, engine)
    put = cls.put_serial

    seen = []

    def put_serial(self, loop, p, q=None):
        seen.append((p, q))
        if p > 0:
            loop.X[p - 1] += 1e-7
        return put(self, loop, p, q)
    monkeypatch.setattr(cls, "put_serial", put_serial)
    return seen


def test_order_two_shadow_restart_and_serial_switch_are_exact(monkeypatch):
    """A freeze rule that freezes states off serial (two steps a round, whatever the
    residuals: a planted fault): the shadow finds them and the restart carries its two
    states (the previous one too), so the result is the serial one; a planner that goes
    serial mid-solve continues from the shadow's pair."""
    import deqir_fast.solvers.loop as L
    model, chain, x_T = dpm_problem(dtype=torch.float64)
    ref = dq.sample_serial(model, chain, x_T)
    real, calls = L.steps_to_freeze, []

    def early(r, tol, ratio, last=True):                  # the first three rounds only
        calls.append(1)
        return max(real(r, tol, ratio, last), min(2, r.numel()) if len(calls) <= 3 else 0)
    monkeypatch.setattr(L, "steps_to_freeze", early)
    perturb_before_restart(monkeypatch, "EagerEngine")
    res = dq.solve(model, chain, x_T, tol=1e-6, window=5, linearize="none")
    monkeypatch.setattr(L, "steps_to_freeze", real)
    assert res.stats.serial_mismatch is not None          # the restart path ran
    assert res.converged and rel(res.x0, ref) <= 1e-10

    # the planner's switch to the serial sampler mid-solve (its 4th choice; windows of 4 or
    # more before): the serial sampler continues from the shadow's state and the one before
    import deqir_fast.solvers.engines as engines
    import deqir_fast.solvers.planner as PL
    choose, carries = PL.Planner.choose, []

    def switch(self, *a, **k):
        carries.append(None)
        w = choose(self, *a, **k)
        return PL.SERIAL if len(carries) == 4 else max(w, 4)
    take = engines._LocalEngine.take_serial_carry

    def spy(self, loop, p):
        carries.append(p)
        return take(self, loop, p)
    monkeypatch.setattr(PL.Planner, "choose", switch)
    monkeypatch.setattr(engines._LocalEngine, "take_serial_carry", spy)
    res = dq.solve(model, chain, x_T, window="auto", tol=1e-3, linearize="none")
    assert res.stats.plan.serial_from is not None and res.converged
    assert any(p is not None and p > 0 for p in carries), carries
    assert rel(res.x0, ref) <= 1e-10


@pytest.mark.parametrize("check_every", [3, 5])
def test_order_two_with_batched_read_backs(check_every, monkeypatch):
    """check_every > 1: rounds between host reads, the shadow's states kept per round;
    exact at tol = 0, within a grey level at the default, and a restart (planted early
    freezes, as above) that puts in the shadow's states with the one before them."""
    model, chain, x_T = dpm_problem(dtype=torch.float64)
    ref = dq.sample_serial(model, chain, x_T)
    opts = dq.SolveOptions(check_every=check_every)
    exact = dq.solve(model, chain, x_T, tol=0, window=6, options=opts)
    assert exact.converged and rel(exact.x0, ref) <= 1e-12
    res = dq.solve(model, chain, x_T, window=6, options=opts)
    assert res.converged and rel(res.x0, ref) < GREY
    if check_every != 3:
        return          # (with 5 the batch's rounds make the planted freezes exact again)
    import deqir_fast.solvers.engines as engines
    real, calls = engines.freeze_count, []

    def late(r, frozen, *levels):                         # rounds 4-6: the second batch
        calls.append(1)
        n = real(r, frozen, *levels)
        return torch.maximum(n, torch.clamp(frozen + 2, max=r.numel())) if 4 <= len(calls) <= 6 else n
    monkeypatch.setattr("deqir_fast.solvers.engines.freeze_count", late)
    seen = perturb_before_restart(monkeypatch, "ReadbackEngine")
    # tol 1e-6: the state before the bad one passed the shadow's check, but only to 1e-6;
    # the restart must take the shadow's exact one for the result to be exact. The bad
    # step is the batch's third shadow state (q = 2): the one before it is the shadow's
    # state of the batch's second round, not of the round before the batch
    res = dq.solve(model, chain, x_T, tol=1e-6, window=6, linearize="none", options=opts)
    assert res.stats.serial_mismatch is not None and res.converged
    assert any(q is not None and q > 0 for _, q in seen), seen
    serial = dq.sample_serial(model, chain, x_T, return_states=True)
    assert rel(res.states, serial) <= 1e-10


def test_order_two_refusals():
    model, chain, x_T = dpm_problem()
    with pytest.raises(ValueError, match="cuda_graph=False"):
        dq.solve(model, chain, x_T, options=dq.SolveOptions(check_every=2, cuda_graph=True))


class Tilted(torch.nn.Module):
    """``Denoiser`` with a learnable output scale, as an eps model on the VP state."""

    def __init__(self, sigmas):
        super().__init__()
        self.inner = kd.DenoiserAsEps(Denoiser().double(), sigmas, (3, 8, 8), 2)
        self.scale = torch.nn.Parameter(torch.tensor(1.1, dtype=torch.float64))

    def forward(self, x, t):
        return self.scale * self.inner(x, t)


@pytest.mark.parametrize("window", [None, 1, 4])
@pytest.mark.parametrize("solver_type,to_zero", [("midpoint", True), ("heun", False)])
def test_order_two_implicit_gradients_equal_autograd_through_serial(window, solver_type, to_zero):
    """The order-2 adjoint (docs/design.md §2.8: λ_j also takes C_{j+1} λ_{j+2} and
    D_{j+1} λ_{j+2} through the VJP) against plain autograd through the serial sampler,
    float64: dL/dx_T and dL/dθ, through res.x0.backward() and dq.backward. Sigmas that
    stop above 0 make the last step second order too (its C, D reach λ_{S-1} from the
    adjoint's carry)."""
    sigmas = get_sigmas_karras(20, 0.03, 14.6).double()
    sigmas = sigmas if to_zero else sigmas[:-1]
    sched, ts, final_alpha = schedule_from_sigmas(sigmas)
    chain = DPMSolverPP(sched, ts, solver_type=solver_type, final_alpha=final_alpha)
    model = Tilted(sigmas)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    w = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x_ref = x_T.clone().requires_grad_(True)
    (dq.sample_serial(model, chain, x_ref) * w).sum().backward()
    g_x, g_theta = x_ref.grad.clone(), model.scale.grad.clone()
    model.scale.grad = None
    x = x_T.clone().requires_grad_(True)
    res = dq.solve(model, chain, x, tol=1e-10, window=window,
                   options=dq.SolveOptions(grad_tol=1e-10))
    (res.x0 * w).sum().backward()
    assert rel(x.grad, g_x) <= 1e-7
    assert abs(float(model.scale.grad - g_theta)) <= 1e-7 * max(1.0, abs(float(g_theta)))
    out = dq.backward(res, w, tol=1e-10)
    assert rel(out["x_T"], g_x) <= 1e-7
    # the order-2 terms matter here: dropping them (first order everywhere) is far off
    first = DPMSolverPP(sched, ts, solver_order=1, final_alpha=final_alpha)
    x1 = x_T.clone().requires_grad_(True)
    (dq.sample_serial(model, first, x1) * w).sum().backward()
    assert rel(x1.grad, g_x) > 1e-4


def test_refused_scheduler_settings():
    bad = [
        (DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), "algorithm_type"),
        (DPMSolverMultistepScheduler(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
         "algorithm_type"),
        (DPMSolverMultistepScheduler(solver_order=3), "solver_order"),
        (DPMSolverMultistepScheduler(thresholding=True), "thresholding"),
        (DPMSolverMultistepScheduler(variance_type="learned_range"), "variance_type"),
        (DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction"),
         "prediction_type"),
        (EulerAncestralDiscreteScheduler(prediction_type="sample"), "prediction_type"),
    ]
    for sched, what in bad:
        with pytest.raises(ValueError, match=what):
            dq.chain_from_diffusers(sched, 10)
    with pytest.raises(ValueError, match="no eta"):
        dq.chain_from_diffusers(EulerAncestralDiscreteScheduler(), 10, eta=0.5)
    with pytest.raises(ValueError, match="num_inference_steps"):
        dq.chain_from_diffusers(EulerDiscreteScheduler())
    with pytest.raises(ValueError, match="chain="):
        dq.models.eps_model(torch.nn.Identity(), EulerDiscreteScheduler())
    # a model that does not map the chain's step indices to the scheduler's timesteps
    # would run the network at t = 0..S-1 and return garbage, converged: refused
    chain = dq.chain_from_diffusers(DPMSolverMultistepScheduler(), 6)
    with pytest.raises(ValueError, match="model must run the network at the scheduler's"):
        dq.solve(lambda x, t: x, chain, torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="model_timesteps"):
        dq.sample_serial(dq.models.EpsModel(torch.nn.Identity()), chain, torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="chain="):
        dq.models.eps_model(torch.nn.Identity(), DDIMScheduler(clip_sample=False),
                            chain=dq.chain_from_diffusers(EulerDiscreteScheduler(), 5))

    class Stepped(EulerDiscreteScheduler):
        def step(self, *a, **k):
            return super().step(*a, **k)
    with pytest.raises(TypeError, match="overrides step"):
        dq.chain_from_diffusers(Stepped(), 10)
    den = Denoiser()
    x = torch.randn(1, 3, 8, 8)
    sig = get_sigmas_karras(5, 0.03, 14.6)
    with pytest.raises(ValueError, match="eta"):
        kd.sample_euler_ancestral(den, x, sig, eta=-1.0)
    with pytest.raises(TypeError, match="noise_sampler"):
        kd.sample_euler_ancestral(den, x, sig, noise_sampler=3)
    with pytest.raises(ValueError, match="noise_sampler's draw"):
        kd.sample_euler_ancestral(den, x, sig, noise_sampler=lambda s, sn: torch.randn(2, 3))
    with pytest.raises(ValueError, match="first_order"):
        DPMSolverPP(*schedule_from_sigmas(sig)[:2], first_order=[True])
    with pytest.raises(TypeError, match="first_order"):
        DPMSolverPP(*schedule_from_sigmas(sig)[:2], first_order="ab")
    with pytest.raises(TypeError, match="first_order"):
        DPMSolverPP(*schedule_from_sigmas(sig)[:2], first_order=[0.5] * 5)
    with pytest.raises(TypeError, match="sigmas"):
        schedule_from_sigmas("abc")
    with pytest.raises(ValueError, match="descending"):
        schedule_from_sigmas([1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="solver_type"):
        DPMSolverPP(*schedule_from_sigmas(sig)[:2], solver_type="rk4")
    assert isinstance(kd.chain_from_sigmas(sig), Euler)
    assert isinstance(dq.chain_from_diffusers(EulerAncestralDiscreteScheduler(), 5), EulerAncestral)
