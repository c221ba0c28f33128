"""Drop-in parity with diffusers' serial samplers (issue #11).

Three layers, from cheap and exhaustive to end to end:

1. Step level (no network): for every combination of timestep_spacing x steps_offset x
   set_alpha_to_one x eta (DDIM) or variance_type (DDPM), S in {1, 7, 10, 30, 50, 100,
   333} (7, 30, 333 do not divide 1000) and every prediction_type, each step of our
   chain equals ``scheduler.step`` on random (x, model output, noise) in float64, to
   ~1e-12: this pins the timesteps, the landing ᾱ of each step and every coefficient.
   Beta schedules (linear, scaled_linear, squaredcos_cap_v2, trained_betas) are a
   separate, smaller product: they only change ᾱ, which the matrix above already
   reads through the same code path.
2. End to end (tiny UNet2DModel, float32): our serial AND parallel (tol=0, exact)
   results equal the diffusers serial loop (the pipelines' loop, same generator) to
   1e-5. The full product would be ~300 runs of up to S^2/2 UNet evaluations, so the
   cases below are a pruned covering set: every spacing, offset, set_alpha_to_one,
   eta, prediction_type and S (10, 30, 50, 100; 30 does not divide 1000) appears, and
   so does every pair that interacts (spacing x S, where trailing/linspace land off the
   next timestep when S does not divide 1000; set_alpha_to_one x spacing, which decides
   the last step; eta x prediction_type, the noise against the eps conversion).
   Parameters that act independently (offset only moves leading timesteps) are not
   crossed with the rest. The UNet has a Gaussian-prior term added to its random
   output so the chain is well conditioned, as a trained model's is: with a purely
   random eps-UNet the images reach |x| ~ 700 and float32 rounding alone differs by
   1e-5 *relative* between two correct implementations.
3. Clear errors for every configuration that is not affine (clip_sample,
   thresholding, learned variances, zero-SNR rescaling where a step runs at ᾱ = 0,
   other schedulers, subclasses that override the step).
4. Drop-in edges (issue #22): float64 parity with diffusers' loop for v / sample on a
   cosine schedule (tiny ᾱ), zero-SNR rescaling on "leading" spacing, the beta
   schedules each class accepts, the overshooting "trailing" step counts.

Exactness: assertions are exact (``torch.equal``, ``==``) only where both sides come
from the same integer arithmetic, the same copy of a tensor, or the same torch op on
the same input in the same process (same kernel); each says why. Everything that
compares two different computations uses a tolerance for its precision, so the file
passes on any CPU and with ``ATEN_CPU_CAPABILITY=default``.

The pipelines are tested against diffusers' DDIMPipeline / DDPMPipeline at the end.
"""
import itertools
import json

import numpy as np
import pytest
import torch

import deqir_fast as dq
from deqir_fast.diffusers_compat import draw_noise, to_eps
from deqir_fast.models import eps_model

diffusers = pytest.importorskip("diffusers")
from diffusers import (DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler,  # noqa: E402
                       ImagePipelineOutput, PNDMScheduler, UNet2DModel)
from diffusers.models.unets.unet_2d import UNet2DOutput  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

TOL = 1e-5            # end to end, float32, relative to the images' scale (max(1, max|x|))
PREDICTIONS = ("epsilon", "sample", "v_prediction")


