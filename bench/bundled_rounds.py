"""Rounds to converge at the default tolerance on the bundled model, and the
max |x0 - serial| they leave, for 20-, 100- and 1000-step DDIM, DDRM and DDNM.

    OMP_NUM_THREADS=1 python bench/bundled_rounds.py --steps 20,100 --solvers triangular_anderson,picard
    OMP_NUM_THREADS=1 python bench/bundled_rounds.py --steps 1000 --window 100

Held-out image 0; DDRM: inpainting (70% missing, sigma_y 0.05); DDNM: SR x2 (sigma_y 0).
"""
from __future__ import annotations

import argparse
import time

import torch

import deqir_fast as dq
from deqir_fast.models import bundled_model, heldout_images
from deqir_fast.tasks import build_operator


def chains(steps: int, truth: torch.Tensor):
    sched = dq.Schedule.linear(1000)
    ts = dq.timesteps(sched, steps)
    inp = build_operator("inpaint_random", truth.shape[1:])
    y_inp = inp.A(truth) + 0.05 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(5)) * inp.singulars
    sr = build_operator("sr2", truth.shape[1:])
    yield "DDIM", dq.DDIM(sched, ts)
    yield "DDRM inpaint", dq.DDRM(sched, ts, operator=inp, y=y_inp, sigma_y=0.05)
    yield "DDNM SRx2", dq.DDNM(sched, ts, operator=sr, y=sr.A(truth))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", default="20,100")
    p.add_argument("--solvers", default="triangular_anderson,anderson,picard")
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--max-iter", type=int, default=None)
    p.add_argument("--chains", default="DDIM,DDRM,DDNM")
    args = p.parse_args()
    model = bundled_model()
    truth = heldout_images()[:1]
    x_T = torch.randn(truth.shape, generator=torch.Generator().manual_seed(1))
    print(f"torch threads {torch.get_num_threads()}, default tol {dq.api.DEFAULT_TOL}, "
          f"window {args.window}")
    print("| chain | S | solver | rounds | model evals | max abs x0 - serial | converged | serial s | parallel s |")
    print("|---|---|---|---|---|---|---|---|---|")
    keep = args.chains.split(",")
    for steps in [int(s) for s in args.steps.split(",")]:
        for name, chain in chains(steps, truth):
            if not any(name.startswith(k) for k in keep):
                continue
            t0 = time.perf_counter()
            serial = dq.sample_serial(model, chain, x_T, generator=torch.Generator().manual_seed(2))
            t_serial = time.perf_counter() - t0
            for solver in args.solvers.split(","):
                res = dq.solve(model, chain, x_T, generator=torch.Generator().manual_seed(2),
                               solver=solver, window=args.window, max_iter=args.max_iter)
                err = (res.x0 - serial).abs().max().item()
                print(f"| {name} | {steps} | {solver} | {res.iterations} | {res.nfe} | {err:.2e} | "
                      f"{res.converged} | {t_serial:.1f} | {res.seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
