"""``deqir-fast restore``: restore image files with a diffusion model, serially or as one
parallel solve per batch of inputs.

Every argument, input image and output location is checked before the model loads
(``restore_files``), and outputs are written all at once at the end
(``image_io.write_all``), so an error costs seconds and leaves nothing behind."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

import deqir_fast as dq

from .. import figures
from .. import image_io as io
from ..figures import plural
from ..models import load_unet
from ..operators import Operator
from ..tasks import TASKS, Task, build_operator, get_task
from .common import (baseline, baseline_name, chain_generator, degraded_caption, degraded_view,
                     fmt_db, initial_noise, make_chain, measure, model_schedule,
                     parallel_with_progress, quality, serial_with_progress)
from .options import (SOLVER_OPTIONS, add_chain_options, add_run_options, add_solver_options,
                      non_negative_int, positive_float, positive_int, solve_options, task_arg)
from .parser import given_options
from .reporting import Reporter
from .restore_files import (BUNDLED_MODEL, ModelSpec, gather_inputs, output_depths,
                            plan_outputs, prepare_pixels, read_model_spec)

MODES = ("auto", "parallel", "serial")


def add_arguments(r) -> None:
    """restore's options."""
    r.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders of images or quoted glob patterns. Each is the "
                        "measurement y of --task (e.g. the low-resolution image for sr4, a "
                        "grey one for colorize), or with --simulate a clean image to degrade "
                        "first. 8/16-bit, grey, RGB, RGBA (alpha dropped) and palette images "
                        "are read")
    r.add_argument("--task", type=task_arg, required=True,
                   help=f"the degradation: {', '.join(sorted(TASKS))}")
    r.add_argument("--out", default=None,
                   help="output file (.png, .jpg, .tif, ...) for one input, or a folder "
                        "(ending in /) receiving INPUT-NAME.png per input (default: "
                        "restored.png, or restored/ for several inputs). A 16-bit input "
                        "gives a 16-bit .tif (or grey .png)")
    r.add_argument("--simulate", action="store_true",
                   help="INPUT is a clean image: degrade it with the task, restore it, print "
                        "PSNR/SSIM of the restoration and the baseline and save a figure "
                        "(degraded | baseline | restored | truth) next to --out")
    r.add_argument("--model", default=None, metavar="FOLDER",
                   help="a diffusers UNet2DModel folder (default: the bundled model)")
    r.add_argument("--resize", action="store_true",
                   help="scale inputs of another size to the size needed (with --crop: keep "
                        "the aspect ratio and crop the centre)")
    r.add_argument("--crop", action="store_true", help="cut the centre of the size needed")
    r.add_argument("--mode", choices=MODES, default="auto",
                   help="parallel: solve all steps at once (or --window at a time); serial: "
                        "step by step; auto: the planner measures the model's cost per call "
                        "on this device and picks the window each round, or the serial "
                        "sampler where that is faster (--window bounds it)")
    r.add_argument("--max-batch", type=positive_int, default=16, metavar="N",
                   help="images restored together in one solve; more inputs run in further "
                        "solves")
    r.add_argument("--optimize-init", type=non_negative_int, default=0, metavar="N",
                   help="optimize x_T for N Adam steps on ||A x0 - y||² with implicit "
                        "gradients (parallel solves)")
    r.add_argument("--lr", type=positive_float, default=0.05, help="Adam step for --optimize-init")
    add_chain_options(r, steps=50)
    add_solver_options(r)
    add_run_options(r)


def resolve_mode(args, reporter: Reporter) -> str:
    """The mode a restore runs in; says which parallel-solve options a serial run leaves
    unused (given explicitly: their defaults are never worth a note)."""
    if args.optimize_init:
        return "parallel"
    mode = args.mode
    unused = [flag for dest, flag in SOLVER_OPTIONS if dest in given_options(args)]
    if mode == "serial" and unused:
        reporter.note(f"{', '.join(unused)} set{'s' if len(unused) == 1 else ''} the parallel "
                      f"solve, which this run does not use (--mode serial runs the serial "
                      f"sampler); add --mode parallel or auto to use "
                      f"{'it' if len(unused) == 1 else 'them'}")
    return mode