def close(a, b, rel):
    """max|a - b| <= rel * max(1, max|b|): the error of a float computation scales with its
    values, and images of scale below 1 are held to the absolute bound."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return float((a - b).abs().max()) <= rel * max(1.0, float(b.abs().max()))


class TinyDenoiser(UNet2DModel):
    """A tiny random UNet2DModel whose output is the exact Gaussian-prior prediction
    (prior variance 0.5, linear betas) of its ``prediction_type`` plus 0.1 x the UNet:
    nonlinear and time dependent, but well conditioned like a trained model."""

    def setup(self, prediction_type: str):
        a = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
        self.register_buffer("prior_alphas", a.float(), persistent=False)
        self.prediction_type = prediction_type
        return self

    def forward(self, sample, timestep, return_dict=True, **kwargs):
        out = super().forward(sample, timestep).sample
        t = torch.as_tensor(timestep, device=sample.device).long().reshape(-1)
        a = self.prior_alphas[t].view(-1, 1, 1, 1).to(sample.dtype)
        den = 0.5 * a + 1 - a
        eps, x0 = (1 - a).sqrt() * sample / den, 0.5 * a.sqrt() * sample / den
        pred = {"epsilon": eps, "sample": x0,
                "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}[self.prediction_type]
        res = pred + 0.1 * out
        return UNet2DOutput(sample=res) if return_dict else (res,)


def tiny_unet(prediction_type="epsilon", cls=TinyDenoiser):
    torch.manual_seed(0)
    net = cls(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
              block_out_channels=(8,), norm_num_groups=4, down_block_types=("DownBlock2D",),
              up_block_types=("UpBlock2D",)).eval()
    return net.setup(prediction_type) if cls is TinyDenoiser else net


@pytest.fixture(scope="module")
def unets():
    return {p: tiny_unet(p) for p in PREDICTIONS}


def make_scheduler(kind, **cfg):
    cls = DDIMScheduler if kind == "ddim" else DDPMScheduler
    return cls(clip_sample=False, **cfg)


# -- 1. step level ------------------------------------------------------------------------
STEPS = (1, 7, 10, 30, 50, 100, 333)
# The eps conversion does not depend on the spacing: check "sample" / "v_prediction" on
# two step counts per configuration, epsilon on all.
PREDICTION_STEPS = {"epsilon": STEPS, "sample": (7, 100), "v_prediction": (7, 100)}


def _checked_steps(S):
    """Every step for S <= 50; else the first and last four and three in between (the
    landing rule is the same formula at every step; the ends are where it changes)."""
    if S <= 50:
        return list(range(S))
    return sorted({0, 1, 2, 3, S // 3, S // 2, 2 * S // 3, S - 4, S - 3, S - 2, S - 1})


def _check_steps(sched, chain, S, eta, seed=0):
    """Steps of ``chain`` against ``sched.step`` in float64 (random x, output, noise).
    Returns the worst error relative to the size of the terms the step sums."""
    sched.set_timesteps(S)
    # exact: both are numpy's integer timesteps from the same formula
    assert torch.equal(chain.timesteps, sched.timesteps.long()), "timesteps differ"
    S = chain.num_steps
    g = torch.Generator().manual_seed(seed)
    shape = (2, 3, 4, 4)
    x = torch.randn((S, *shape), generator=g, dtype=torch.float64)
    out = torch.randn((S, *shape), generator=g, dtype=torch.float64)
    # DDPMScheduler draws its own noise: give each step a generator and draw the same
    z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(1000 + i),
                                 dtype=torch.float64) for i in range(S)])
    coeffs = chain.coefficients(x[0], z)
    pt = sched.config.prediction_type
    worst = 0.0
    for i in _checked_steps(S):
        t = sched.timesteps[i]
        if isinstance(sched, DDIMScheduler):
            ref = sched.step(out[i], t, x[i], eta=eta, variance_noise=z[i] if eta > 0 else None).prev_sample
        else:
            ref = sched.step(out[i], t, x[i], generator=torch.Generator().manual_seed(1000 + i)).prev_sample
        e = to_eps(out[i], x[i], torch.full((2,), int(t)), chain.schedule, pt)
        terms = [coeffs.P[i] * x[i], coeffs.Q[i] * e] + ([] if coeffs.R is None else [coeffs.R[i]])
        size = sum(float(v.abs().max()) for v in terms)
        worst = max(worst, float((sum(terms) - ref).abs().max()) / size)
    return worst


# Every prediction type: diffusers' step to float64 rounding. For sample / v the chain's
# coefficients are diffusers' step on (x, output) composed with our eps conversion
# (diffusers_compat._eps_form); before issue #22 they were ~3e-8 apart here, ~1e-6 on a
# cosine schedule.
BOUND = {"epsilon": 1e-12, "sample": 1e-12, "v_prediction": 1e-12}


@pytest.mark.parametrize("spacing,offset,alpha_to_one,eta", [
    c for c in itertools.product(("leading", "trailing", "linspace"), (0, 1), (True, False), (0.0, 0.5))])
def test_ddim_steps_match_scheduler_step(spacing, offset, alpha_to_one, eta):
    for pt, steps in PREDICTION_STEPS.items():
        for S in steps:
            sched = make_scheduler("ddim", timestep_spacing=spacing, steps_offset=offset,
                                   set_alpha_to_one=alpha_to_one, prediction_type=pt)
            chain = dq.chain_from_diffusers(sched, S, eta=eta)
            assert isinstance(chain, dq.DDIM) and chain.prediction_type == pt
            assert _check_steps(sched, chain, S, eta) < BOUND[pt], (S, pt)


@pytest.mark.parametrize("spacing,offset,variance", [
    c for c in itertools.product(("leading", "trailing", "linspace"), (0, 1),
                                 ("fixed_small", "fixed_small_log", "fixed_large"))])
def test_ddpm_steps_match_scheduler_step(spacing, offset, variance):
    for pt, steps in PREDICTION_STEPS.items():
        for S in steps:
            sched = make_scheduler("ddpm", timestep_spacing=spacing, steps_offset=offset,
                                   variance_type=variance, prediction_type=pt)
            chain = dq.chain_from_diffusers(sched, S)
            assert isinstance(chain, dq.DDPM)
            assert torch.equal(chain.noise_draws, chain.timesteps > 0)     # booleans: exact
            assert _check_steps(sched, chain, S, 1.0) < BOUND[pt], (S, pt)


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
@pytest.mark.parametrize("betas", ["scaled_linear", "squaredcos_cap_v2", "trained"])
def test_beta_schedules(kind, betas):
    cfg = ({"trained_betas": np.linspace(2e-4, 0.03, 500).tolist(), "num_train_timesteps": 500}
           if betas == "trained" else {"beta_schedule": betas, "beta_start": 0.00085, "beta_end": 0.012})
    sched = make_scheduler(kind, timestep_spacing="trailing", **cfg)
    sched_cfg = dict(sched.config)
    # the schedule from the object and from its config alone are diffusers' ᾱ exactly: the
    # object's is a copy of its tensor, the config's is computed by the same torch ops on
    # the same inputs in this process (same kernels), so bit equality holds on any CPU
    for source in (sched, sched_cfg):
        s = dq.schedule_from_diffusers(source)
        assert torch.equal(s.alphas_cumprod.float(), sched.alphas_cumprod)
    for S in (10, 33):
        chain = dq.chain_from_diffusers(sched, S, eta=0.5 if kind == "ddim" else None)
        assert _check_steps(sched, chain, S, 0.5) < 1e-12


def test_ddpm_chain_is_ddim_eta_one_in_float64(schedule):
    """The general DDPM chain (float64 scalars): fixed_small is DDIM with eta = 1."""
    ts = dq.timesteps(schedule, 25)
    x, z = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(25, 2, 3, 4, 4, dtype=torch.float64)
    a = dq.DDPM(schedule, ts).coefficients(x, z)
    b = dq.DDIM(schedule, ts, eta=1.0).coefficients(x, z)
    assert torch.allclose(a.P, b.P, rtol=0, atol=1e-12) and torch.allclose(a.Q, b.Q, rtol=0, atol=1e-12)
    # the last step (t = 0) draws no noise, as in diffusers; DDIM's σ is 0 there anyway
    assert torch.allclose(a.R, b.R, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="variance"):
        dq.DDPM(schedule, ts, variance="learned")


def test_draw_noise_matches_randn_tensor():
    from deqir_fast.diffusers_compat import _randn
    for gen in (lambda: torch.Generator().manual_seed(4),
                lambda: [torch.Generator().manual_seed(s) for s in (4, 5, 6)]):
        ours = _randn((3, 3, 8, 8), gen(), torch.device("cpu"), torch.float32)
        # exact: the same torch.randn calls (shapes, generators, order) as randn_tensor's
        assert torch.equal(ours, randn_tensor((3, 3, 8, 8), generator=gen(), dtype=torch.float32))


def test_num_inference_steps_from_the_scheduler():
    sched = make_scheduler("ddim", timestep_spacing="trailing")
    sched.set_timesteps(30)
    chain = dq.chain_from_diffusers(sched)
    assert torch.equal(chain.timesteps, sched.timesteps)               # integers: exact
    # ᾱ of each landing: t - T//S, not the next listed timestep (S=30 does not divide T);
    # exact: alpha_next holds copies of the scheduler's own float32 values
    assert torch.equal(chain.alpha_next[:-1], sched.alphas_cumprod[sched.timesteps[:-1] - 33].double())
    assert not torch.equal(chain.alpha_next[:-1], chain.alpha[1:])


# -- 2. end to end, float32 ------------------------------------------------------------------
def diffusers_loop(unet, sched, S, eta, generator, shape):
    """The serial loop of diffusers' DDIMPipeline / DDPMPipeline, without post-processing."""
    image = randn_tensor(shape, generator=generator, dtype=unet.dtype)
    sched.set_timesteps(S)
    with torch.no_grad():
        for t in sched.timesteps:
            out = unet(image, t).sample
            if isinstance(sched, DDIMScheduler):
                image = sched.step(out, t, image, eta=eta, generator=generator).prev_sample
            else:
                image = sched.step(out, t, image, generator=generator).prev_sample
    return image


