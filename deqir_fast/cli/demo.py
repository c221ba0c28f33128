"""``deqir-fast demo``: the bundled model restores held-out digits for several tasks,
serially and in parallel, plus an unconditional DDIM generation; a table of rounds, model
evaluations, times and PSNR/SSIM, and the figures demo.png and convergence.png."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import deqir_fast as dq

from .. import figures
from .. import image_io as io
from ..figures import plural
from ..models import bundled_model, heldout_images
from .common import (baseline, chain_generator, degrade, degraded_caption, degraded_view, fmt_db,
                     initial_noise, make_chain, model_schedule, parallel_with_progress, quality,
                     serial_with_progress)
from .options import (add_chain_options, add_run_options, add_solver_options, positive_int,
                      solve_options, task_list)
from .reporting import Reporter

# Six tasks at 20 steps keep the demo near a minute on 2 CPU cores (measured 1.5 min for
# 13 tasks). Compressed sensing is left out: a random 25-50% of the DCT coefficients
# misses most of the low frequencies and DDRM-20 restores 11-14 dB
# (`deqir-fast demo --tasks cs25,cs50`).
DEMO_TASKS = ("denoise", "inpaint_random", "inpaint_box", "sr4", "deblur_gauss", "colorize")


def add_arguments(d) -> None:
    """demo's options."""
    d.add_argument("--tasks", type=task_list, default=None,
                   help=f"comma-separated tasks (default: {','.join(DEMO_TASKS)})")
    d.add_argument("--images", type=positive_int, default=4, help="held-out images per task")
    d.add_argument("--out", default="out", metavar="FOLDER", help="folder for the figures")
    add_chain_options(d, steps=20)
    add_solver_options(d)
    add_run_options(d)


def run_demo(args) -> int:
    reporter = Reporter(args.quiet)
    tasks = args.tasks or list(DEMO_TASKS)
    truth_all = heldout_images()
    if args.images > len(truth_all):
        raise ValueError(f"--images {args.images}: the bundled held-out set has "
                         f"{len(truth_all)} images")
    out = checked_out_folder(args)

    torch.manual_seed(args.seed)
    model = bundled_model().to(args.device)
    schedule = model_schedule(model)
    truth = truth_all[: args.images].to(args.device)
    rows, grid, traces = [], [], {}
    # One task is also solved without the linearised scan, for convergence.png: the first
    # that is not plain denoising (which finishes in a few rounds either way).
    compare_task = next((t for t in tasks if t != "denoise"), tasks[0])
    for name in tasks:
        row, cells = restore_task(model, schedule, name, truth, args, reporter, traces,
                                  compare=name == compare_task)
        rows.append(row)
        grid.append((name, cells))
    generated, cells = generation_row(model, schedule, truth.shape, args, reporter)
    rows.append(generated)
    grid.append(("generate", cells))
    traces["generate (DDIM)"] = generated.pop("trace")
    print_table(rows)
    write_figures(out, grid, traces, args)
    print(f"\nwrote {out / 'demo.png'} and {out / 'convergence.png'}")
    return 0


def checked_out_folder(args) -> Path:
    """The folder --out names, checked writable for demo.png and convergence.png."""
    out = Path(args.out)
    if out.suffix.lower() in (".png", ".jpg", ".jpeg", ".pdf", ".svg"):
        raise ValueError(f"--out {args.out} looks like a file; the demo writes demo.png and "
                         f"convergence.png into the folder --out names")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out} is a file, not a folder")
    io.check_folder_writable(out, f"--out {args.out}")
    for name in ("demo.png", "convergence.png"):
        if (out / name).exists() and not os.access(out / name, os.W_OK):
            raise ValueError(f"--out: {out / name} exists and is read-only")
    return out


def serial_and_parallel(model, chain, x_T, args, reporter: Reporter, name: str,
                        seed: Optional[int] = None):
    """(serial x0, its seconds, the parallel solve's result), each drawing the chain's noise
    from ``chain_generator(seed)`` (no generator without a seed)."""
    def generator():
        return None if seed is None else chain_generator(seed, args.device)

    t0 = time.perf_counter()
    serial = serial_with_progress(model, chain, x_T, reporter, f"{name} serial", args.steps,
                                  generator=generator())
    t_serial = time.perf_counter() - t0
    res = parallel_with_progress(model, chain, x_T, args, reporter, f"{name} parallel",
                                 generator=generator())
    return serial, t_serial, res


