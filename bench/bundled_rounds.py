"""Rounds to converge with the default solve (or a chosen solver and linearisation), and
the max |x0 - serial| they leave, on a trained model, for every calibration chain.

    OMP_NUM_THREADS=1 python bench/bundled_rounds.py --steps 20,100
    OMP_NUM_THREADS=1 python bench/bundled_rounds.py --steps 1000 --chains DDIM,DDPM,DDRM-inp,DDNM-sr2
    OMP_NUM_THREADS=1 python bench/bundled_rounds.py --steps 100 --linearize secant,none
    OMP_NUM_THREADS=1 python bench/bundled_rounds.py --steps 100 --hindsight

The "frozen vs serial" column is the serial shadow's largest deviation of a frozen state
from the serial one, in noise units (docs/design.md §3d; a restart when it exceeds tol).
``--window 20 --enter copy`` starts the steps entering the window from a copy of the
last state instead of ``ChainSystem.extend``. ``--hindsight`` adds the first round from
which max|x0 - serial| stays below 2/255 (the floor for any stopping rule on that solve;
x0 is compared after every round).

Chains (bench/calibrate.py): DDIM (eta 0, 0.5, 1 = DDPM), DDRM inpainting (70% missing,
sigma_y 0.05) / SR x2 / deblurring (sigma_y 0.02), DDNM SR x2 / inpainting (eta 0.85) /
DDNM+ SR x2 (sigma_y 0.05); held-out image 0 of the model.
"""
from __future__ import annotations

import argparse
import time

import torch
from calibrate import GREY, chains, load

import deqir_fast as dq


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bundled", choices=["bundled", "photo16"])
    p.add_argument("--steps", default="20,100")
    p.add_argument("--solvers", default="picard")
    p.add_argument("--linearize", default="secant")
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--chains", default="")
    p.add_argument("--hindsight", action="store_true")
    p.add_argument("--enter", default="auto", choices=["auto", "copy"],
                   help="with --window: 'copy' starts entering steps from a copy of the last "
                        "state (ParaDiGMS; the default before docs/design.md §3c)")
    args = p.parse_args()
    if args.enter == "copy":
        from deqir_fast.system import ChainSystem
        ChainSystem.extend = lambda self, *a: None          # enter_steps then copies
    torch.set_num_threads(1)
    model, schedule, images = load(args.model)
    truth = images[:1].float()
    x_T = torch.randn(truth.shape, generator=torch.Generator().manual_seed(100))
    keep = args.chains.split(",") if args.chains else None
    print(f"model {args.model}, torch threads {torch.get_num_threads()}, default tol "
          f"{dq.api.DEFAULT_TOL}, window {args.window}\n")
    extra = " within 2/255 from round |" if args.hindsight else ""
    print("| chain | S | solver | linearize | rounds |" + extra +
          " model evals | max abs x0 - serial | converged | frozen vs serial | serial s | parallel s |")
    print("|---|---|---|---|---|" + ("---|" if args.hindsight else "") + "---|---|---|---|---|---|")
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
                    errs = []

                    def track(info):
                        x0 = chain.from_basis(info["state"][-1])
                        errs.append((x0 - serial).abs().max().item())
                    res = dq.solve(model, chain, x_T, generator=gen(), solver=solver,
                                   linearize=lin, window=args.window,
                                   callback=track if args.hindsight else None)
                    err = (res.x0 - serial).abs().max().item()
                    hind = ""
                    if args.hindsight:      # 1-based round after which every error < 2/255
                        over = [k for k, e in enumerate(errs) if not e < GREY]
                        hind = (" never |" if over and over[-1] == len(errs) - 1
                                else f" {over[-1] + 2 if over else 1} |")
                    # the serial shadow's largest deviation of a frozen state (noise units;
                    # "restart at p" when it found one over tol, docs/design.md §3d)
                    st = res.stats
                    shadow = (f"restart at {st.serial_mismatch}" if st.serial_mismatch is not None
                              else "–" if st.shadow_deviation != st.shadow_deviation   # none compared
                              else f"{st.shadow_deviation:.1e}")
                    print(f"| {name} | {steps} | {solver} | {lin} | {res.iterations} |{hind} {res.nfe} | "
                          f"{err:.1e} | {res.converged} | {shadow} | {t_serial:.1f} | {res.seconds:.1f} |",
                          flush=True)


if __name__ == "__main__":
    main()