# (kind, spacing, steps_offset, set_alpha_to_one / variance_type, eta, prediction_type, S)
END_TO_END = [
    ("ddim", "leading", 0, True, 0.0, "epsilon", 10),
    ("ddim", "leading", 1, False, 0.5, "v_prediction", 50),
    ("ddim", "leading", 1, True, 0.5, "sample", 30),
    ("ddim", "trailing", 0, False, 0.0, "sample", 30),
    ("ddim", "trailing", 1, True, 0.5, "epsilon", 100),
    ("ddim", "trailing", 0, True, 0.0, "v_prediction", 10),
    ("ddim", "linspace", 0, True, 0.5, "v_prediction", 30),
    ("ddim", "linspace", 1, False, 0.0, "epsilon", 50),
    ("ddim", "linspace", 0, False, 0.5, "sample", 10),
    ("ddpm", "leading", 1, "fixed_small", None, "epsilon", 30),
    ("ddpm", "trailing", 0, "fixed_large", None, "v_prediction", 30),
    ("ddpm", "linspace", 0, "fixed_small_log", None, "sample", 10),
    ("ddpm", "leading", 0, "fixed_large", None, "sample", 100),
]


@pytest.mark.parametrize("kind,spacing,offset,last,eta,pt,S", END_TO_END,
                         ids=["-".join(map(str, c)) for c in END_TO_END])
def test_serial_and_parallel_equal_the_diffusers_loop(unets, kind, spacing, offset, last, eta, pt, S):
    extra = {"set_alpha_to_one": last} if kind == "ddim" else {"variance_type": last}
    sched = make_scheduler(kind, timestep_spacing=spacing, steps_offset=offset, prediction_type=pt,
                           **extra)
    unet = unets[pt]
    shape = (1, 3, 8, 8)
    ref = diffusers_loop(unet, sched, S, eta, torch.Generator().manual_seed(S), shape)
    chain = dq.chain_from_diffusers(sched, S, eta=eta)
    x_T, noise = draw_noise(chain, shape, torch.Generator().manual_seed(S))
    model = eps_model(unet, sched)
    with torch.no_grad():
        serial = dq.sample_serial(model, chain, x_T, noise=noise)
        res = dq.solve(model, chain, x_T, noise=noise, tol=0, max_iter=S)
    assert close(serial, ref, TOL)
    assert close(res.x0, ref, TOL)
    assert res.iterations <= S                  # a bound: max_iter=S


