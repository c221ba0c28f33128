"""Peers side by side at equal accuracy: ParaDiGMS, DeqIR and ParaTAA as configurations of
our solver (deqir_fast.peers), against our default, on the same model, chain and noise.

    OMP_NUM_THREADS=1 python bench/peers.py --model bundled --steps 100 --windows none,20

For each peer and setting: rounds, model evaluations, max|x0 - serial|; then, per peer,
the fewest rounds among its settings that land within one 8-bit grey level (2/255).
ParaDiGMS is run at diffusers' shipped tolerance (0.1) and tightened; ParaTAA at its
published 1e-3 and tightened; DeqIR at its 15-round budget.
"""
from __future__ import annotations

import argparse

import torch
from calibrate import GREY, chains, load

import deqir_fast as dq
from deqir_fast.peers import peer

SETTINGS = {
    "deqir_fast": [{}],
    "ParaDiGMS": [dict(tol=t) for t in (0.1, 0.01, 0.003, 1e-3, 3e-4)],
    "DeqIR": [{}],
    "ParaTAA": [dict(tol=t) for t in (1e-3, 1e-4)],
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bundled", choices=["bundled", "photo16"])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--windows", default="none,20")
    p.add_argument("--chains", default="DDIM,DDPM,DDRM-inp,DDNM-sr2")
    p.add_argument("--image", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    model, schedule, images = load(args.model)
    truth = images[args.image:args.image + 1].float()
    x_T = torch.randn(truth.shape, generator=torch.Generator().manual_seed(100 + args.image))
    keep = args.chains.split(",")
    windows = [None if w == "none" else int(w) for w in args.windows.split(",")]
    best = []
    print(f"model {args.model}, S = {args.steps}, image {args.image}\n")
    print("| chain | window | peer | setting | rounds | model evals | max abs x0 - serial | converged |")
    print("|---|---|---|---|---|---|---|---|")
    for cname, chain in chains(schedule, args.steps, truth, seed=args.image):
        if cname not in keep:
            continue
        gen = lambda: torch.Generator().manual_seed(2)  # noqa: E731
        serial = dq.sample_serial(model, chain, x_T, generator=gen())
        for window in windows:
            for name, settings in SETTINGS.items():
                ok = []
                for setting in settings:
                    res = dq.solve(model, chain, x_T, generator=gen(),
                                   **peer(name, window=window, **setting))
                    err = (res.x0 - serial).abs().max().item()
                    label = ", ".join(f"{k} {v:g}" for k, v in setting.items()) or "default"
                    print(f"| {cname} | {window or 'all'} | {name} | {label} | {res.iterations} | "
                          f"{res.nfe} | {err:.1e} | {res.converged} |", flush=True)
                    if err < GREY:
                        ok.append((res.iterations, res.nfe, label, err))
                best.append((cname, window, name, min(ok) if ok else None))
    print("\nFewest rounds within 2/255, per peer:\n")
    print("| chain | window | peer | rounds | model evals | setting | max abs x0 - serial |")
    print("|---|---|---|---|---|---|---|")
    for cname, window, name, b in best:
        cells = "never within 2/255 | - | - | -" if b is None else f"{b[0]} | {b[1]} | {b[2]} | {b[3]:.1e}"
        print(f"| {cname} | {window or 'all'} | {name} | {cells} |")


if __name__ == "__main__":
    main()