@dataclass
class Plan:
    """A restore, checked: the task's operator (``probe``), the shape of the model's
    images, the inputs read and sized, where each output goes and at how many bits, and
    the mode it runs in."""
    spec: ModelSpec
    task: Task
    probe: Operator
    shape: Tuple[int, int, int]
    inputs: List[Path]
    outputs: List[Path]
    figure: Optional[Path]
    pixels: List[np.ndarray]
    bits: List[int]
    mode: str


def plan_restore(args, reporter: Reporter) -> Plan:
    """Check every argument, input and output location; read the inputs (the model is not
    loaded yet)."""
    spec = read_model_spec(Path(args.model) if args.model else BUNDLED_MODEL)
    if args.steps > spec.train_steps:
        raise ValueError(f"--steps {args.steps}: the model's schedule has {spec.train_steps} "
                         f"timesteps")
    task = get_task(args.task)
    shape = (spec.channels, *spec.size)
    model_size = f"{shape[1]}x{shape[2]}"
    try:
        probe = build_operator(args.task, shape, args.seed)
    except ValueError as exc:
        raise ValueError(f"task {args.task} does not fit the model's {model_size} images: "
                         f"{exc}") from None
    if args.simulate:
        need = shape
        wrong_size = f"the model takes {model_size} images"
    else:
        need = probe.y_shape_for(shape)
        wrong_size = (f"task {args.task} on this {model_size} model takes a measurement of "
                      f"{need[1]}x{need[2]}; or pass --simulate with a clean {model_size} image")
    inputs = gather_inputs(args.inputs)
    outputs, figure = plan_outputs(args.out, inputs, args.simulate)
    if args.optimize_init and args.mode == "serial":
        raise ValueError("--optimize-init differentiates parallel solves; drop --mode serial")
    if "lr" in given_options(args) and not args.optimize_init:
        reporter.note("--lr sets the Adam step of --optimize-init, which is not given: "
                      "nothing uses it")
    pixels, depths = prepare_pixels(inputs, need[0], tuple(need[1:]), args, reporter,
                                    wrong_size)
    bits = output_depths(outputs, depths, spec.channels, reporter)
    mode = resolve_mode(args, reporter)
    return Plan(spec, task, probe, shape, inputs, outputs, figure, pixels, bits, mode)


def run_restore(args) -> int:
    reporter = Reporter(args.quiet)
    plan = plan_restore(args, reporter)

    # Everything is checked: now the slow part.
    model = load_model(plan.spec.folder, args.device)
    schedule = model_schedule(model)
    start = time.perf_counter()
    restored, truths, measured, details = restore_batches(model, schedule, plan, args, reporter)
    seconds = time.perf_counter() - start
    restored_all = torch.cat(restored)

    writers = [(path, _image_writer(io.to_display(x), path, depth))
               for path, x, depth in zip(plan.outputs, restored_all, plan.bits)]
    if args.simulate:
        rows = simulate_report(plan.inputs, restored, truths, measured, plan.probe, plan.shape)
        writers.append((plan.figure, lambda tmp: figures.image_grid(
            rows, ("degraded", f"baseline ({baseline_name(plan.probe)})", "restored",
                   "ground truth"), tmp,
            title=f"{args.task}, {args.sampler.upper()}-{args.steps}, {plan.mode}")))
    io.write_all(writers)
    outputs, figure = plan.outputs, plan.figure
    where = outputs[0] if len(outputs) == 1 else outputs[0].parent
    print(f"{args.task} with {args.sampler}-{args.steps} on {plural(len(plan.inputs), 'image')} "
          f"({'; '.join(details)}) in {seconds:.2f} s -> {where}"
          + (f", {figure}" if figure else ""))
    return 0


def restore_batches(model, schedule, plan: Plan, args, reporter: Reporter):
    """Restore the inputs, --max-batch at a time: (restored, truths, measurements, a few
    words on each batch), tensors on the CPU but for the truths."""
    task, probe, pixels = plan.task, plan.probe, plan.pixels
    restored, truths, measured, details = [], [], [], []
    batches = range(0, len(pixels), args.max_batch)
    for k, first in enumerate(batches):
        batch = torch.stack([io.to_model_range(p) for p in pixels[first:first + args.max_batch]])
        batch = batch.to(args.device)
        seed = args.seed + 10 * k           # each batch its own noise, reproducibly
        if args.simulate:
            y = measure(probe, batch, task.sigma_y, seed)
            truths.append(batch)
        else:
            y = batch
        chain = make_chain(args.sampler, schedule, args.steps, probe, y, task.sigma_y)
        desc = f"batch {k + 1}/{len(batches)}" if len(batches) > 1 else args.task
        x0, detail = run_chain(model, chain, (batch.shape[0], *plan.shape), seed, plan.mode,
                               args, reporter, desc)
        restored.append(x0.cpu())
        measured.append(y.cpu())
        details.append(detail)
    return restored, truths, measured, details