def table_row(task: str, sampler: str, steps: int, res, t_serial: float, diff: float,
              mean: Optional[dict] = None) -> dict:
    """A row of the table; ``mean``: method -> (PSNR, SSIM) over the images for serial,
    parallel and baseline (none without a truth: NaN, printed as "-")."""
    nan = float("nan")
    mean = mean or {key: (nan, nan) for key in ("serial", "parallel", "baseline")}
    return dict(task=task, sampler=sampler, steps=steps, rounds=res.iterations, nfe=res.nfe,
                t_serial=t_serial, t_parallel=res.seconds, psnr_serial=mean["serial"][0],
                psnr_parallel=mean["parallel"][0], psnr_baseline=mean["baseline"][0],
                ssim_serial=mean["serial"][1], ssim_parallel=mean["parallel"][1],
                ssim_baseline=mean["baseline"][1], diff=diff)


def restore_task(model, schedule, name: str, truth, args, reporter: Reporter, traces: dict,
                 compare: bool):
    """Task ``name`` on the held-out images, serially and in parallel (with ``compare``,
    once more without the linearised scan); adds the residual traces to ``traces`` and
    returns (the table's row, the figure's cells)."""
    shape = tuple(truth.shape[1:])
    op, y, sigma_y = degrade(name, truth, args.seed)
    chain = make_chain(args.sampler, schedule, args.steps, op, y, sigma_y)
    x_T = initial_noise(args.seed, truth.shape, args.device)
    serial, t_serial, res = serial_and_parallel(model, chain, x_T, args, reporter, name,
                                                seed=args.seed)
    traces[name] = {"residuals": res.residuals, "converged": res.converged}
    if compare and args.linearize != "none":
        # The same solve on the plain map (J = 0, DeqIR's): what the linearised scan
        # saves, shown next to it in convergence.png.
        plain = dq.solve(model, chain, x_T, generator=chain_generator(args.seed, args.device),
                         **dict(solve_options(args), linearize="none"))
        traces[f"{name}, J = 0 (no linearisation)"] = {"residuals": plain.residuals,
                                                       "converged": plain.converged}
    base = baseline(op, y, shape)
    results = (("serial", serial), ("parallel", res.x0), ("baseline", base))
    per_image = {key: [quality(x, t) for x, t in zip(batch, truth)] for key, batch in results}
    mean = {key: np.mean(np.array(v), axis=0) for key, v in per_image.items()}
    row = table_row(name, args.sampler, args.steps, res, t_serial,
                    (res.x0 - serial).abs().max().item(), mean)
    view = degraded_view(op, y)[0].cpu()
    db = {key: fmt_db(v[0][0]) for key, v in per_image.items()}
    cells = [
        figures.Cell(io.to_display(view), degraded_caption(view, truth[0].cpu())),
        figures.Cell(io.to_display(base[0].cpu()), f"{db['baseline']} dB"),
        figures.Cell(io.to_display(serial[0].cpu()), f"{db['serial']} dB"),
        figures.Cell(io.to_display(res.x0[0].cpu()),
                     f"{db['parallel']} dB, {plural(res.iterations, 'round')}"),
        figures.Cell(io.to_display(truth[0].cpu()), "truth")]
    return row, cells


def generation_row(model, schedule, shape, args, reporter: Reporter):
    """Unconditional DDIM sampling: the deterministic chain the parallel solve converges
    on fastest (no ground truth, so no PSNR)."""
    chain = dq.DDIM(schedule, dq.timesteps(schedule, args.steps))
    x_T = initial_noise(args.seed, shape, args.device)
    serial, t_serial, res = serial_and_parallel(model, chain, x_T, args, reporter, "generate")
    diff = (res.x0 - serial).abs().max().item()
    row = dict(table_row("generate", "ddim", args.steps, res, t_serial, diff),
               trace={"residuals": res.residuals, "converged": res.converged})
    cells = [figures.Cell(io.to_display(x_T[0].cpu() / 3), "noise x_T (scaled 1/3)"),
             figures.Cell(None),
             figures.Cell(io.to_display(serial[0].cpu()), plural(args.steps, "step")),
             figures.Cell(io.to_display(res.x0[0].cpu()),
                          f"{plural(res.iterations, 'round')}, |Δ| {diff:.0e}"),
             figures.Cell(None)]
    return row, cells


def write_figures(out: Path, grid, traces: dict, args) -> None:
    """demo.png (per task: degraded, baseline, serial, parallel, truth) and
    convergence.png (the residual traces), written together."""
    label = f"{args.sampler.upper()}-{args.steps}"
    io.write_all([
        (out / "demo.png", lambda tmp: figures.image_grid(
            grid, ("degraded input", "baseline", "serial", "parallel", "ground truth"), tmp,
            title=f"Bundled model, {label} (generate: DDIM-{args.steps}); PSNR to the truth "
                  f"under each image",
            caption="baseline: bicubic upsampling for super-resolution, the pseudo-inverse "
                    "otherwise (zero fill for inpainting). The parallel solve reproduces the "
                    "serial sampler to the tolerance. Generate: unconditional sampling from "
                    "the noise x_T, no truth.")),
        (out / "convergence.png", lambda tmp: figures.convergence_plot(
            traces, tmp, args.tol, label)),
    ])


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