# -- 3. clear errors ---------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler])
def test_clip_sample_default_is_a_clear_error(cls):
    with pytest.raises(ValueError, match=r"clip_sample=True.*BY DEFAULT.*clip_sample=False"):
        dq.chain_from_diffusers(cls(), 10)


@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler])
def test_thresholding_is_a_clear_error(cls):
    with pytest.raises(ValueError, match=r"thresholding=True.*thresholding=False"):
        dq.chain_from_diffusers(cls(clip_sample=False, thresholding=True), 10)


@pytest.mark.parametrize("variance", ["learned", "learned_range", "fixed_large_log"])
def test_non_affine_ddpm_variances_are_clear_errors(variance):
    with pytest.raises(ValueError, match=rf"variance_type='{variance}'.*fixed_small"):
        dq.chain_from_diffusers(DDPMScheduler(clip_sample=False, variance_type=variance), 10)


def test_other_unsupported_settings_are_clear_errors():
    # (Euler, Euler-ancestral and DPM-Solver++ have chains since issue #25: test_samplers.py)
    with pytest.raises(ValueError, match=r"unsupported scheduler.*DDIMScheduler\.from_config"):
        dq.chain_from_diffusers(PNDMScheduler(), 10)
    with pytest.raises(ValueError, match="DDPMScheduler has no eta"):
        dq.chain_from_diffusers(DDPMScheduler(clip_sample=False), 10, eta=0.5)
    with pytest.raises(ValueError, match="eta"):
        dq.chain_from_diffusers(DDIMScheduler(clip_sample=False), 10, eta=1.5)
    with pytest.raises(ValueError, match="cannot be larger"):
        dq.chain_from_diffusers(DDIMScheduler(clip_sample=False), 1001)
    # leading, offset 1, 1000 steps: t = 1000; diffusers' step raises IndexError there
    with pytest.raises(ValueError, match=r"up to 1000, outside \[0, 999\].*IndexError"):
        dq.chain_from_diffusers(DDIMScheduler(clip_sample=False, steps_offset=1), 1000)
    sched = DDIMScheduler(clip_sample=False, steps_offset=1)
    sched.set_timesteps(1000)
    with pytest.raises(IndexError):                    # the message's claim about diffusers
        sched.step(torch.zeros(1), sched.timesteps[0], torch.zeros(1))
    with pytest.raises(ValueError, match="num_inference_steps is required"):
        dq.chain_from_diffusers(DDIMScheduler(clip_sample=False))
    with pytest.raises(ValueError, match="timestep_spacing"):
        dq.chain_from_diffusers({"_class_name": "DDIMScheduler", "clip_sample": False,
                                "timestep_spacing": "karras"}, 10)
    with pytest.raises(ValueError, match="beta_schedule"):
        dq.schedule_from_diffusers({"beta_schedule": "exp"})
    with pytest.raises(TypeError, match="scheduler"):
        dq.schedule_from_diffusers(3)
    with pytest.raises(ValueError, match="prediction_type"):
        dq.models.EpsModel(torch.nn.Identity(), prediction_type="x0")
    with pytest.raises(ValueError, match="needs the schedule"):
        dq.models.EpsModel(torch.nn.Identity(), prediction_type="sample")


def test_moved_adapter_names_say_where_they_went():
    """Issue #23: the chains and schedules no longer import diffusers_compat (nor it the
    models); each old name raises, naming its replacement."""
    sched = DDIMScheduler(clip_sample=False)
    with pytest.raises(AttributeError, match=r"use dq\.chain_from_diffusers\(scheduler"):
        dq.DDIM.from_diffusers(sched, 10, eta=0.5)
    with pytest.raises(AttributeError, match=r"use dq\.schedule_from_diffusers\(scheduler\)"):
        dq.Schedule.from_diffusers(sched)
    with pytest.raises(AttributeError, match=r"use deqir_fast\.models\.eps_model"):
        dq.diffusers_compat.eps_model
    assert dq.chain_from_diffusers is dq.diffusers_compat.chain_from_diffusers
    assert dq.schedule_from_diffusers is dq.diffusers_compat.schedule_from_diffusers


def test_config_dict_gives_the_same_chain():
    sched = make_scheduler("ddim", timestep_spacing="linspace", set_alpha_to_one=False)
    cfg = json.loads(sched.to_json_string())               # as read from scheduler_config.json
    assert cfg["_class_name"] == "DDIMScheduler"
    a, b = dq.chain_from_diffusers(sched, 30, eta=0.5), dq.chain_from_diffusers(cfg, 30, eta=0.5)
    x = torch.randn(1, 3, 4, 4)
    ca, cb = a.coefficients(x, torch.randn(30, 1, 3, 4, 4)), b.coefficients(x, torch.zeros(30, 1, 3, 4, 4))
    # exact: the config's ᾱ is the object's bit for bit (see test_beta_schedules), and the
    # coefficients are then the same code on the same values
    assert torch.equal(a.timesteps, b.timesteps) and torch.equal(a.alpha_next, b.alpha_next)
    assert torch.equal(ca.P, cb.P) and torch.equal(ca.Q, cb.Q)