def _image_writer(pixels, path: Path, bits: int = 8):
    fmt = io.output_format(path)
    return lambda tmp: io.save_pixels(pixels, tmp, fmt, bits)


def load_model(folder: Path, device):
    return load_unet(folder).to(device)


def run_chain(model, chain, shape, seed: int, mode: str, args, reporter: Reporter, desc: str):
    """(x0 on the device, a few words on how it was computed)."""
    x_T = initial_noise(seed, shape, args.device)
    gen = chain_generator(seed, args.device)
    if args.optimize_init:
        bar = reporter.bar(f"{desc} optimize x_T", args.optimize_init, "Adam step")
        opt = dq.optimize_init(model, chain, x_T, loss="measurement", steps=args.optimize_init,
                               lr=args.lr, generator=gen, callback=lambda info: bar.update(1),
                               **solve_options(args))
        bar.close()
        before = opt.losses[0] if opt.losses else float("nan")
        after = float((chain.operator.A(opt.x0) - chain.y).pow(2).sum())
        return opt.x0, (f"initialization optimized over {plural(args.optimize_init, 'step')}, "
                        f"||Ax0 - y||² {before:.4g} -> {after:.4g}")
    if mode == "serial":
        x0 = serial_with_progress(model, chain, x_T, reporter, f"{desc} serial", args.steps,
                                  generator=gen)
        return x0, f"serial, {plural(args.steps, 'model call')}"
    planned = mode == "auto"
    res = parallel_with_progress(model, chain, x_T, args, reporter,
                                 f"{desc} {'planned' if planned else 'parallel'}",
                                 generator=gen, planned=planned)
    how = f"{plural(res.iterations, 'round')}, {plural(res.nfe, 'step evaluation')}"
    if planned:
        return res.x0, f"planned ({plan_summary(res.stats.plan)}), {how}"
    return res.x0, f"parallel, {how}"


def plan_summary(plan) -> str:
    """How a planned solve ran, in a few words."""
    if plan.serial_from == 0:
        return "the serial sampler: faster than any window here"
    windows = sorted({w for w in plan.windows if plan.serial_from is None or w > 1})
    shown = ", ".join(str(w) for w in windows[:4]) + (", ..." if len(windows) > 4 else "")
    tail = "" if plan.serial_from is None else f", then serial from step {plan.serial_from}"
    return f"windows {shown}{tail}"


def simulate_report(inputs, restored, truths, measured, op, shape):
    """Print PSNR/SSIM of restoration and baseline per image; return the figure's rows."""
    print(f"{'image':<24}{'PSNR restored':>15}{'PSNR baseline':>15}{'SSIM restored':>15}"
          f"{'SSIM baseline':>15}")
    rows, scores = [], []
    names = iter(inputs)
    for x0s, truth, y in zip(restored, truths, measured):
        bases = baseline(op, y, shape)
        views = degraded_view(op, y)
        for x0, t, b, v in zip(x0s, truth.cpu(), bases, views):
            name = next(names).name
            q_x, q_b = quality(x0, t), quality(b, t)
            scores.append((*q_x, *q_b))
            print(f"{name[:23]:<24}{fmt_db(q_x[0]):>15}{fmt_db(q_b[0]):>15}{q_x[1]:>15.3f}"
                  f"{q_b[1]:>15.3f}")
            rows.append((name[:20], [
                figures.Cell(io.to_display(v), degraded_caption(v, t)),
                figures.Cell(io.to_display(b), f"{fmt_db(q_b[0])} dB, SSIM {q_b[1]:.2f}"),
                figures.Cell(io.to_display(x0), f"{fmt_db(q_x[0])} dB, SSIM {q_x[1]:.2f}"),
                figures.Cell(io.to_display(t), "truth")]))
    if len(scores) > 1:
        mean = np.mean(np.array(scores), axis=0)
        print(f"{'mean':<24}{fmt_db(mean[0]):>15}{fmt_db(mean[2]):>15}{mean[1]:>15.3f}"
              f"{mean[3]:>15.3f}")
    return rows
