"""The promise `converged=True` ⇒ max|x0 - serial| < 2/255, swept over seeds of the README's
Gaussian-mixture problem (DDRM inpainting) and its DDNM / DDIM (η 0.5) variants, with the
default solve (tests/test_solvers.py runs a 13-seed subset in CI).

    OMP_NUM_THREADS=1 python bench/readme_sweep.py --kinds DDRM,DDNM,DDIM --seeds 300
    OMP_NUM_THREADS=1 python bench/readme_sweep.py --kinds DDNM,DDIM --eta0 --window 20
    OMP_NUM_THREADS=1 python bench/readme_sweep.py --kinds DDNM --eta0 --seeds 20 --no-shadow [--tol 1e-5]
    OMP_NUM_THREADS=1 python bench/readme_sweep.py --kinds DDNM --eta0 --seeds 10 --steps 50 [--no-shadow]

``--window W`` solves with a sliding window; ``--eta0`` rebuilds the DDNM and DDIM
variants with η = 0 (deterministic chains: the ones whose entering steps start on the
chain, docs/design.md §3c). The last two columns: how many solves the serial shadow restarted after finding a frozen
state off the serial one (docs/design.md §3d; the steps where it found it), and the
largest deviation it measured in the solves it did not restart (noise units; the restart
threshold is tol). "off" where no shadow ran (``--no-shadow``, or ``--tol 0``).
"""
from __future__ import annotations

import argparse
import math

import torch

import deqir_fast as dq


def with_steps(chain, steps: int):
    """The same chain (kind, operator, y, eta) on ``steps`` timesteps of its schedule."""
    ts = dq.timesteps(chain.schedule, steps)
    if isinstance(chain, dq.DDRM):
        return dq.DDRM(chain.schedule, ts, operator=chain.operator, y=chain.y,
                       sigma_y=chain.sigma_y, eta=chain.eta, eta_b=chain.eta_b)
    if isinstance(chain, dq.DDNM):
        return dq.DDNM(chain.schedule, ts, operator=chain.operator, y=chain.y,
                       sigma_y=chain.sigma_y, eta=chain.eta)
    return dq.DDIM(chain.schedule, ts, eta=chain.eta)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", default="DDRM,DDNM,DDIM")
    p.add_argument("--seeds", type=int, default=300)
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--eta0", action="store_true")
    p.add_argument("--no-shadow", action="store_true",
                   help="solve without the serial shadow (docs/design.md §3d)")
    p.add_argument("--tol", type=float, default=None, help="solve's tol (default: its default)")
    p.add_argument("--steps", type=int, default=None,
                   help="rebuild the chain with this many steps (default: the README's 100)")
    args = p.parse_args()
    torch.set_num_threads(1)
    print("| problem | seeds | converged | converged but over 2/255 | worst max abs x0 - serial | "
          "rounds (mean / max) | shadow restarts | largest deviation the shadow measured (no restart) |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in args.kinds.split(","):
        worst, rounds, over, conv, restarts, deviation = 0.0, [], 0, 0, [], float("nan")
        for seed in range(args.seeds):
            eta = 0.0 if (args.eta0 and kind != "DDRM") else None
            model, chain, x_T = dq.testing.readme_problem(kind, seed, eta=eta)
            if args.steps is not None:
                chain = with_steps(chain, args.steps)
            gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
            serial = dq.sample_serial(model, chain, x_T, generator=gen())
            kw = {} if args.tol is None else dict(tol=args.tol)
            res = dq.solve(model, chain, x_T, generator=gen(), window=args.window,
                           options=dq.SolveOptions(serial_shadow=not args.no_shadow), **kw)
            err = (res.x0 - serial).abs().max().item()
            conv += res.converged
            over += bool(res.converged and err >= 2 / 255)
            worst = max(worst, err)
            rounds.append(res.iterations)
            if res.stats.serial_mismatch is not None:
                restarts.append(res.stats.serial_mismatch)
            d = res.stats.shadow_deviation      # noise units, NaN when nothing was compared
            if res.stats.serial_mismatch is None and not math.isnan(d) and \
                    (math.isnan(deviation) or d > deviation):
                deviation = d
        name = f"readme-{kind}" + (" η 0" if args.eta0 and kind != "DDRM" else "") + \
            (f", window {args.window}" if args.window else "") + \
            (", no shadow" if args.no_shadow else "") + (f", tol {args.tol:g}" if args.tol is not None else "") + \
            (f", S = {args.steps}" if args.steps is not None else "")
        if args.no_shadow or args.tol == 0:
            shadow = "off | off"
        else:
            shadow = f"{len(restarts)}" + (f" (at steps {min(restarts)}-{max(restarts)})" if restarts else "") \
                + " | " + ("–" if math.isnan(deviation) else f"{deviation:.1e}")
        print(f"| {name} | {args.seeds} | {conv} | {over} | {worst:.1e} | "
              f"{sum(rounds) / len(rounds):.1f} / {max(rounds)} | {shadow} |", flush=True)


if __name__ == "__main__":
    main()