# -- load_unet: the folder's own schedule -------------------------------------------------------
@pytest.mark.parametrize("layout", ["pipeline", "flat", "none"])
def test_load_unet_reads_the_scheduler_config(tmp_path, layout):
    net = tiny_unet(cls=UNet2DModel)
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type="v_prediction")
    folder = tmp_path / "unet"
    net.save_pretrained(folder)
    if layout == "pipeline":
        sched.save_pretrained(tmp_path / "scheduler")
    elif layout == "flat":
        sched.save_pretrained(folder)
    model = dq.models.load_unet(folder)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        raw = net(x, t).sample
        out = model(x, t)
    # `net` and the loaded copy (requires_grad_(False), eval) hold the same weights but may
    # run different CPU kernels (on an AMD EPYC with AVX-512 they differ in the 7th digit),
    # so the outputs agree to float32 precision, not bit for bit. A wrong conversion (or a
    # conversion where none is due) is off by O(1).
    if layout == "none":
        assert model.schedule is None and model.scheduler_config is None
        assert close(out, raw, 1e-5)
        return
    assert isinstance(model.schedule, dq.Schedule)
    # exact: the config's ᾱ comes from the same torch ops as the scheduler's, in this process
    assert torch.equal(model.schedule.alphas_cumprod.float(), sched.alphas_cumprod)
    assert model.scheduler_config["prediction_type"] == "v_prediction"
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert close(out, a.sqrt() * raw + (1 - a).sqrt() * x, 1e-5)


def test_load_unet_rejects_a_bad_scheduler_config(tmp_path):
    tiny_unet(cls=UNet2DModel).save_pretrained(tmp_path / "unet")
    (tmp_path / "unet" / "scheduler_config.json").write_text('{"beta_schedule": "exp"}')
    with pytest.raises(ValueError, match=r"scheduler_config\.json.*beta_schedule"):
        dq.models.load_unet(tmp_path / "unet")


# -- pipelines -------------------------------------------------------------------------------
def test_ddim_pipeline_is_a_drop_in(unets):
    unet = unets["epsilon"]
    sched = make_scheduler("ddim", timestep_spacing="trailing")
    serial = DDIMPipeline(unet=unet, scheduler=sched)
    par = dq.ParallelDDIMPipeline(unet=unet, scheduler=sched)
    for p in (serial, par):
        p.set_progress_bar_config(disable=True)
    kw = dict(batch_size=2, eta=0.5, num_inference_steps=30)
    ref = serial(generator=torch.Generator().manual_seed(3), output_type="np", **kw)
    out = par(generator=torch.Generator().manual_seed(3), output_type="np", tol=0, **kw)
    assert isinstance(out, ImagePipelineOutput) and isinstance(out.images, np.ndarray)
    assert out.images.shape == ref.images.shape == (2, 8, 8, 3)
    assert np.abs(out.images - ref.images).max() <= TOL
    assert 1 <= out.rounds <= 30 and out.converged and out.nfe >= out.rounds
    assert par.last_result.iterations == out.rounds             # the same count, reported twice
    # per-image generators, return_dict=False, "pt"
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6)]  # noqa: E731
    ref = serial(generator=gens(), output_type="pt", return_dict=False, **kw)
    out = par(generator=gens(), output_type="pt", return_dict=False, tol=0, **kw)
    assert isinstance(out, tuple) and len(out) == 1 and isinstance(out[0], torch.Tensor)
    assert (out[0] - ref[0]).abs().max() <= TOL
    # "pil", the default: the same 8-bit images (up to a rounding boundary)
    ref = serial(generator=torch.Generator().manual_seed(3), **kw).images
    out = par(generator=torch.Generator().manual_seed(3), tol=0, **kw).images
    assert len(out) == 2 and out[0].size == ref[0].size == (8, 8)
    assert max(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max()
               for a, b in zip(out, ref)) <= 1
    # serial=True runs our serial sampler on the same draws
    out = par(generator=torch.Generator().manual_seed(3), output_type="np", serial=True, **kw)
    # exact: a serial run reports one round per step by definition
    assert out.rounds == 30 and np.abs(out.images - serial(generator=torch.Generator().manual_seed(3),
                                                          output_type="np", **kw).images).max() <= TOL


def test_ddpm_pipeline_is_a_drop_in(unets):
    unet = unets["v_prediction"]
    sched = make_scheduler("ddpm", timestep_spacing="leading", steps_offset=1,
                           variance_type="fixed_large", prediction_type="v_prediction")
    serial, par = DDPMPipeline(unet=unet, scheduler=sched), dq.ParallelDDPMPipeline(unet=unet, scheduler=sched)
    serial.set_progress_bar_config(disable=True)
    ref = serial(generator=torch.Generator().manual_seed(1), num_inference_steps=20, output_type="np")
    out = par(generator=torch.Generator().manual_seed(1), num_inference_steps=20, output_type="np", tol=0)
    assert np.abs(out.images - ref.images).max() <= TOL and out.rounds <= 20
    # default tolerance: fewer rounds, within one 8-bit grey level
    fast = par(generator=torch.Generator().manual_seed(1), num_inference_steps=20, output_type="np")
    assert fast.converged and np.abs(fast.images - ref.images).max() <= 1 / 255


