"""window="auto" against serial and fixed windows on model cost curves (issue #24).

    OMP_NUM_THREADS=1 python bench/planner.py                    # the cost-model table
    OMP_NUM_THREADS=1 python bench/planner.py --real             # the bundled UNet, no sleep
    OMP_NUM_THREADS=1 python bench/planner.py --advance          # a(W) at fixed windows
    OMP_NUM_THREADS=1 python bench/planner.py --simulated        # the curves on a simulated clock
    python bench/planner.py --unet-cost --device cuda --chains DDIM,DDRM-inp   # (gpu_check.sh)

The cost model wraps the Gaussian-mixture denoiser (3x32x32, its call costs well under a
millisecond here) so that a call on n images first sleeps t(n) = a + b * max(0, n - k):

- flat: a = 10 ms, b = 0 (a small model on a big GPU: any batch costs one call);
- linear: a = 1 ms, b = 4 ms, k = 0 (a CPU: every image costs);
- knee: a = 10 ms, b = 3.2 ms, k = 3. The H200 figures of issue #24: a 109M-parameter
  UNet at 3x256^2 took 320 ms on 100 images, 3.2 ms an image; the single-image call
  (10 ms) is an assumption (no GPU was lent to measure it), and k follows from
  a + b (100 - k) = 320 ms.

For each curve and chain (DDIM, DDPM, DDRM inpainting, DDNM SR x2; S = 100, B = 1) it
times the serial sampler, fixed windows 5, 10, 20, 50 and the whole chain, and
``window="auto"``: "auto" after a first planned solve of the same model (the cost curve
cached for the process, as a user's second call finds it) and "auto, first" (the first
solve of the process: it probes t(B)). Medians of ``--repeats`` runs, all in one process.
``--advance``: the front's mean advance per round at fixed windows on the bundled model,
and the c of a(W) = c W^0.5 it implies (the planner's ADVANCE_EXPONENT). ``--later N``:
N more planned solves after the second (what the planner learns across solves).
``--simulated``: the same curves on a simulated clock (the model's calls advance it by
t(n), nothing else costs): exact, machine-independent, seconds to run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import deqir_fast as dq
from deqir_fast.calibration import chains
from deqir_fast.schedules import Schedule
from deqir_fast.solvers.planner import clear_cost_curves

HERE = Path(__file__).resolve().parent
CURVES = {"flat": (10e-3, 0.0, 0), "linear": (1e-3, 4e-3, 0), "knee": (10e-3, 3.2e-3, 3)}
CHAINS = ("DDIM", "DDPM", "DDRM-inp", "DDNM-sr2")
WINDOWS = (5, 10, 20, 50, None)


class CostModel(torch.nn.Module):
    """``model`` whose call on n images first sleeps a + b * max(0, n - k) seconds."""

    def __init__(self, model, a: float, b: float, k: int, scale: float = 1.0):
        super().__init__()
        self.model, self.a, self.b, self.k, self.scale = model, a, b, k, scale

    def cost(self, n: int) -> float:
        return self.scale * (self.a + self.b * max(0, n - self.k))

    def forward(self, x, t):
        time.sleep(self.cost(x.shape[0]))
        return self.model(x, t)


class SimulatedCost(torch.nn.Module):
    """``model`` whose call on n images advances a simulated clock by a + b max(0, n - k)
    seconds and costs nothing else: the planner (``Planner(clock=self.clock)``) then sees
    an exact curve, and the table is the same on every machine."""

    def __init__(self, model, a: float, b: float, k: int):
        super().__init__()
        self.model, self.a, self.b, self.k, self.now = model, a, b, k, 0.0

    def clock(self) -> float:
        return self.now

    def forward(self, x, t):
        self.now += self.a + self.b * max(0, x.shape[0] - self.k)
        return self.model(x, t)


def problem(steps: int):
    sched = Schedule.linear(1000, beta_start=1e-4, beta_end=0.02)
    base = dq.testing.GaussianMixtureDenoiser(sched, (3, 32, 32), dtype=torch.float32)
    truth = base.means[:1].detach().clamp(-1, 1)
    x_T = torch.randn((1, 3, 32, 32), generator=torch.Generator().manual_seed(100))
    return base, dict(chains(sched, steps, truth)), x_T


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run_curves(args):
    base, all_chains, x_T = problem(args.steps)
    gen = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    rows, plans = [], {}
    for curve in args.curves.split(","):
        a, b, k = CURVES[curve]
        for name in args.chains.split(","):
            chain = all_chains[name]
            model = CostModel(base, a, b, k, args.scale)
            times = {m: [] for m in ["serial"] + [f"w{w}" for w in WINDOWS] + ["auto", "auto, first"]}
            info = {}
            for rep in range(args.repeats):
                serial_s, serial = timed(lambda: dq.sample_serial(model, chain, x_T, generator=gen()))
                times["serial"].append(serial_s)
                for w in WINDOWS:
                    res = dq.solve(model, chain, x_T, generator=gen(), window=w)
                    times[f"w{w}"].append(res.seconds)
                    info[f"w{w}"] = (res.iterations, res.nfe)
                clear_cost_curves()
                first = dq.solve(model, chain, x_T, generator=gen(), window="auto")
                times["auto, first"].append(first.seconds)
                res = dq.solve(model, chain, x_T, generator=gen(), window="auto")
                times["auto"].append(res.seconds)
                for k in range(args.later):          # the solves after: what they learned
                    later = dq.solve(model, chain, x_T, generator=gen(), window="auto")
                    print(f"  {curve} {name} planned solve {k + 3}: {later.seconds:.3f} s, "
                          f"{later.iterations} rounds, windows {later.stats.plan.windows}",
                          flush=True)
                err = float((res.x0 - serial).abs().max())
                info["auto"] = (res.iterations, res.nfe, res.converged, err)
                plans[f"{curve} {name}"] = dict(
                    curve={int(n): t for n, t in res.stats.plan.curve.items()},
                    windows=res.stats.plan.windows, serial_from=res.stats.plan.serial_from,
                    projected=res.stats.plan.projected, measured=res.stats.plan.measured,
                    advance_scale=res.stats.plan.advance_scale)
            med = {m: statistics.median(v) for m, v in times.items()}
            fixed = {m: v for m, v in med.items() if m not in ("auto", "auto, first")}
            best = min(fixed, key=fixed.get)
            row = dict(curve=curve, chain=name, **{m: med[m] for m in med}, best=best,
                       auto_vs_best=med["auto"] / fixed[best], auto_vs_serial=med["auto"] / med["serial"],
                       first_vs_serial=med["auto, first"] / med["serial"],
                       auto_rounds=info["auto"][0], auto_converged=info["auto"][2],
                       auto_err=info["auto"][3], windows_used=sorted(set(plans[f"{curve} {name}"]["windows"])))
            rows.append(row)
            print_row(row, flush=True)
    return rows, plans


HEAD = ("| curve | chain | serial s | W=5 | W=10 | W=20 | W=50 | whole | auto | auto / best | "
        "auto / serial | first auto / serial | auto windows | auto rounds | auto max abs x0 - serial |")


def print_row(row, flush=False):
    m = ["serial"] + [f"w{w}" for w in WINDOWS] + ["auto"]
    cells = " | ".join(f"{row[k]:.3f}" for k in m)
    ws = row["windows_used"]
    used = "serial" if ws == [1] else ", ".join(str(w) for w in ws[:6]) + (" ..." if len(ws) > 6 else "")
    print(f"| {row['curve']} | {row['chain']} | {cells} | {row['auto_vs_best']:.3f} ({row['best']}) | "
          f"{row['auto_vs_serial']:.3f} | {row['first_vs_serial']:.3f} | {used} | {row['auto_rounds']} | "
          f"{row['auto_err']:.1e} |", flush=flush)


def plot(rows, plans, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curves = sorted({r["curve"] for r in rows}, key=list(CURVES).index)
    fig, axes = plt.subplots(2, len(curves), figsize=(5 * len(curves), 7.5), squeeze=False)
    for j, curve in enumerate(curves):
        ax = axes[0, j]
        for key, plan in plans.items():
            if key.startswith(curve + " "):
                ns = sorted(plan["curve"])
                ax.plot(ns, [1e3 * plan["curve"][n] for n in ns], "o-", label=key.split(" ", 1)[1])
        a, b, k = CURVES[curve]
        ns = list(range(1, 102))
        ax.plot(ns, [1e3 * (a + b * max(0, n - k)) for n in ns], "k:", label="model's sleep")
        ax.set(title=f"{curve}: measured t(n)", xlabel="images per call n", ylabel="ms")
        ax.legend(fontsize=7)
        ax = axes[1, j]
        for key, plan in plans.items():
            if key.startswith(curve + " "):
                ax.step(range(1, len(plan["windows"]) + 1), plan["windows"], where="post",
                        label=key.split(" ", 1)[1])
        ax.set(title=f"{curve}: window per round (1 = serial)", xlabel="round", ylabel="W",
               yscale="log")
        ax.legend(fontsize=7)
    fig.suptitle("window='auto' (bench/planner.py): the cost curve it measured and the windows "
                 "it chose, DDIM/DDPM/DDRM/DDNM-100, B=1", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def run_simulated(args):
    """The cost curves on a simulated clock: the model's calls are the only cost, so the
    numbers are exact (no sleep, no timing noise) and the same on every machine. Serial,
    the fixed windows, and four planned solves in a row (what a process learns)."""
    from deqir_fast.solvers.planner import Planner
    base, all_chains, x_T = problem(args.steps)
    gen = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    print("| curve | chain | serial | W=5 | W=10 | W=20 | W=50 | whole | best | planned solves 1-4 "
          "/ best |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for curve in args.curves.split(","):
        a, b, k = CURVES[curve]
        for name in args.chains.split(","):
            chain = all_chains[name]
            t = {"serial": args.steps * (a + b * max(0, 1 - k))}
            for w in WINDOWS:
                m = SimulatedCost(base, a, b, k)
                dq.solve(m, chain, x_T, generator=gen(), window=w)
                t[f"w{w}"] = m.now
            best = min(t, key=t.get)
            m, planned = SimulatedCost(base, a, b, k), []
            for _ in range(4):
                t0 = m.now
                dq.solve(m, chain, x_T, generator=gen(), window=Planner(clock=m.clock))
                planned.append((m.now - t0) / t[best])
            worst = max(worst, planned[1])
            cells = " | ".join(f"{1e3 * t[c]:.0f}" for c in ["serial"] + [f"w{w}" for w in WINDOWS])
            print(f"| {curve} | {name} | {cells} | {best} | "
                  f"{', '.join(f'{r:.2f}' for r in planned)} |", flush=True)
    print(f"\n(simulated ms) the second planned solve / best: worst {worst:.2f}")


class UNetCost(torch.nn.Module):
    """The trained ``model``'s answer at the cost of ``cost_eps`` (a 109M-parameter UNet at
    3x256x256, random weights: bench/round.py ``unet_256``) on as many images: the rounds
    are the trained model's, the wall time a big model's."""

    def __init__(self, model, cost_eps, device, max_images: int):
        super().__init__()
        self.model, self.cost_eps = model, cost_eps
        self.x = torch.randn((max_images, 3, 256, 256), generator=torch.Generator().manual_seed(0)).to(device)

    def forward(self, x, t):
        n = x.shape[0]
        with torch.no_grad():
            self.cost_eps(self.x[:n], t[:n])
        return self.model(x, t)


def serial_whole_auto(model, chain, x_T, gen, repeats: int, sync=lambda: None):
    """Median seconds of the serial sampler, the whole chain, the first planned solve of a
    process and the one after it, over ``repeats`` turns; and the last planned result and
    serial x0."""
    t = {"serial": [], "whole": [], "auto": [], "first": []}
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        serial = dq.sample_serial(model, chain, x_T, generator=gen())
        sync()
        t["serial"].append(time.perf_counter() - t0)
        t["whole"].append(dq.solve(model, chain, x_T, generator=gen()).seconds)
        clear_cost_curves()
        t["first"].append(dq.solve(model, chain, x_T, generator=gen(), window="auto").seconds)
        res = dq.solve(model, chain, x_T, generator=gen(), window="auto")
        t["auto"].append(res.seconds)
    return {k: statistics.median(v) for k, v in t.items()}, res, serial


def run_unet_cost(args):
    """Issue #24's GPU check: DDIM-100 and DDRM-100 on the bundled model at the cost of a
    109M UNet at 256^2: serial vs the whole chain vs window="auto" (first and warm)."""
    from round import unet_256
    from deqir_fast.calibration import load
    device = torch.device(args.device)
    model, schedule, images = load("bundled")
    model = model.to(device)
    eps, n_params = unet_256(device)
    truth = images[:1].float()
    x_T = torch.randn(truth.shape, generator=torch.Generator().manual_seed(100)).to(device)
    costly = UNetCost(model, eps, device, args.steps + 1)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = lambda: torch.Generator(device=device).manual_seed(2)  # noqa: E731
    rows = []
    print(f"UNet {n_params / 1e6:.0f}M params at 3x256x256 on {device}; S = {args.steps}, B = 1")
    print("| chain | serial s | whole chain s | auto s | first auto s | auto / serial | "
          "auto windows | auto rounds | max abs x0 - serial |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, chain in chains(schedule, args.steps, truth.to(device)):
        if name not in args.chains.split(","):
            continue
        m, res, serial = serial_whole_auto(costly, chain, x_T, gen, args.repeats, sync)
        plan = res.stats.plan
        err = float((res.x0 - serial).abs().max())
        rows.append(dict(chain=name, **m, windows=plan.windows, serial_from=plan.serial_from,
                         curve={str(n): v for n, v in plan.curve.items()}, rounds=res.iterations,
                         err=err, converged=res.converged))
        ws = sorted(set(plan.windows))
        print(f"| {name} | {m['serial']:.3f} | {m['whole']:.3f} | {m['auto']:.3f} | "
              f"{m['first']:.3f} | {m['auto'] / m['serial']:.3f} | "
              f"{'serial' if ws == [1] else ws[:8]} | {res.iterations} | {err:.1e} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=str(device), params=n_params, rows=rows),
                                              indent=1))


def run_real(args):
    """The bundled UNet on this CPU, no sleep: serial vs whole chain vs auto."""
    from deqir_fast.calibration import load
    model, schedule, images = load("bundled")
    truth = images[:1].float()
    x_T = torch.randn(truth.shape, generator=torch.Generator().manual_seed(100))
    gen = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    print("| chain | serial s | whole chain s | auto s | auto / serial | first auto / serial | auto windows |")
    print("|---|---|---|---|---|---|---|")
    for name, chain in chains(schedule, args.steps, truth):
        if name not in args.chains.split(","):
            continue
        m, res, _ = serial_whole_auto(model, chain, x_T, gen, args.repeats)
        ws = sorted(set(res.stats.plan.windows))
        print(f"| {name} | {m['serial']:.3f} | {m['whole']:.3f} | {m['auto']:.3f} | "
              f"{m['auto'] / m['serial']:.3f} | {m['first'] / m['serial']:.3f} | "
              f"{'serial' if ws == [1] else ws} |", flush=True)


def run_advance(args):
    """Mean advance per round at fixed windows (bundled model), and c = a / W^0.5."""
    from deqir_fast.calibration import load
    model, schedule, images = load("bundled")
    truth = images[:1].float()
    x_T = torch.randn(truth.shape, generator=torch.Generator().manual_seed(100))
    print("| chain | W | rounds | mean advance a(W) | c = a / W^0.5 |")
    print("|---|---|---|---|---|")
    for name, chain in chains(schedule, args.steps, truth):
        if name not in args.chains.split(","):
            continue
        for W in (2, 4, 8, 16, 32, 100):
            res = dq.solve(model, chain, x_T, generator=torch.Generator().manual_seed(2), window=W)
            adv = args.steps / res.iterations
            print(f"| {name} | {W} | {res.iterations} | {adv:.2f} | {adv / W ** 0.5:.2f} |", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--curves", default="flat,linear,knee")
    p.add_argument("--chains", default=",".join(CHAINS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scale", type=float, default=1.0, help="multiply every sleep by this")
    p.add_argument("--later", type=int, default=0,
                   help="time this many more planned solves after the second, each repeat")
    p.add_argument("--real", action="store_true")
    p.add_argument("--simulated", action="store_true")
    p.add_argument("--unet-cost", action="store_true",
                   help="the bundled model's rounds at a 109M UNet's cost (3x256^2; the GPU check)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="--unet-cost: write the rows here")
    p.add_argument("--advance", action="store_true")
    p.add_argument("--out", default=str(HERE / "results" / "planner"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.advance:
        return run_advance(args)
    if args.real:
        return run_real(args)
    if args.simulated:
        return run_simulated(args)
    if args.unet_cost:
        return run_unet_cost(args)
    print(f"S = {args.steps}, B = 1, medians of {args.repeats}, sleeps x{args.scale}; "
          f"torch {torch.__version__}, {sys.platform}\n")
    print(HEAD)
    print("|" + "---|" * (HEAD.count("|") - 1))
    rows, plans = run_curves(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "planner.json").write_text(json.dumps(dict(rows=rows, plans=plans), indent=1))
    try:
        plot(rows, plans, out / "planner.png")
    except ImportError:
        print("(matplotlib not installed: no plot)")
    worst_best = max(r["auto_vs_best"] for r in rows)
    worst_serial = max(r["auto_vs_serial"] for r in rows)
    print(f"\nauto / best fixed: worst {worst_best:.3f}; auto / serial: worst {worst_serial:.3f}")


if __name__ == "__main__":
    main()
