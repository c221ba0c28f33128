"""The ``deqir-fast`` command line (also ``python -m deqir_fast``).

    deqir-fast demo                     # restores bundled held-out images, serial vs parallel
    deqir-fast restore IN.png --task sr4 --out OUT.png [--simulate] [--serial]
    deqir-fast restore IN.png --task deblur_gauss --simulate --optimize-init 10

The maths never prints: progress reaches this module through callbacks.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import deqir_fast as dq

from .tasks import TASKS, build_operator, get_task

SAMPLERS = ("ddrm", "ddnm")


# -- helpers --------------------------------------------------------------------------
def make_chain(sampler: str, steps: int, op, y, sigma_y: float):
    sched = dq.Schedule.linear(1000, beta_start=1e-4, beta_end=0.02)
    ts = dq.timesteps(sched, steps)
    if sampler == "ddrm":
        return dq.DDRM(sched, ts, operator=op, y=y, sigma_y=sigma_y, eta=0.85, eta_b=1.0)
    if sampler == "ddnm":
        return dq.DDNM(sched, ts, operator=op, y=y, sigma_y=sigma_y, eta=0.0)
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")


def to_unit(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] tensor [C, H, W] -> [0, 1] HxWxC array for display and metrics."""
    return ((x.detach().float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy()


def quality(x: torch.Tensor, truth: torch.Tensor):
    """Mean PSNR and SSIM (scikit-image) over a batch, on the [0, 1] display range."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    psnr, ssim = [], []
    for a, b in zip(x, truth):
        a, b = to_unit(a), to_unit(b)
        psnr.append(peak_signal_noise_ratio(b, a, data_range=1.0))
        ssim.append(structural_similarity(b, a, data_range=1.0, channel_axis=-1, win_size=7))
    return float(np.mean(psnr)), float(np.mean(ssim))


def baseline(op, y: torch.Tensor, shape) -> torch.Tensor:
    """The simple baseline a restoration must beat: bicubic upsampling for
    super-resolution, the pseudo-inverse (zero fill, or y itself) otherwise."""
    factor = getattr(op, "factor", None)
    if factor is not None:
        return torch.nn.functional.interpolate(y, size=tuple(shape[1:]), mode="bicubic",
                                               align_corners=False)
    return op.pinv(y)


def degrade(task_name: str, truth: torch.Tensor, seed: int):
    task = get_task(task_name)
    op = build_operator(task_name, truth.shape[1:], seed)
    gen = torch.Generator().manual_seed(seed + 1)
    clean = op.A(truth)
    noise = torch.randn(clean.shape, generator=gen).to(clean)
    return op, clean + task.sigma_y * noise, task.sigma_y


def device_of(args) -> torch.device:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    return device


def generator(args, offset: int) -> torch.Generator:
    """A seeded generator on the run's device (noise is drawn where the state lives)."""
    return torch.Generator(device=device_of(args)).manual_seed(args.seed + offset)


def initial_noise(args, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(args.seed + 2)).to(device_of(args))


class RoundBar:
    """tqdm over solver rounds, fed by ``solve``'s callback."""

    def __init__(self, desc: str, total: int, quiet: bool):
        from tqdm.auto import tqdm
        self.bar = tqdm(total=total, desc=desc, leave=False, disable=quiet, unit="round")

    def __call__(self, info: dict) -> None:
        self.bar.update(1)
        lo, hi = info["window"]
        self.bar.set_postfix(frozen=lo, nfe=info["nfe"])

    def close(self):
        self.bar.close()


# -- demo -----------------------------------------------------------------------------
# Six tasks at 20 steps keep the demo near a minute on 2 CPU cores (measured 1.5 min for
# 13 tasks). Compressed sensing is left out: a random 25-50% of the DCT coefficients
# misses most of the low frequencies and DDRM-20 restores 11-14 dB (bench/RESULTS.md).
DEMO_TASKS = ("denoise", "inpaint_random", "inpaint_box", "sr4", "deblur_gauss", "colorize")


def run_demo(args) -> int:
    from tqdm.auto import tqdm

    from .models import bundled_model, heldout_images
    torch.manual_seed(args.seed)
    device = device_of(args)
    model = bundled_model(max_batch=args.max_batch).to(device)
    truth = heldout_images()[: args.images].to(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = tuple(truth.shape[1:])
    rows, pictures, traces = [], [], {}
    tasks = args.tasks.split(",") if args.tasks else list(DEMO_TASKS)
    for name in tasks:
        get_task(name)
    for name in tqdm(tasks, desc="tasks", disable=args.quiet):
        op, y, sigma_y = degrade(name, truth, args.seed)
        chain = make_chain(args.sampler, args.steps, op, y, sigma_y)
        x_T = initial_noise(args, truth.shape)
        t0 = time.perf_counter()
        serial = dq.sample_serial(model, chain, x_T, generator=generator(args, 3))
        t_serial = time.perf_counter() - t0
        bar = RoundBar(f"{name} parallel", args.steps, args.quiet)
        res = dq.solve(model, chain, x_T, generator=generator(args, 3),
                       solver=args.solver, tol=args.tol, callback=bar)
        bar.close()
        traces[name] = res.residuals
        base = baseline(op, y, shape)
        q_serial, q_par, q_base = quality(serial, truth), quality(res.x0, truth), quality(base, truth)
        rows.append(dict(task=name, sampler=args.sampler, steps=args.steps, rounds=res.iterations,
                         nfe=res.nfe, t_serial=t_serial, t_parallel=res.seconds,
                         psnr_serial=q_serial[0], psnr_parallel=q_par[0], psnr_baseline=q_base[0],
                         ssim_serial=q_serial[1], ssim_parallel=q_par[1], ssim_baseline=q_base[1],
                         diff=(res.x0 - serial).abs().max().item()))
        pictures.append((name, base[0].cpu(), serial[0].cpu(), res.x0[0].cpu(), truth[0].cpu()))
    rows.append(generation_row(model, truth, args))
    print_table(rows)
    save_figure(pictures, out / "demo.png")
    save_convergence(traces, out / "convergence.png", args.tol)
    print(f"\nwrote {out / 'demo.png'} and {out / 'convergence.png'}")
    return 0


def generation_row(model, truth, args) -> dict:
    """Unconditional DDIM sampling: the deterministic chain the parallel solve converges
    on fastest (no ground truth, so no PSNR)."""
    sched = dq.Schedule.linear(1000, beta_start=1e-4, beta_end=0.02)
    chain = dq.DDIM(sched, dq.timesteps(sched, args.steps))
    x_T = initial_noise(args, truth.shape)
    t0 = time.perf_counter()
    serial = dq.sample_serial(model, chain, x_T)
    t_serial = time.perf_counter() - t0
    res = dq.solve(model, chain, x_T, solver=args.solver, tol=args.tol)
    nan = float("nan")
    return dict(task="generate", sampler="ddim", steps=args.steps, rounds=res.iterations,
                nfe=res.nfe, t_serial=t_serial, t_parallel=res.seconds, psnr_serial=nan,
                psnr_parallel=nan, psnr_baseline=nan, ssim_serial=nan, ssim_parallel=nan,
                ssim_baseline=nan, diff=(res.x0 - serial).abs().max().item())


def print_table(rows) -> None:
    head = (f"{'task':<16}{'sampler':<8}{'steps':>6}{'rounds':>7}{'evals':>7}{'serial s':>9}"
            f"{'parallel s':>11}{'PSNR ser':>9}{'PSNR par':>9}{'PSNR base':>10}{'SSIM ser':>9}"
            f"{'SSIM par':>9}{'max|par-ser|':>13}")
    print(head)
    print("-" * len(head))
    def num(v, width, spec):
        return f"{'-' if v != v else format(v, spec):>{width}}"      # NaN -> "-"

    for r in rows:
        print(f"{r['task']:<16}{r['sampler']:<8}{r['steps']:>6}{r['rounds']:>7}{r['nfe']:>7}"
              f"{r['t_serial']:>9.2f}{r['t_parallel']:>11.2f}{num(r['psnr_serial'], 9, '.2f')}"
              f"{num(r['psnr_parallel'], 9, '.2f')}{num(r['psnr_baseline'], 10, '.2f')}"
              f"{num(r['ssim_serial'], 9, '.3f')}{num(r['ssim_parallel'], 9, '.3f')}"
              f"{r['diff']:>13.2e}")
    print("rounds: sequential model calls of the parallel solve (serial: `steps`); evals: step "
          "evaluations, each one model call on the batch.\nOn a CPU a batched call costs about as "
          "much as the calls it batches, so parallel wall time here tracks evals, not rounds.\n"
          "base: bicubic (SR) or pseudo-inverse.")


def save_figure(pictures, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = ("degraded / baseline", "serial", "parallel", "ground truth")
    fig, axes = plt.subplots(len(pictures), 4, figsize=(8, 2.1 * len(pictures)), squeeze=False)
    for r, (name, *imgs) in enumerate(pictures):
        for c, img in enumerate(imgs):
            ax = axes[r, c]
            ax.imshow(to_unit(img), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=9)
        axes[r, 0].set_ylabel(name, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_convergence(traces, path: Path, tol: float) -> None:
    """Per task: how many steps are final (frozen) after each round — the convergence
    front — and the largest residual among the steps still active in that round."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (front, resid) = plt.subplots(1, 2, figsize=(10, 4))
    for name, trace in traces.items():
        S = trace.shape[1]
        rounds = range(1, len(trace) + 1)
        # a NaN marks a step frozen before that round; after the last round all S are
        frozen = [int(torch.isnan(row).sum()) for row in trace[1:]] + [S]
        front.plot(rounds, frozen, marker=".", label=name)
        worst = torch.nan_to_num(trace, nan=0.0, posinf=float("nan")).amax(1).clamp_min(1e-12)
        resid.semilogy(rounds, worst.numpy(), marker=".", label=name)
    front.plot([0, S], [0, S], color="k", linestyle=":", linewidth=0.8, label="serial (1 step/round)")
    front.set_xlabel("solver round")
    front.set_ylabel("steps final")
    front.set_title("convergence front")
    resid.axhline(tol, color="k", linestyle="--", linewidth=0.8, label=f"tol {tol:g}")
    resid.set_xlabel("solver round")
    resid.set_ylabel("max residual of the active steps (noise units)")
    resid.set_title("residual")
    front.legend(fontsize=7)
    resid.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- restore --------------------------------------------------------------------------
def load_image(path: Path) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise ValueError(f"INPUT {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"INPUT {path} is not a readable image ({exc})") from None
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0) * 2 - 1


def save_image(x: torch.Tensor, path: Path) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((to_unit(x[0]) * 255).round().astype(np.uint8)).save(path)


def run_restore(args) -> int:
    from .models import bundled_model, load_unet
    device = device_of(args)
    model = load_unet(args.model, max_batch=args.max_batch) if args.model else bundled_model(args.max_batch)
    model = model.to(device)
    sample = model.network.config.sample_size
    size = sample if isinstance(sample, int) else tuple(sample)[0]
    image = load_image(Path(args.input)).to(device)
    task = get_task(args.task)
    if args.simulate:
        truth = image
        check_size(truth.shape[-2:], size, "INPUT")
        op, y, sigma_y = degrade(args.task, truth, args.seed)
    else:
        probe = build_operator(args.task, (3, size, size), args.seed)
        want = probe.y_shape_for((3, size, size))
        if tuple(image.shape[1:]) != tuple(want):
            raise ValueError(f"INPUT has size {image.shape[-2]}x{image.shape[-1]}, but task "
                             f"{args.task} on this {size}x{size} model takes a measurement of "
                             f"{want[1]}x{want[2]} (or pass --simulate with a clean "
                             f"{size}x{size} image)")
        op, y, sigma_y = probe, image, task.sigma_y
    chain = make_chain(args.sampler, args.steps, op, y, sigma_y)
    x_T = initial_noise(args, (1, 3, size, size))
    gen = generator(args, 3)
    t0 = time.perf_counter()
    if args.optimize_init:
        if args.serial:
            raise ValueError("--optimize-init runs parallel solves; drop --serial")
        opt = dq.optimize_init(model, chain, x_T, loss="measurement", steps=args.optimize_init,
                               lr=args.lr, generator=gen, solver=args.solver, tol=args.tol)
        x0 = opt.x0
        note = (f"initialization optimized over {args.optimize_init} steps, ||Ax0 - y||² "
                f"{opt.losses[0]:.4g} -> {float(measurement(op, x0, y)):.4g}, solver rounds "
                f"{opt.rounds}")
    elif args.serial:
        x0 = dq.sample_serial(model, chain, x_T, generator=gen)
        note = f"serial, {args.steps} model calls"
    else:
        bar = RoundBar("parallel", args.steps, args.quiet)
        res = dq.solve(model, chain, x_T, generator=gen, solver=args.solver, tol=args.tol, callback=bar)
        bar.close()
        x0 = res.x0
        note = f"parallel, {res.iterations} rounds, {res.nfe} step evaluations"
    save_image(x0, Path(args.out))
    if not args.quiet:
        print(f"{args.task} with {args.sampler}-{args.steps} ({note}) in "
              f"{time.perf_counter() - t0:.2f} s -> {args.out}")
    return 0


def measurement(op, x0, y):
    return (op.A(x0) - y).pow(2).sum()


def check_size(hw, size, name):
    if tuple(hw) != (size, size):
        raise ValueError(f"{name} is {hw[0]}x{hw[1]}, but the model takes {size}x{size} images")


# -- entry point -------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deqir-fast", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(q, steps):
        q.add_argument("--sampler", choices=SAMPLERS, default="ddrm")
        q.add_argument("--steps", type=int, default=steps)
        q.add_argument("--solver", default="triangular_anderson",
                       choices=("picard", "anderson", "triangular_anderson"))
        q.add_argument("--tol", type=float, default=dq.api.DEFAULT_TOL)
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
        q.add_argument("--max-batch", type=int, default=None,
                       help="at most this many images per model call")
        q.add_argument("--quiet", action="store_true")

    d = sub.add_parser("demo", help="restore bundled held-out images, serial vs parallel")
    common(d, steps=20)
    d.add_argument("--images", type=int, default=4)
    d.add_argument("--tasks", default="", help=f"comma-separated, default {','.join(DEMO_TASKS)}")
    d.add_argument("--out", default="out")
    r = sub.add_parser("restore", help="restore one image")
    common(r, steps=50)
    r.add_argument("input")
    r.add_argument("--task", required=True, help=f"one of {', '.join(sorted(TASKS))}")
    r.add_argument("--model", default=None, help="a diffusers UNet2DModel folder")
    r.add_argument("--simulate", action="store_true",
                   help="INPUT is a clean image: degrade it with the task first")
    r.add_argument("--serial", action="store_true", help="run the serial sampler instead")
    r.add_argument("--optimize-init", type=int, default=0, metavar="N",
                   help="optimize x_T for N Adam steps on ||A x0 - y||² (implicit gradients)")
    r.add_argument("--lr", type=float, default=0.05, help="Adam step for --optimize-init")
    r.add_argument("--out", default="restored.png")
    return p


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_demo(args) if args.command == "demo" else run_restore(args)
    except (ValueError, TypeError) as exc:
        print(f"deqir-fast: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
