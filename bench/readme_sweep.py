"""The promise `converged=True` ⇒ max|x0 - serial| < 2/255, swept over seeds of the README's
Gaussian-mixture problem (DDRM inpainting) and its DDNM / DDIM (η 0.5) variants, with the
default solve (tests/test_solvers.py runs a 13-seed subset in CI).

    OMP_NUM_THREADS=1 python bench/readme_sweep.py --kinds DDRM,DDNM,DDIM --seeds 300
    OMP_NUM_THREADS=1 python bench/readme_sweep.py --kinds DDNM,DDIM --eta0 --window 20

``--window W`` solves with a sliding window; ``--eta0`` rebuilds the DDNM and DDIM
variants with η = 0 (deterministic chains: the ones whose entering steps start on the
chain, docs/design.md §3c).
"""
from __future__ import annotations

import argparse

import torch

import deqir_fast as dq


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", default="DDRM,DDNM,DDIM")
    p.add_argument("--seeds", type=int, default=300)
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--eta0", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    print("| problem | seeds | converged | converged but over 2/255 | worst max abs x0 - serial | rounds (mean / max) |")
    print("|---|---|---|---|---|---|")
    for kind in args.kinds.split(","):
        worst, rounds, over, conv = 0.0, [], 0, 0
        for seed in range(args.seeds):
            model, chain, x_T = dq.testing.readme_problem(kind, seed)
            if args.eta0 and kind == "DDNM":
                chain = dq.DDNM(chain.schedule, chain.timesteps, operator=chain.operator,
                                y=chain.y, sigma_y=chain.sigma_y, eta=0.0)
            elif args.eta0 and kind == "DDIM":
                chain = dq.DDIM(chain.schedule, chain.timesteps, eta=0.0)
            gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
            serial = dq.sample_serial(model, chain, x_T, generator=gen())
            res = dq.solve(model, chain, x_T, generator=gen(), window=args.window)
            err = (res.x0 - serial).abs().max().item()
            conv += res.converged
            over += bool(res.converged and err >= 2 / 255)
            worst = max(worst, err)
            rounds.append(res.iterations)
        name = f"readme-{kind}" + (" η 0" if args.eta0 and kind != "DDRM" else "") + \
            (f", window {args.window}" if args.window else "")
        print(f"| {name} | {args.seeds} | {conv} | {over} | {worst:.1e} | "
              f"{sum(rounds) / len(rounds):.1f} / {max(rounds)} |", flush=True)


if __name__ == "__main__":
    main()
