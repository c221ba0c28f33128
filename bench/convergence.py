"""Rounds to converge, model evaluations and the max |x0 - serial| reached, per solver,
initial guess and tolerance, next to the serial sampler's S steps.

    OMP_NUM_THREADS=1 python bench/convergence.py --model gmm
    OMP_NUM_THREADS=1 python bench/convergence.py --model unet --batch 1

Problems: DDIM-100 (eta 0), DDRM-100 (inpainting 70% missing, sigma_y 0.05), DDNM-100
(SR x2). Prints a markdown table (for bench/RESULTS.md).
"""
from __future__ import annotations

import argparse
import itertools
import time

import torch

import deqir_fast as dq
from deqir_fast import operators as ops

SHAPE = (3, 32, 32)


def make_model(kind: str):
    if kind == "gmm":
        sched = dq.Schedule.linear(1000)
        return dq.testing.GaussianMixtureDenoiser(sched, SHAPE, components=8, std=0.15,
                                                  dtype=torch.float32), None
    from deqir_fast.models import bundled_model, heldout_images
    return bundled_model(), heldout_images()


def problems(steps, batch, images, seed=0):
    sched = dq.Schedule.linear(1000)
    ts = dq.timesteps(sched, steps)
    gen = torch.Generator().manual_seed(seed)
    truth = images[:batch] if images is not None else torch.rand((batch, *SHAPE), generator=gen) * 2 - 1
    mask = (torch.rand(SHAPE[1:], generator=gen) > 0.7).float()
    inp = ops.Inpainting(mask)
    sr = ops.SuperResolution(2, SHAPE)
    y_inp = inp.A(truth) + 0.05 * torch.randn(truth.shape, generator=gen) * mask
    yield f"DDIM-{steps}", dq.DDIM(sched, ts)
    yield f"DDRM-{steps} inpaint s_y=0.05", dq.DDRM(sched, ts, operator=inp, y=y_inp, sigma_y=0.05)
    yield f"DDNM-{steps} SRx2", dq.DDNM(sched, ts, operator=sr, y=sr.A(truth))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["gmm", "unet"], default="gmm")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--solvers", default="picard,anderson,triangular_anderson")
    p.add_argument("--inits", default="x_T,jump")
    p.add_argument("--tols", default="0.1,0.03,0.01,0.003")
    p.add_argument("--problems", default="", help="comma-separated prefixes to keep")
    args = p.parse_args()
    torch.manual_seed(0)
    model, images = make_model(args.model)
    x_T = torch.randn((args.batch, *SHAPE), generator=torch.Generator().manual_seed(1))
    print(f"model={args.model} batch={args.batch} S={args.steps} torch threads={torch.get_num_threads()}")
    print("| problem | solver | init | tol | rounds | model evals | max abs x0 - serial | converged | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    keep = [k for k in args.problems.split(",") if k]
    for name, chain in problems(args.steps, args.batch, images):
        if keep and not any(name.startswith(k) for k in keep):
            continue
        t0 = time.perf_counter()
        serial = dq.sample_serial(model, chain, x_T, generator=torch.Generator().manual_seed(2))
        print(f"| {name} | serial | - | - | {chain.num_steps} | {chain.num_steps} | 0 | - | "
              f"{time.perf_counter() - t0:.1f} |", flush=True)
        for solver, init, tol in itertools.product(args.solvers.split(","), args.inits.split(","),
                                                   [float(t) for t in args.tols.split(",")]):
            res = dq.solve(model, chain, x_T, generator=torch.Generator().manual_seed(2),
                           solver=solver, init=init, tol=tol)
            err = (res.x0 - serial).abs().max().item()
            print(f"| {name} | {solver} | {init} | {tol:g} | {res.iterations} | {res.nfe} | "
                  f"{err:.2e} | {res.converged} | {res.seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