def test_pipelines_from_pretrained_and_clip_default(tmp_path):
    unet = tiny_unet(cls=UNet2DModel)
    DDIMPipeline(unet=unet, scheduler=DDIMScheduler(prediction_type="sample")).save_pretrained(tmp_path)
    par = dq.ParallelDDIMPipeline.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="clip_sample=True"):          # diffusers' default
        par(num_inference_steps=5)
    par.scheduler = DDIMScheduler.from_config(par.scheduler.config, clip_sample=False)
    serial = DDIMPipeline(unet=par.unet, scheduler=par.scheduler)
    serial.set_progress_bar_config(disable=True)
    ref = serial(generator=torch.Generator().manual_seed(0), num_inference_steps=10, output_type="np")
    out = par(generator=torch.Generator().manual_seed(0), num_inference_steps=10, output_type="np", tol=0)
    assert np.abs(out.images - ref.images).max() <= TOL


def test_restoration_pipeline(unets):
    from deqir_fast import operators as ops
    unet = unets["sample"]
    sched = make_scheduler("ddpm", prediction_type="sample")
    pipe = dq.ParallelRestorationPipeline(unet=unet, scheduler=sched)
    mask = (torch.rand(8, 8, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    op = ops.Inpainting(mask)
    y = op.A(torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    for sampler, eta in (("ddrm", 0.85), ("ddnm", 0.5)):
        kw = dict(operator=op, sampler=sampler, eta=eta, num_inference_steps=20, output_type="pt")
        serial = pipe(y, generator=torch.Generator().manual_seed(2), serial=True, **kw)
        out = pipe(y, generator=torch.Generator().manual_seed(2), tol=0, **kw)
        assert out.images.shape == (2, 3, 8, 8) and out.rounds <= 20 and out.converged
        assert (out.images - serial.images).abs().max() <= TOL
        # the same as the chain-level API on the same draws
        chain = pipe.make_chain(y, op, sampler, eta=eta, num_inference_steps=20)
        x_T, noise = draw_noise(chain, (2, 3, 8, 8), torch.Generator().manual_seed(2))
        with torch.no_grad():
            x0 = dq.sample_serial(eps_model(unet, sched), chain, x_T, noise=noise)
        assert ((x0 / 2 + 0.5).clamp(0, 1) - serial.images).abs().max() <= TOL
    with pytest.raises(ValueError, match="sampler"):
        pipe(y, operator=op, sampler="ddim")


# -- 4. drop-in edges (issue #22) ----------------------------------------------------------
class AnalyticDenoiser(torch.nn.Module):
    """A float64-capable model for parity to float64 rounding: the Gaussian-prior
    prediction (prior variance 0.5) of ``prediction_type`` under the scheduler's own ᾱ,
    plus a small nonlinear, time-dependent term. No parameters (``EpsModel`` then runs
    it in the state's dtype) and elementwise per image, so its output for one image does
    not depend on the batch around it: serial and parallel see the same numbers."""

    def __init__(self, sched, prediction_type):
        super().__init__()
        a = sched.alphas_cumprod.double()
        self.register_buffer("a", a)
        g = torch.Generator().manual_seed(0)
        self.register_buffer("w", torch.randn(3, 3, generator=g, dtype=torch.float64) * 0.3)
        self.prediction_type = prediction_type

    def forward(self, x, t):
        t = torch.as_tensor(t).long().reshape(-1).expand(x.shape[0])
        a = self.a[t].view(-1, 1, 1, 1).to(x.dtype)
        den = 0.5 * a + 1 - a
        eps, x0 = (1 - a).sqrt() * x / den, 0.5 * a.sqrt() * x / den
        pred = {"epsilon": eps, "sample": x0,
                "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}[self.prediction_type]
        mix = torch.einsum("ij,bjhw->bihw", self.w.to(x.dtype), x)
        return pred + 0.1 * torch.tanh(mix + t.view(-1, 1, 1, 1).to(x.dtype) / 500)


def diffusers_loop_fn(net, sched, S, eta, generator, shape, dtype):
    """diffusers_loop for a plain callable net(x, t) in ``dtype``."""
    image = randn_tensor(shape, generator=generator, dtype=dtype)
    sched.set_timesteps(S)
    for t in sched.timesteps:
        out = net(image, t)
        if isinstance(sched, DDIMScheduler):
            image = sched.step(out, t, image, eta=eta, generator=generator).prev_sample
        else:
            image = sched.step(out, t, image, generator=generator).prev_sample
    return image


def _ours(net, sched, S, eta, seed, shape, dtype):
    """(serial, parallel with tol=0) on diffusers' draws, in ``dtype``."""
    chain = dq.chain_from_diffusers(sched, S, eta=eta)
    x_T, noise = draw_noise(chain, shape, torch.Generator().manual_seed(seed), dtype=dtype)
    model = eps_model(net, sched)
    with torch.no_grad():
        serial = dq.sample_serial(model, chain, x_T, noise=noise)
        res = dq.solve(model, chain, x_T, noise=noise, tol=0, max_iter=S)
    return serial, res.x0


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
@pytest.mark.parametrize("pt", ["v_prediction", "sample"])
def test_v_and_sample_match_the_diffusers_loop_in_float64_where_alpha_is_tiny(kind, pt):
    """Cosine schedule, trailing, 30 steps: the first step runs at ᾱ(999) = 2.4e-9. The
    eps chain's x0 = (x - sqrt(1-ᾱ) ε)/sqrt(ᾱ) with diffusers' float32 scalars is off by
    (1 - sa² - sb²)/sa from diffusers' x0 = sa x - sb v: ~1.5e-6 here before issue #22.
    Now the chain composes diffusers' own step on (x, output) with the conversion: float64
    rounding (~2e-13 measured), as for epsilon."""
    sched = make_scheduler(kind, beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing",
                           prediction_type=pt)
    net = AnalyticDenoiser(sched, pt)
    S, eta, shape = 30, (0.5 if kind == "ddim" else None), (2, 3, 4, 4)
    with torch.no_grad():
        ref = diffusers_loop_fn(net, sched, S, eta, torch.Generator().manual_seed(7), shape,
                                torch.float64)
    serial, parallel = _ours(net, sched, S, eta, 7, shape, torch.float64)
    assert close(serial, ref, 2e-12)
    assert close(parallel, ref, 2e-12)
    # float32 stays within float32's reach of diffusers' (the eps form's own rounding,
    # ~1e-4 at ᾱ = 2.4e-9, is the limit there: see diffusers_compat._eps_form)
    with torch.no_grad():
        ref32 = diffusers_loop_fn(net, sched, S, eta, torch.Generator().manual_seed(7), shape,
                                  torch.float32)
    serial32, _ = _ours(net, sched, S, eta, 7, shape, torch.float32)
    assert close(serial32, ref32, 1e-3)


@pytest.mark.parametrize("S", [61, 103, 121])
def test_trailing_overshoot_is_refused_and_says_what_diffusers_does(S):
    """numpy's arange gives S + 1 trailing timesteps ending in -1 for these S (T = 1000).
    diffusers does not fail: it runs S + 1 steps, the last at t = -1 reading
    alphas_cumprod[-1] = ᾱ(999). The message says that, not "diffusers would fail"."""
    sched = make_scheduler("ddim", timestep_spacing="trailing")
    sched.set_timesteps(S)
    assert len(sched.timesteps) == S + 1 and int(sched.timesteps[-1]) == -1
    # the message's claim: diffusers steps at t = -1 without an error, with ᾱ(999)
    x = torch.zeros(1, 3, 2, 2, dtype=torch.float64)
    out = sched.step(torch.ones_like(x), sched.timesteps[-1], x).prev_sample
    a = sched.alphas_cumprod[-1].double()
    assert close(out, -(1 - a).sqrt() / a.sqrt() * torch.ones_like(x), 1e-6)
    with pytest.raises(ValueError) as err:
        dq.chain_from_diffusers(sched, S)
    msg = str(err.value)
    assert "would fail" not in msg
    assert f"{S + 1} timesteps for {S} steps" in msg and "the last of them -1" in msg
    assert "without an error" in msg and "alphas_cumprod[t]" in msg and "ᾱ(999)" in msg
    # the suggested step counts work
    near = [int(n) for n in msg.split("num_inference_steps=")[1].split(",")[0].split(" or ")]
    for n in near:
        assert len(dq.chain_from_diffusers(sched, n).timesteps) == n


class StepOverride(DDIMScheduler):
    def step(self, model_output, timestep, sample, **kwargs):    # e.g. a guidance tweak
        out = super().step(model_output, timestep, sample, **kwargs)
        out.prev_sample = out.prev_sample * 1.01
        return out


class TimestepsOverride(DDPMScheduler):
    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None):
        super().set_timesteps(num_inference_steps, device=device)
        self.timesteps = self.timesteps.flip(0).flip(0)


class ConfigOnly(DDIMScheduler):
    """A subclass that changes nothing the loop runs (e.g. only adds a helper)."""

    def describe(self):
        return "mine"


def test_subclasses_that_override_the_step_are_refused():
    for cls, method in ((StepOverride, "step"), (TimestepsOverride, "set_timesteps")):
        with pytest.raises(TypeError, match=rf"{cls.__name__}.*overrides {method}"):
            dq.chain_from_diffusers(cls(clip_sample=False), 10)
    # an override set on the instance counts too
    sched = DDIMScheduler(clip_sample=False)
    sched.step = lambda *a, **k: None
    with pytest.raises(TypeError, match=r"DDIMScheduler.*overrides step"):
        dq.chain_from_diffusers(sched, 10)
    # a class merely named DDIMScheduler (not diffusers') is not taken for diffusers'
    fake = type("DDIMScheduler", (), {"config": dict(DDIMScheduler(clip_sample=False).config)})()
    with pytest.raises(ValueError, match="unsupported scheduler"):
        dq.chain_from_diffusers(fake, 10)


def test_subclasses_that_leave_the_step_alone_are_accepted():
    mine, base = ConfigOnly(clip_sample=False), DDIMScheduler(clip_sample=False)
    a, b = dq.chain_from_diffusers(mine, 30, eta=0.5), dq.chain_from_diffusers(base, 30, eta=0.5)
    x = torch.randn(1, 3, 4, 4)
    ca, cb = a.coefficients(x, None), b.coefficients(x, None)
    # exact: the same config and a copy of the same ᾱ tensor give the same coefficients
    assert torch.equal(ca.P, cb.P) and torch.equal(ca.Q, cb.Q)
    assert _check_steps(mine, a, 30, 0.5) < 1e-12


@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler])
def test_beta_schedules_accepted_as_each_class_accepts_them(cls):
    """Exactly the beta_schedule values diffusers' class itself accepts: DDIMScheduler
    raises for "laplace" and "sigmoid", DDPMScheduler takes them."""
    name = cls.__name__
    for beta in ("linear", "scaled_linear", "squaredcos_cap_v2", "laplace", "sigmoid", "exp"):
        cfg = {"_class_name": name, "clip_sample": False, "beta_schedule": beta}
        try:
            theirs = cls(clip_sample=False, beta_schedule=beta).alphas_cumprod
        except NotImplementedError:
            theirs = None
        if theirs is None:
            with pytest.raises(ValueError, match=rf"beta_schedule '{beta}'") as err:
                dq.chain_from_diffusers(cfg, 10)
            listed = [n.strip(" '") for n in str(err.value).split("accepts only ")[1]
                      .split(" (or")[0].split(",")]
            accepted = [b for b in ("linear", "scaled_linear", "squaredcos_cap_v2", "laplace",
                                    "sigmoid") if not _raises(cls, b)]
            assert listed == accepted
        else:
            # exact: the same float32 torch ops as the class's __init__, in this process
            assert torch.equal(dq.schedule_from_diffusers(cfg).alphas_cumprod.float(), theirs)
            dq.chain_from_diffusers(cfg, 10)


def _raises(cls, beta):
    try:
        cls(clip_sample=False, beta_schedule=beta)
    except NotImplementedError:
        return True
    return False


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
@pytest.mark.parametrize("pt", ["epsilon", "v_prediction"])
def test_zero_snr_leading_matches_the_diffusers_loop(kind, pt):
    """rescale_betas_zero_snr: ᾱ(999) = 0, but "leading" never runs the model there (its
    top timestep is (S-1)·(T//S) + offset < 999): the chain is exact, serial and parallel,
    against diffusers' own loop in float64, and steps match scheduler.step."""
    for S, offset in ((10, 1), (50, 0), (1, 0)):
        sched = make_scheduler(kind, rescale_betas_zero_snr=True, steps_offset=offset,
                               prediction_type=pt)
        assert float(sched.alphas_cumprod[-1]) == 0.0        # the rescaling's own claim
        eta = 0.5 if kind == "ddim" else None
        chain = dq.chain_from_diffusers(sched, S, eta=eta)
        assert _check_steps(sched, chain, S, 0.5 if kind == "ddim" else 1.0) < 1e-12
        # the config alone gives the same ᾱ, zero included (exact: same torch ops)
        assert torch.equal(dq.schedule_from_diffusers(dict(sched.config)).alphas_cumprod.float(),
                           sched.alphas_cumprod)
    S, shape = 50, (1, 3, 4, 4)
    sched = make_scheduler(kind, rescale_betas_zero_snr=True, prediction_type=pt)
    net = AnalyticDenoiser(sched, pt)
    with torch.no_grad():
        ref = diffusers_loop_fn(net, sched, S, eta, torch.Generator().manual_seed(3), shape,
                                torch.float64)
    serial, parallel = _ours(net, sched, S, eta, 3, shape, torch.float64)
    assert close(serial, ref, 1e-12) and close(parallel, ref, 1e-12)


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_zero_snr_is_refused_where_a_step_runs_at_alpha_zero(kind):
    """"trailing" and "linspace" start at t = 999, where ᾱ = 0: diffusers' epsilon step
    is inf/NaN there; its v step is defined, but ε = x carries no prediction there, so the
    eps chain cannot express it. Refused, with that reason; so is "leading" when the
    offset puts a step on 999."""
    for spacing, offset, S in (("trailing", 0, 30), ("linspace", 0, 10), ("leading", 99, 10)):
        for pt in ("epsilon", "v_prediction"):
            sched = make_scheduler(kind, rescale_betas_zero_snr=True, timestep_spacing=spacing,
                                   steps_offset=offset, prediction_type=pt)
            why = "inf/NaN" if pt == "epsilon" else "cannot be written"
            with pytest.raises(ValueError, match=rf"rescale_betas_zero_snr=True sets ᾱ = 0 at "
                                                 rf"t = 999.*{spacing}.*{why}"):
                dq.chain_from_diffusers(sched, S)
    # the message's claims about diffusers' own loop there
    for pt, finite in (("epsilon", False), ("v_prediction", True)):
        sched = make_scheduler(kind, rescale_betas_zero_snr=True, timestep_spacing="trailing",
                               prediction_type=pt)
        net = AnalyticDenoiser(sched, pt)
        with torch.no_grad():
            out = diffusers_loop_fn(net, sched, 10, 0.0, torch.Generator().manual_seed(0),
                                    (1, 3, 2, 2), torch.float64)
        assert bool(torch.isfinite(out).all()) == finite
    # the restoration pipeline's chains start there too
    from deqir_fast import operators as ops
    pipe = dq.ParallelRestorationPipeline(unet=tiny_unet(cls=UNet2DModel),
                                          scheduler=make_scheduler(kind, rescale_betas_zero_snr=True,
                                                                   timestep_spacing="trailing"))
    op = ops.Inpainting(torch.ones(8, 8))
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        pipe.make_chain(op.A(torch.zeros(1, 3, 8, 8)), op, "ddnm", num_inference_steps=10)
