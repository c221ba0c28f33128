"""Solve a 100-step DDRM inpainting in parallel and serially, on the exact denoiser of a
Gaussian-mixture prior (no network needed), and compare.

    python examples/quickstart.py
"""
import time

import torch

import deqir_fast as dq
from deqir_fast import operators as ops


def main(steps: int = 100, seed: int = 0) -> None:
    torch.manual_seed(seed)
    shape = (3, 32, 32)
    sched = dq.Schedule.linear(1000)
    model = dq.testing.GaussianMixtureDenoiser(sched, shape, components=8, std=0.15,
                                               dtype=torch.float32)
    truth = model.means[:2].detach() + 0.15 * torch.randn(2, *shape)
    mask = (torch.rand(shape[1:]) > 0.7).float()              # keep 30% of the pixels
    op = ops.Inpainting(mask)
    y = op.A(truth) + 0.05 * torch.randn(2, *shape) * mask
    chain = dq.DDRM(sched, dq.timesteps(sched, steps), operator=op, y=y, sigma_y=0.05)
    x_T = torch.randn(2, *shape)

    t0 = time.perf_counter()
    serial = dq.sample_serial(model, chain, x_T, generator=torch.Generator().manual_seed(1))
    t_serial = time.perf_counter() - t0
    print(f"DDRM inpainting, {steps} steps, batch 2, {shape}")
    print(f"{'sampler':<22}{'rounds':>7}{'model evals':>13}{'seconds':>9}{'max|x0 - serial|':>18}")
    print(f"{'serial':<22}{steps:>7}{steps:>13}{t_serial:>9.2f}{0.0:>18.2e}")
    for solver in ("picard", "anderson", "triangular_anderson"):
        res = dq.solve(model, chain, x_T, generator=torch.Generator().manual_seed(1), solver=solver)
        diff = (res.x0 - serial).abs().max().item()
        print(f"{solver:<22}{res.iterations:>7}{res.nfe:>13}{res.seconds:>9.2f}{diff:>18.2e}")
    err = lambda x: (x - truth).pow(2).mean().sqrt().item()  # noqa: E731
    print(f"RMSE to the truth: serial {err(serial):.4f}, pseudo-inverse {err(op.pinv(y)):.4f}")


if __name__ == "__main__":
    main()
