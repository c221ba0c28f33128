"""pytest-benchmark: serial sampler vs parallel solve, same chain, same model.

    OMP_NUM_THREADS=1 python -m pytest bench/test_bench_solve.py --benchmark-only

On a CPU the batched model call gets no free parallelism, so the parallel solve costs
its total model evaluations; the ratio that matters on a GPU is rounds vs S (see
bench/RESULTS.md).
"""
import pytest
import torch

import deqir_fast as dq
from deqir_fast import operators as ops

SHAPE = (3, 16, 16)


def problem(kind: str, steps: int):
    sched = dq.Schedule.linear(1000)
    model = dq.testing.GaussianMixtureDenoiser(sched, SHAPE, components=6, std=0.3,
                                               dtype=torch.float32)
    ts = dq.timesteps(sched, steps)
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn((1, *SHAPE), generator=gen)
    if kind == "ddim":
        return model, dq.DDIM(sched, ts), x_T
    op = ops.SuperResolution(2, SHAPE)
    y = op.A(model.means[:1].detach())
    return model, dq.DDRM(sched, ts, operator=op, y=y, sigma_y=0.05), x_T


@pytest.mark.parametrize("kind", ["ddim", "ddrm"])
@pytest.mark.parametrize("steps", [20, 100])
def test_serial(benchmark, kind, steps):
    model, chain, x_T = problem(kind, steps)
    benchmark(dq.sample_serial, model, chain, x_T, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("solver", ["picard", "triangular_anderson"])
@pytest.mark.parametrize("kind", ["ddim", "ddrm"])
@pytest.mark.parametrize("steps", [20, 100])
def test_parallel(benchmark, kind, steps, solver):
    model, chain, x_T = problem(kind, steps)
    res = benchmark(dq.solve, model, chain, x_T, generator=torch.Generator().manual_seed(1),
                    solver=solver)
    benchmark.extra_info.update(rounds=res.iterations, nfe=res.nfe)
