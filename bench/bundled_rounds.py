"""Rounds to converge with the default solve (or a chosen solver and linearisation), and
the max |x0 - serial| they leave, on a trained model, for every calibration chain.

    OMP_NUM_THREADS=1 python bench/bundled_rounds.py --steps 20,100
    OMP_NUM_THREADS=1 python bench/bundled_rounds.py --steps 1000 --chains DDIM,DDPM,DDRM-inp,DDNM-sr2
    OMP_NUM_THREADS=1 python bench/bundled_rounds.py --steps 100 --linearize secant,none

Chains (bench/calibrate.py): DDIM (eta 0, 0.5, 1 = DDPM), DDRM inpainting (70% missing,
sigma_y 0.05) / SR x2 / deblurring (sigma_y 0.02), DDNM SR x2 / inpainting (eta 0.85) /
DDNM+ SR x2 (sigma_y 0.05); held-out image 0 of the model.
"""
from __future__ import annotations

import argparse
import time

import torch
from calibrate import chains, load

import deqir_fast as dq


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bundled", choices=["bundled", "photo16"])
    p.add_argument("--steps", default="20,100")
    p.add_argument("--solvers", default="picard")
    p.add_argument("--linearize", default="secant")
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--chains", default="")
    args = p.parse_args()
    torch.set_num_threads(1)
    model, schedule, images = load(args.model)
    truth = images[:1].float()
    x_T = torch.randn(truth.shape, generator=torch.Generator().manual_seed(100))
    keep = args.chains.split(",") if args.chains else None
    print(f"model {args.model}, torch threads {torch.get_num_threads()}, default tol "
          f"{dq.api.DEFAULT_TOL}, window {args.window}\n")
    print("| chain | S | solver | linearize | rounds | model evals | max abs x0 - serial | converged | serial s | parallel s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for steps in [int(s) for s in args.steps.split(",")]:
        for name, chain in chains(schedule, steps, truth):
            if keep and name not in keep:
                continue
            gen = lambda: torch.Generator().manual_seed(2)  # noqa: E731
            t0 = time.perf_counter()
            serial = dq.sample_serial(model, chain, x_T, generator=gen())
            t_serial = time.perf_counter() - t0
            for solver in args.solvers.split(","):
                for lin in args.linearize.split(","):
                    res = dq.solve(model, chain, x_T, generator=gen(), solver=solver,
                                   linearize=lin, window=args.window)
                    err = (res.x0 - serial).abs().max().item()
                    print(f"| {name} | {steps} | {solver} | {lin} | {res.iterations} | {res.nfe} | "
                          f"{err:.1e} | {res.converged} | {t_serial:.1f} | {res.seconds:.1f} |",
                          flush=True)


if __name__ == "__main__":
    main()
