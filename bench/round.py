"""Time the fused solver round (deqir_fast/ops/fused_round.py) on each backend.

    OMP_NUM_THREADS=1 python bench/round.py                  # CPU: native vs the PyTorch reference
    OMP_NUM_THREADS=1 python bench/round.py --solver-round   # + a whole solver round, model excluded
    python bench/round.py --memory                           # peak memory, S=1000 3x256x256 B=1
    python bench/round.py --device cuda --json out.json      # GPU: torch vs native CUDA vs Triton

1. The fused round alone (no model): S steps of [B, C, H, W] float32 with noise, ȳ and a
   per-class J, for DDIM (η = 0.5), DDRM (σ_y = 0.05) and DDNM+ on 4x super-resolution's
   singular values. Medians over --repeats, ratios measured in the same run. On CUDA it
   also reports the achieved bandwidth (bytes the round must move / time) against a
   measured device-to-device copy.
2. --solver-round: ``fixed_point_solve`` rounds (inputs, model term, secant refit, the
   round, the residual read-back, the update and freeze bookkeeping) with a model whose
   own time is measured and subtracted (it is an elementwise stand-in, with an identity
   basis so the operator transforms cost nothing): Picard and triangular Anderson
   (history 4, its ring's Gram and mix kernels native too). Steady state: the median
   over rounds 2..--rounds of repeated solves (round 1 allocates the history).
3. --overhead (CUDA): the solver's own time per round as a fraction of one batched
   model call, on a randomly initialised diffusers UNet2DModel at 3x256x256 (no download;
   its size is printed) with S=--overhead-steps steps in one window: rounds of
   ``fixed_point_solve`` (DDIM eta 0.5 and DDRM inpainting, Picard, secant J) timed with
   and without the model (model time measured per call, synchronised), after a warm-up
   solve of the same rounds whose per-round overheads are printed apart (one-off costs
   such as a Triton compile show there, not in the table).
4. --graphs (CUDA): ms per round of check_every=k rounds, eager against CUDA-graph replay
   (``solve(..., options=SolveOptions(check_every=k, cuda_graph=True))``), on the Gaussian-mixture denoiser.
5. --memory: in a fresh process per configuration, the peak resident memory added by a
   solve (``ru_maxrss`` after minus before; every input, the model and its output
   included) at S=1000, 3x256x256, B=1, float32, in units of the stacked state
   (S x 3x256x256 x 4 bytes = 786 MB). Also checks that no [S, 1, C, H, W] coefficient
   tensor was materialised.
Check ``uptime`` first: time only when the 1-minute load is below 1.3.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import median_time  # noqa: E402

import deqir_fast as dq  # noqa: E402
from deqir_fast import operators as ops  # noqa: E402
from deqir_fast.ops import backends  # noqa: E402
from deqir_fast.ops.fused_round import fused_round, step_table  # noqa: E402

SCHED = dq.Schedule.linear(1000)


def round_inputs(sampler, S, B, shape, device, dtype=torch.float32, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    op = ops.SuperResolution(4, shape)
    ts = dq.timesteps(SCHED, S)
    y = op.A(torch.rand((B, *shape), generator=gen, dtype=torch.float64) * 2 - 1)
    chain = {"ddim": lambda: dq.DDIM(SCHED, ts, eta=0.5),
             "ddrm": lambda: dq.DDRM(SCHED, ts, operator=op, y=y, sigma_y=0.05),
             "ddnm": lambda: dq.DDNM(SCHED, ts, operator=op, y=y, sigma_y=0.05, eta=0.5)}[sampler]()
    spec = chain.kernel_spec()
    rnd = lambda *s: torch.randn(s, generator=gen, dtype=dtype).to(device)  # noqa: E731
    args = dict(
        sampler=sampler, table=step_table(spec).to(device), E=rnd(S, B, *shape), U=rnd(S, B, *shape),
        x_last=rnd(B, *shape), scale=(torch.rand(S, generator=gen, dtype=torch.float64) + 0.5).to(device),
        s=None if spec.singulars is None else spec.singulars.to(device=device, dtype=dtype).expand(shape).contiguous(),
        ybar=None if not spec.uses_y else op.Ut(y.to(dtype)).to(device),
        noise=rnd(S, B, *shape) if spec.uses_noise else None,
        slopes=(torch.rand((S, B, spec.num_classes), generator=gen, dtype=dtype)).to(device))
    return args


def bytes_moved(a):
    """What the round must move at least: E, U and the noise read once, the states
    written once, plus s and ȳ (one item each)."""
    per = a["E"].element_size()
    n = a["E"].numel()
    total = n * per * (3 + (a["noise"] is not None))
    for k in ("s", "ybar", "x_last"):
        if a[k] is not None:
            total += a[k].numel() * per
    return total


def copy_bandwidth(device, nbytes, repeats, sync):
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    t = median_time(lambda: y.copy_(x), repeats, sync)
    return 2 * x.numel() * 4 / t


def bench_fused(args, device, out_rows):
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    S, B, C, H, W = (int(v) for v in args.shape.split("x"))
    names = ["torch", "native"] + (["triton"] if device.type == "cuda" else [])
    ok = {n: backends.available(device)[n][0] for n in names}
    bw_copy = None
    print(f"\n### Fused round, S={S}, B={B}, {C}x{H}x{W}, float32, {device} "
          f"(OMP threads {torch.get_num_threads()})\n")
    head = "| sampler | " + " | ".join(f"{n} ms" for n in names) + " | torch/native |"
    if device.type == "cuda":
        head += " torch/triton | native GB/s | triton GB/s | copy GB/s |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for sampler in ("ddim", "ddrm", "ddnm"):
        a = round_inputs(sampler, S, B, (C, H, W), device)
        call = lambda backend: fused_round(**a, backend=backend)  # noqa: E731
        ref = call("torch")
        t, err = {}, {}
        for n in names:
            if not ok[n]:
                continue
            out = call(n)
            err[n] = float((out[0] - ref[0]).abs().max())
            t[n] = median_time(lambda: call(n), args.repeats, sync)
        row = {"sampler": sampler, "S": S, "B": B, "shape": [C, H, W], "device": str(device),
               "threads": torch.get_num_threads(), "seconds": t, "max_abs_diff_vs_torch": err}
        cells = [f"{t[n] * 1e3:.2f}" if n in t else "-" for n in names]
        ratio = f"{t['torch'] / t['native']:.1f}x" if "native" in t else "-"
        line = f"| {sampler} | " + " | ".join(cells) + f" | {ratio} |"
        if device.type == "cuda":
            nbytes = bytes_moved(a)
            bw_copy = bw_copy or copy_bandwidth(device, max(nbytes // 2, 1 << 26), args.repeats, sync)
            gbs = {n: nbytes / t[n] / 1e9 for n in t}
            row.update(bytes=nbytes, gbps=gbs, copy_gbps=bw_copy / 1e9,
                       fraction_of_copy={n: gbs[n] * 1e9 / bw_copy for n in gbs})
            line += (f" {t['torch'] / t['triton']:.1f}x |" if "triton" in t else " - |")
            line += "".join(f" {gbs[n]:.0f} ({gbs[n] * 1e9 / bw_copy:.0%}) |" if n in gbs else " - |"
                            for n in ("native", "triton"))
            line += f" {bw_copy / 1e9:.0f} |"
        print(line)
        out_rows.append(row)


class TimedModel:
    """An elementwise stand-in for the denoiser whose own time is accumulated, so that
    it can be subtracted from the round."""

    def __init__(self, sync):
        self.seconds = 0.0
        self.sync = sync or (lambda: None)

    def __call__(self, x, t):
        self.sync()
        t0 = time.perf_counter()
        out = torch.tanh(x) * 0.5
        self.sync()
        self.seconds += time.perf_counter() - t0
        return out


def bench_solver_round(args, device, out_rows):
    from deqir_fast.api import _prepare
    from deqir_fast.solvers import fixed_point_solve
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    S, B, C, H, W = (int(v) for v in args.shape.split("x"))
    shape = (C, H, W)
    print(f"\n### Solver round without the model, S={S}, B={B}, {C}x{H}x{W}, float32, {device}\n")
    print("| chain | solver | torch ms/round | native ms/round | torch/native |")
    print("|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    mask = (torch.rand((H, W), generator=gen) > 0.5).float()
    op = ops.Inpainting(mask)                                # pixel basis: V = I, free
    y = op.A(torch.rand((B, *shape), generator=gen) * 2 - 1)
    ts = dq.timesteps(SCHED, S)
    chains = {"ddim eta=0.5": dq.DDIM(SCHED, ts, eta=0.5),
              "ddrm inpaint": dq.DDRM(SCHED, ts, operator=op, y=y.to(device), sigma_y=0.05)}
    x_T = torch.randn((B, *shape), generator=gen).to(device)
    rounds = args.rounds
    for cname, chain in chains.items():
        for solver in ("picard", "triangular_anderson"):
            per = {}
            for backend in ("torch", "native"):
                if not backends.available(device)[backend][0]:
                    continue
                os.environ["DEQIR_FAST_BACKEND"] = backend
                backends.reset()
                times = []
                for rep in range(args.repeats + 1):
                    model = TimedModel(sync)
                    system, _ = _prepare(model, chain, x_T, None, torch.Generator(device=device).manual_seed(1))
                    X = torch.randn((S, B, *shape), generator=torch.Generator().manual_seed(2)).to(device)
                    marks = []                 # (wall, model seconds) at the end of each round

                    def mark(info, model=model):
                        if sync:
                            sync()
                        marks.append((time.perf_counter(), model.seconds))
                    fixed_point_solve(system, X, solver=solver, tol=0.0, max_iter=rounds, callback=mark)
                    if rep:                    # the first solve warms up
                        # steady state: rounds 2.. (round 1 allocates the history and the
                        # secant's buffers), each minus the model's own time
                        times += [(t1 - t0) - (m1 - m0) for (t0, m0), (t1, m1) in zip(marks[:-1], marks[1:])]
                times.sort()
                per[backend] = times[len(times) // 2]
            os.environ.pop("DEQIR_FAST_BACKEND", None)
            backends.reset()
            ratio = f"{per['torch'] / per['native']:.1f}x" if "native" in per else "-"
            print(f"| {cname} | {solver} | {per['torch'] * 1e3:.1f} | "
                  f"{per.get('native', float('nan')) * 1e3:.1f} | {ratio} |")
            out_rows.append({"what": "solver_round", "chain": cname, "solver": solver, "S": S, "B": B,
                             "shape": list(shape), "rounds": rounds, "seconds_per_round": per})


# -- memory -------------------------------------------------------------------------------
MEMORY_CHILD = r"""
import os, resource, sys, json, torch
import deqir_fast as dq
from deqir_fast import operators as ops
from deqir_fast.api import _prepare
from deqir_fast.solvers import SolveOptions, fixed_point_solve
S, solver, kind, rounds, lin = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
hd = None if sys.argv[6] == "-" else getattr(torch, sys.argv[6])
shape = (3, 256, 256)
sched = dq.Schedule.linear(1000)
ts = dq.timesteps(sched, S)
gen = torch.Generator().manual_seed(0)
if kind == "ddrm":
    op = ops.Inpainting((torch.rand((256, 256), generator=gen) > 0.5).float())
    chain = dq.DDRM(sched, ts, operator=op, y=op.A(torch.rand((1, *shape), generator=gen)), sigma_y=0.05)
