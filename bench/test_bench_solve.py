"""pytest-benchmark macro suite: whole solves, serial vs parallel, on the same model, chain
and noise. Every timed result is checked: a parallel solve must have converged and land
within 2/255 of the serial sampler's x0 (one 8-bit grey level on the [-1, 1] scale), the
serial sampler must match the exact parallel solve (tol 0), and our serial sampler must
match diffusers' DDIMScheduler loop that it is timed against.

Run every suite under bench/ (these and the kernels' micro benchmarks) with one command,
keeping one JSON file per run in bench/.benchmarks/ (git-ignored):

    OMP_NUM_THREADS=1 python -m pytest bench --benchmark-only --benchmark-autosave --benchmark-storage=bench/.benchmarks

Compare saved runs (list them with `pytest-benchmark --storage bench/.benchmarks list`;
runs are named by a counter, 0001, 0002, ...):

    pytest-benchmark --storage bench/.benchmarks compare 0001 0002 --group-by=group --columns=min,median,max

Groups are problems (model-chain-S): serial, each parallel configuration and, for DDIM on
the bundled UNet, diffusers' loop sit side by side. On a CPU the batched model call gets
no free parallelism, so a parallel solve costs its total model evaluations; the ratio
that matters on a GPU is rounds vs S (``deqir-fast bench``, bench/RESULTS.md).
"""
import functools

import pytest
import torch

import deqir_fast as dq
from deqir_fast import operators as ops

GREY = 2 / 255
SHAPE = (3, 16, 16)


@functools.lru_cache(maxsize=None)
def problem(model_name: str, kind: str, steps: int):
    """(model, chain, x_T, serial x0): the Gaussian-mixture denoiser (3x16x16) or the
    bundled UNet (3x32x32, a held-out digit as ground truth)."""
    if model_name == "gmm":
        sched = dq.Schedule.linear(1000)
        model = dq.testing.GaussianMixtureDenoiser(sched, SHAPE, components=6, std=0.3,
                                                   dtype=torch.float32)
        truth = model.means[:1].detach()
    else:
        from deqir_fast.models import bundled_model, heldout_images
        sched = dq.Schedule.linear(1000)
        model, truth = bundled_model(), heldout_images()[:1].float()
    shape = tuple(truth.shape[1:])
    ts = dq.timesteps(sched, steps)
    x_T = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0))
    if kind == "ddim":
        chain = dq.DDIM(sched, ts)
    else:
        op = ops.SuperResolution(2, shape)
        chain = dq.DDRM(sched, ts, operator=op, y=op.A(truth), sigma_y=0.05)
    with torch.no_grad():
        serial = dq.sample_serial(model, chain, x_T, generator=gen())
    return model, chain, x_T, serial


def gen():
    return torch.Generator().manual_seed(1)


def run(benchmark, slow: bool, fn):
    """Time ``fn()``: pytest-benchmark's calibrated rounds for fast calls, 3 rounds after a
    warm-up for slow ones (a whole solve on the UNet). ``fn`` makes its own generator, so
    every round draws the same noise (a shared generator would advance between rounds)."""
    if slow:
        return benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
    return benchmark(fn)


CASES = [("gmm", "ddim", 20), ("gmm", "ddim", 100), ("gmm", "ddrm", 20), ("gmm", "ddrm", 100),
         ("bundled", "ddim", 20), ("bundled", "ddrm", 20)]


@pytest.mark.parametrize("model_name,kind,steps", CASES)
def test_serial(benchmark, model_name, kind, steps):
    model, chain, x_T, serial = problem(model_name, kind, steps)
    benchmark.group = f"{model_name}-{kind}-{steps}"
    with torch.no_grad():
        x0 = run(benchmark, model_name != "gmm",
                 lambda: dq.sample_serial(model, chain, x_T, generator=gen()))
        exact = dq.solve(model, chain, x_T, generator=gen(), tol=0.0)
    assert torch.equal(x0, serial)                              # deterministic
    assert exact.converged and (exact.x0 - x0).abs().max() <= 1e-4


@pytest.mark.parametrize("solver", ["default", "picard", "triangular_anderson"])
@pytest.mark.parametrize("model_name,kind,steps", CASES)
def test_parallel(benchmark, model_name, kind, steps, solver):
    if model_name != "gmm" and solver != "default":
        pytest.skip("the UNet cases time the default solve only")
    model, chain, x_T, serial = problem(model_name, kind, steps)
    benchmark.group = f"{model_name}-{kind}-{steps}"
    kw = {} if solver == "default" else {"solver": solver}
    res = run(benchmark, model_name != "gmm",
              lambda: dq.solve(model, chain, x_T, generator=gen(), **kw))
    err = (res.x0 - serial).abs().max().item()
    benchmark.extra_info.update(rounds=res.iterations, nfe=res.nfe, max_abs_err=err,
                                converged=res.converged)
    assert res.converged, f"not converged after {res.iterations} rounds"
    assert err <= GREY, f"max|x0 - serial| = {err:.2e} > 2/255"


@pytest.mark.parametrize("loop", ["diffusers", "deqir_fast"])
def test_serial_loop_ddim(benchmark, loop):
    """diffusers' DDIMScheduler loop and our serial sampler on the scheduler's chain, same
    UNet and noise (``deqir-fast bench`` measures their ratio in one run)."""
    pytest.importorskip("diffusers")
    from diffusers import DDIMScheduler

    from deqir_fast.diffusers_compat import draw_noise
    from deqir_fast.models import bundled_model
    model = bundled_model()
    unet = model.network
    scheduler = DDIMScheduler(clip_sample=False)
    chain = dq.chain_from_diffusers(scheduler, 20, eta=0.0)
    x_T, noise = draw_noise(chain, (1, 3, 32, 32), torch.Generator().manual_seed(0))
    benchmark.group = "bundled-ddim-20-serial-loops"

    def diffusers_loop():
        scheduler.set_timesteps(20)
        x = x_T.clone()
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
        return x

    with torch.no_grad():
        reference = diffusers_loop()
        if loop == "diffusers":
            x0 = run(benchmark, True, diffusers_loop)
        else:
            x0 = run(benchmark, True, lambda: dq.sample_serial(model, chain, x_T, noise=noise))
    assert (x0 - reference).abs().max() <= 1e-4
