"""Gradient benchmarks on the bundled model (issue: implicit gradients).

    OMP_NUM_THREADS=1 python bench/gradients.py cost --steps 20,100
    OMP_NUM_THREADS=1 python bench/gradients.py optimize --images 4 --opt-steps 10

``cost``: backward cost of dL/dx_T (L = ||x0 - ground truth||²) for DDIM: the implicit
adjoint (rounds of one batched VJP through a graph rebuilt for the round's window), with
the whole chain as the window and with a window of S/10 steps, against autograd through
the serial chain — rounds, model evaluations, seconds and the peak resident memory each
run adds (each measured in a fresh process).
DDIM because x0 depends on x_T there: a stochastic chain (DDRM with eta 0.85) forgets
x_T geometrically (about sqrt(1 - eta²) = 0.53 per step), and dL/dx_T underflows.
``optimize``: initialization optimization with the measurement-consistency loss on the
held-out images (DDRM with ``--eta``, default 0: deterministic): PSNR before and after,
and solver rounds of warm vs cold solves.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

import deqir_fast as dq
from deqir_fast.models import bundled_model, heldout_images
from deqir_fast.tasks import build_operator


def problem(steps, images=1, task="sr2", sigma_y=0.0, eta=0.0, kind="ddrm"):
    truth = heldout_images()[:images]
    sched = dq.Schedule.linear(1000)
    ts = dq.timesteps(sched, steps)
    if kind == "ddim":
        chain = dq.DDIM(sched, ts)
    else:
        op = build_operator(task, truth.shape[1:])
        y = op.A(truth)
        y = y + sigma_y * torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
        chain = dq.DDRM(sched, ts, operator=op, y=y, sigma_y=sigma_y, eta=eta)
    x_T = torch.randn(truth.shape, generator=torch.Generator().manual_seed(1))
    return chain, x_T, truth


def one_cost_run(mode: str, steps: int) -> dict:
    """Runs in a child process: one forward + backward, reports time and peak RSS."""
    model = bundled_model()
    chain, x_T, truth = problem(steps, kind="ddim")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"mode": mode, "steps": steps}
    t0 = time.perf_counter()
    if mode.startswith("ift"):  # parallel solve, then the adjoint in parallel rounds
        window = int(mode.split("window")[1]) if "window" in mode else None
        res = dq.solve(model, chain, x_T, generator=torch.Generator().manual_seed(2), window=window)
        t1 = time.perf_counter()
        g = dq.backward(res, 2 * (res.x0 - truth))
        grad, out["forward_rounds"], out["adjoint_rounds"] = g["x_T"], res.iterations, g["rounds"]
        out["adjoint_nfe"] = g["nfe"]
    else:                      # autograd through the serial chain
        x = x_T.clone().requires_grad_(True)
        x0 = dq.sample_serial(model, chain, x, generator=torch.Generator().manual_seed(2))
        t1 = time.perf_counter()
        (x0 - truth).pow(2).sum().backward()
        grad = x.grad
    out.update(forward_s=t1 - t0, backward_s=time.perf_counter() - t1, grad_norm=grad.norm().item(),
               peak_rss_mb=(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
    if mode.startswith("ift"):   # accuracy against autograd through the serial chain
        x = x_T.clone().requires_grad_(True)
        x0 = dq.sample_serial(model, chain, x, generator=torch.Generator().manual_seed(2))
        (x0 - truth).pow(2).sum().backward()
        out["rel_err"] = ((grad - x.grad).norm() / x.grad.norm()).item()
    return out


def cost(args):
    print("| S | gradient | forward rounds | adjoint rounds | adjoint model evals | forward s | backward s | peak RSS added MB | norm of dL/dx_T | rel. error vs autograd |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for steps in [int(s) for s in args.steps.split(",")]:
        for mode in ("ift", f"ift-window{max(steps // 10, 1)}", "autograd"):
            raw = subprocess.run([sys.executable, __file__, "_cost", mode, str(steps)],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(raw.strip().splitlines()[-1])
            print(f"| {steps} | {mode} | {r.get('forward_rounds', steps)} | {r.get('adjoint_rounds', '-')} | "
                  f"{r.get('adjoint_nfe', steps)} | "
                  f"{r['forward_s']:.1f} | {r['backward_s']:.1f} | {r['peak_rss_mb']:.0f} | "
                  f"{r['grad_norm']:.4e} | {r.get('rel_err', float('nan')):.1e} |", flush=True)


def optimize(args):
    from deqir_fast.cli import quality
    model = bundled_model()
    chain, x_T, truth = problem(args.steps, args.images, args.task, args.sigma_y, args.eta)
    gen = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    before = dq.solve(model, chain, x_T, generator=gen())
    rows = {}
    for warm in (True, False):
        t0 = time.perf_counter()
        opt = dq.optimize_init(model, chain, x_T, loss="measurement", steps=args.opt_steps,
                               lr=args.lr, generator=gen(), warm_start=warm)
        rows[warm] = (opt, time.perf_counter() - t0)
    opt = rows[True][0]
    consistency = lambda x0: float((chain.operator.A(x0) - chain.y).pow(2).sum())  # noqa: E731
    print(f"task {args.task}, sigma_y {args.sigma_y}, DDRM-{args.steps} eta {args.eta}, {args.images} held-out "
          f"images, Adam lr {args.lr}, {args.opt_steps} steps")
    print(f"| | PSNR | SSIM | ||A x0 - y||² |")
    print("|---|---|---|---|")
    print(f"| before | {quality(before.x0, truth)[0]:.2f} | {quality(before.x0, truth)[1]:.3f} | "
          f"{consistency(before.x0):.4g} |")
    print(f"| after | {quality(opt.x0, truth)[0]:.2f} | {quality(opt.x0, truth)[1]:.3f} | "
          f"{consistency(opt.x0):.4g} |")
    for warm, (o, secs) in rows.items():
        print(f"{'warm' if warm else 'cold'} starts: rounds per solve {o.rounds}, "
              f"total {sum(o.rounds)}, {secs:.1f} s")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "_cost":
        print(json.dumps(one_cost_run(sys.argv[2], int(sys.argv[3]))))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cost")
    c.add_argument("--steps", default="20,100")
    o = sub.add_parser("optimize")
    o.add_argument("--steps", type=int, default=20)
    o.add_argument("--images", type=int, default=4)
    o.add_argument("--task", default="sr4")
    o.add_argument("--sigma_y", type=float, default=0.0)
    o.add_argument("--eta", type=float, default=0.0)
    o.add_argument("--opt-steps", type=int, default=10)
    o.add_argument("--lr", type=float, default=0.05)
    args = p.parse_args()
    cost(args) if args.cmd == "cost" else optimize(args)


if __name__ == "__main__":
    main()