else:
    chain = dq.DDIM(sched, ts, eta=0.0)
model = lambda x, t: x.mul(0.5)
x_T = torch.randn((1, *shape), generator=gen)
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
system, noise = _prepare(model, chain, x_T, None, gen)
X = torch.randn((S, 1, *shape), generator=gen)
import gc; gc.collect()
before = rss()          # inputs (x_T, the noise draws, X) are counted in 'inputs' below
fixed_point_solve(system, X, solver=solver, tol=0.0, max_iter=rounds, linearize=lin,
                  options=SolveOptions(history=4, history_dtype=hd))
peak = rss() - before
state = X.numel() * 4
print(json.dumps({"S": S, "solver": solver, "chain": kind, "rounds": rounds, "linearize": lin,
                  "history_dtype": sys.argv[6],
                  "peak_added_bytes": peak, "stacked_state_bytes": state,
                  "peak_in_states": peak / state,
                  "inputs_in_states": (X.numel() + (0 if noise is None else noise.numel())) / X.numel(),
                  "coefficients_materialized": system.coeffs.materialized,
                  "backend": os.environ.get("DEQIR_FAST_BACKEND", "auto")}))
"""


# (chain, solver, linearize, rounds, backend, history dtype): Anderson needs history + 2
# rounds to fill its ring; "none" isolates the secant's buffers (2 persistent states, ~4
# transient); "bfloat16": the history as 16-bit differences (ops/anderson.DifferenceRing).
MEMORY_CASES = [(kind, solver, lin, 2 if solver == "picard" else 6, backend, hd)
                for kind in ("ddim", "ddrm") for solver in ("picard", "triangular_anderson")
                for lin in ("secant", "none") for backend in ("torch", "native")
                for hd in (("-", "bfloat16") if solver != "picard" else ("-",))]


def bench_memory(args, out_rows):
    S = args.memory_steps
    print(f"\n### Peak memory added by a solve, S={S}, B=1, 3x256x256, float32 "
          f"(unit: the stacked state, {S * 3 * 256 * 256 * 4 / 1e6:.0f} MB)\n")
    print("| chain | solver | J | backend | history dtype | rounds | peak added (states) | inputs (states) | P/Q/R materialised |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, solver, lin, rounds, backend, hd in MEMORY_CASES:
        if args.memory_only and not set(args.memory_only.split(",")) <= {kind, solver, lin, backend, hd}:
            continue
        if True:
            if True:
                env = dict(os.environ, DEQIR_FAST_BACKEND=backend, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
                proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(S), solver, kind, str(rounds), lin, hd],
                                      env=env, capture_output=True, text=True, timeout=3600)
                if proc.returncode != 0:
                    print(f"| {kind} | {solver} | {backend} | failed: {proc.stderr.strip().splitlines()[-1:]} |")
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                out_rows.append(dict(r, what="memory"))
                print(f"| {kind} | {solver} | {lin} | {backend} | {'state' if hd == '-' else hd} | {rounds} | {r['peak_in_states']:.2f} | "
                      f"{r['inputs_in_states']:.0f} | {r['coefficients_materialized']} |")


def unet_256(device, dtype=torch.float32):
    """A DDPM-256-like UNet2DModel (randomly initialised: timing only) on ``device``."""
    from diffusers import UNet2DModel
    net = UNet2DModel(sample_size=256, in_channels=3, out_channels=3, layers_per_block=2,
                      block_out_channels=(64, 128, 256, 256, 512, 512),
                      down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4)
    net = net.to(device=device, dtype=dtype).eval()

    def eps(x, t):
        return net(x, t).sample
    return eps, sum(p.numel() for p in net.parameters())


def bench_overhead(args, device, out_rows):
    from deqir_fast.api import _prepare
    from deqir_fast.solvers import fixed_point_solve
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    S = args.overhead_steps
    shape = (3, 256, 256)
    eps, params = unet_256(device)
    x = torch.randn((S, *shape), device=device)
    t = torch.full((S,), 500, device=device, dtype=torch.long)
    with torch.no_grad():
        t_model = median_time(lambda: eps(x, t), args.repeats, sync)
    print(f"\n### Solver overhead per round, S={S}, B=1, 3x256x256, float32, {device}: UNet "
          f"{params / 1e6:.1f}M parameters, one batched call on {S} images {t_model * 1e3:.1f} ms\n")
    print("| chain | backend | round ms (with model) | model ms | overhead ms | overhead / model call |")
    print("|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    op = ops.Inpainting((torch.rand((256, 256), generator=gen) > 0.5).float())
    y = op.A(torch.rand((1, *shape), generator=gen) * 2 - 1).to(device)
    ts = dq.timesteps(SCHED, S)
    chains = {"ddim eta=0.5": dq.DDIM(SCHED, ts, eta=0.5),
              "ddrm inpaint": dq.DDRM(SCHED, ts, operator=op, y=y, sigma_y=0.05)}
    for cname, chain in chains.items():
        for backend in ("torch", "native", "triton"):
            if not backends.available(device)[backend][0]:
                continue
            os.environ["DEQIR_FAST_BACKEND"] = backend
            backends.reset()
            timed = _Timed(eps, sync)
            with torch.no_grad():
                system, _ = _prepare(timed, chain, torch.randn((1, *shape), generator=gen).to(device),
                                     None, torch.Generator(device=device).manual_seed(1))
                X0 = torch.randn((S, 1, *shape), generator=gen).to(device)
                marks = []

                def mark(info):
                    sync()
                    marks.append((time.perf_counter(), timed.seconds))
                # A first solve of the same rounds warms up kernel compilation, validation
                # and the allocator; its per-round overheads are printed apart, so a
                # one-off cost (a Triton compile, a disk-cache load) is told from a cost
                # paid every round. The second solve is the one timed.
                fixed_point_solve(system, X0.clone(), solver="picard", tol=0.0,
                                  max_iter=args.rounds, callback=mark)
                first = [(t1 - t0) - (m1 - m0) for (t0, m0), (t1, m1) in zip(marks[:-1], marks[1:])]
                marks = []
                fixed_point_solve(system, X0.clone(), solver="picard", tol=0.0,
                                  max_iter=args.rounds, callback=mark)
            print(f"<!-- {cname} {backend}: first solve, overhead per round ms: "
                  f"{', '.join(f'{v * 1e3:.2f}' for v in first)} -->")
            walls = [t1 - t0 for (t0, _), (t1, _) in zip(marks[:-1], marks[1:])]
            models = [m1 - m0 for (_, m0), (_, m1) in zip(marks[:-1], marks[1:])]
            over = sorted(w - m for w, m in zip(walls, models))[len(walls) // 2]
            wall = sorted(walls)[len(walls) // 2]
            mod = sorted(models)[len(models) // 2]
            print(f"| {cname} | {backend} | {wall * 1e3:.1f} | {mod * 1e3:.1f} | {over * 1e3:.2f} | "
                  f"{over / t_model:.1%} |")
            out_rows.append({"what": "overhead", "chain": cname, "backend": backend, "S": S,
                             "first_solve_overheads_s": first,
                             "round_s": wall, "model_in_round_s": mod, "overhead_s": over,
                             "model_call_s": t_model, "overhead_fraction": over / t_model,
                             "unet_params": params})
    os.environ.pop("DEQIR_FAST_BACKEND", None)
    backends.reset()


class _Timed:
    """A model wrapper that accumulates its own synchronised time."""

    def __init__(self, fn, sync):
        self.fn, self.sync, self.seconds = fn, sync, 0.0

    def __call__(self, x, t):
        self.sync()
        t0 = time.perf_counter()
        out = self.fn(x, t)
        self.sync()
        self.seconds += time.perf_counter() - t0
        return out


def bench_graphs(args, device, out_rows):
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    S, k = args.graph_steps, 10
    shape = (3, 32, 32)
    model = dq.testing.GaussianMixtureDenoiser(SCHED, shape, dtype=torch.float32).to(device)
    chain = dq.DDIM(SCHED, dq.timesteps(SCHED, S), eta=0.5)
    x_T = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0)).to(device)
    noise = torch.randn((S, 1, *shape), generator=torch.Generator().manual_seed(1)).to(device)
    print(f"\n### CUDA-graph replay against eager, DDIM-{S} eta=0.5, 3x32x32, GMM denoiser, "
          f"check_every={k}, Picard\n")
    print("| J | backend | eager ms/round | graph ms/round | eager/graph | replayed rounds | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for lin in ("none", "secant"):
        for backend in ("torch", "native", "triton"):
            if not backends.available(device)[backend][0]:
                continue
            os.environ["DEQIR_FAST_BACKEND"] = backend
            backends.reset()
            kw = dict(noise=noise, solver="picard", linearize=lin, tol=0.0)
            runs = {}
            for graph in (False, True):
                opts = dq.SolveOptions(check_every=k, cuda_graph=graph)
                res = dq.solve(model, chain, x_T, options=opts, **kw)      # warm-up
                t = median_time(lambda: dq.solve(model, chain, x_T, options=opts, **kw), args.repeats, sync)
                runs[graph] = (t / res.iterations, res)
            diff = float((runs[True][1].states - runs[False][1].states).abs().max())
            g = runs[True][1].stats
            print(f"| {lin} | {backend} | {runs[False][0] * 1e3:.2f} | {runs[True][0] * 1e3:.2f} | "
                  f"{runs[False][0] / runs[True][0]:.2f}x | {g.graph_rounds} | {diff:.1e} |"
                  + (f" capture failed: {g.graph_error}" if g.graph_error else ""))
            out_rows.append({"what": "cuda_graph", "linearize": lin, "backend": backend, "S": S,
                             "check_every": k, "eager_s_per_round": runs[False][0],
                             "graph_s_per_round": runs[True][0], "graph_rounds": g.graph_rounds,
                             "graph_error": g.graph_error, "max_abs_diff": diff})
    os.environ.pop("DEQIR_FAST_BACKEND", None)
    backends.reset()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", default="100x1x3x64x64", help="S x B x C x H x W")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--solver-round", action="store_true")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--memory", action="store_true")
    p.add_argument("--overhead", action="store_true")
    p.add_argument("--overhead-steps", type=int, default=100)
    p.add_argument("--graphs", action="store_true")
    p.add_argument("--graph-steps", type=int, default=100)
    p.add_argument("--memory-steps", type=int, default=1000)
    p.add_argument("--memory-only", default="", help="only the memory rows with all of these "
                   "(comma-separated) chain, solver, J, backend or history dtype, e.g. none,bfloat16")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    device = torch.device(args.device)
    print(f"load average {os.getloadavg()[0]:.2f}; torch {torch.__version__}; "
          f"backends on {device}: {backends.available(device)}")
    rows = []
    if args.memory:
        bench_memory(args, rows)
    elif args.overhead:
        bench_overhead(args, device, rows)
    elif args.graphs:
        bench_graphs(args, device, rows)
    else:
        bench_fused(args, device, rows)
        if args.solver_round:
            bench_solver_round(args, device, rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
