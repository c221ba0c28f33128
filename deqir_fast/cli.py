"""The ``deqir-fast`` command line (also ``python -m deqir_fast``).

Every argument, input image and output location is checked before a model loads, and
outputs are written all at once at the end (``image_io.write_all``), so an error costs
seconds and leaves nothing behind. Errors are one line on stderr with exit code 2
(``--verbose`` adds the traceback). The maths never prints: progress reaches this module
through the solvers' callbacks.
"""
from __future__ import annotations

# Only the standard library at module level: `deqir-fast --version` and `--help` must not
# wait seconds for torch. numpy, torch and the package's maths are imported inside the
# functions that use them, and each subcommand's options are added only once that
# subcommand is chosen (_LazySubParsers): their choices and defaults come from modules
# that import torch.
import argparse
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from . import __version__
from .figures import plural      # figures imports matplotlib, numpy and torch only when drawing

SAMPLERS = ("ddrm", "ddnm")
MODES = ("auto", "parallel", "serial")
# Six tasks at 20 steps keep the demo near a minute on 2 CPU cores (measured 1.5 min for
# 13 tasks). Compressed sensing is left out: a random 25-50% of the DCT coefficients
# misses most of the low frequencies and DDRM-20 restores 11-14 dB
# (`deqir-fast demo --tasks cs25,cs50`).
DEMO_TASKS = ("denoise", "inpaint_random", "inpaint_box", "sr4", "deblur_gauss", "colorize")
# Seeds of the random draws, offset from --seed so that each draw has its own stream.
MEASUREMENT_SEED, X_T_SEED, CHAIN_NOISE_SEED = 1, 2, 3
# torch.Generator.manual_seed takes integers up to 2**64 - 1; the draws add small offsets
# to --seed (the ones above, 10 per batch of inputs), so 2**63 - 1 leaves them room.
MAX_SEED = 2 ** 63 - 1
# Options of the parallel solve, which a serial run does not use.
SOLVER_OPTIONS = (("solver", "--solver"), ("linearize", "--linearize"), ("tol", "--tol"),
                  ("window", "--window"))


def default_schedule():
    """The schedule of models that bring none: DDPM's linear betas (the bundled model's)."""
    import deqir_fast as dq
    return dq.Schedule.linear(1000, beta_start=1e-4, beta_end=0.02)


# Notes already shown in this process (Reporter.note(..., once=key)): a program that calls
# main() several times (tests, notebooks) needs the explanation only once.
_NOTED: set = set()


class Reporter:
    """Notes and progress bars on stderr (none with --quiet); results go to stdout."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def note(self, text: str, once: Optional[str] = None) -> None:
        if self.quiet or (once is not None and once in _NOTED):
            return
        if once is not None:
            _NOTED.add(once)
        print(f"note: {text}", file=sys.stderr, flush=True)

    def bar(self, desc: str, total: int, unit: str):
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, leave=False, disable=self.quiet, unit=unit,
                    file=sys.stderr)


class StepProgress:
    """A progress bar over the serial sampler's steps (``sample_serial``'s callback)."""

    def __init__(self, reporter: Reporter, desc: str, steps: int):
        self.bar = reporter.bar(desc, steps, "step")

    def __call__(self, info: dict) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class RoundProgress:
    """A progress bar over the parallel solve's rounds (``solve``'s callback): the bar
    counts rounds; the postfix says how many steps are final (frozen) so far."""

    def __init__(self, reporter: Reporter, desc: str, steps: int):
        self.bar = reporter.bar(desc, steps, "round")

    def __call__(self, info: dict) -> None:
        self.bar.update(1)
        self.bar.set_postfix(frozen=info["window"][0], evals=info["nfe"])

    def close(self) -> None:
        self.bar.close()


# -- shared maths helpers ------------------------------------------------------------------
def make_chain(sampler: str, schedule, steps: int, op, y, sigma_y: float):
    import deqir_fast as dq
    ts = dq.timesteps(schedule, steps)
    if sampler == "ddrm":
        return dq.DDRM(schedule, ts, operator=op, y=y, sigma_y=sigma_y, eta=0.85, eta_b=1.0)
    if sampler == "ddnm":
        return dq.DDNM(schedule, ts, operator=op, y=y, sigma_y=sigma_y, eta=0.0)
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")


def degrade(task_name: str, truth, seed: int):
    """(operator, y = A(truth) + noise, sigma_y) for a simulated measurement."""
    from .tasks import build_operator, get_task
    op = build_operator(task_name, truth.shape[1:], seed)
    sigma_y = get_task(task_name).sigma_y
    return op, measure(op, truth, sigma_y, seed), sigma_y


def measure(op, truth, sigma_y: float, seed: int):
    import torch
    clean = op.A(truth)
    gen = torch.Generator().manual_seed(seed + MEASUREMENT_SEED)
    return clean + sigma_y * torch.randn(clean.shape, generator=gen).to(clean)


def baseline(op, y, shape):
    """The simple baseline a restoration must beat: bicubic upsampling for
    super-resolution, the pseudo-inverse (zero fill, or y itself) otherwise."""
    import torch
    if getattr(op, "factor", None) is not None:
        return torch.nn.functional.interpolate(y, size=tuple(shape[-2:]), mode="bicubic",
                                               align_corners=False)
    return op.pinv(y)


def baseline_name(op) -> str:
    return "bicubic" if getattr(op, "factor", None) is not None else "pseudo-inverse"


def degraded_view(op, y):
    """What to show as the degraded input: y itself when it is an image (a small one for
    super-resolution, grey for colourisation), its pseudo-inverse when it is not
    (compressed sensing measures transform coefficients)."""
    from . import operators as ops
    return op.pinv(y) if isinstance(op, ops.CompressedSensing) else y


def quality(x, truth) -> Tuple[float, float]:
    """PSNR (dB) and SSIM (scikit-image) of one image [C, H, W] against the truth, on the
    [0, 1] display range."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    from . import image_io as io
    a, b = io.to_display(x), io.to_display(truth)
    psnr = peak_signal_noise_ratio(b, a, data_range=1.0)
    win = min(7, *[n if n % 2 else n - 1 for n in b.shape[:2]])
    ssim = structural_similarity(b, a, data_range=1.0, channel_axis=-1, win_size=win)
    return float(psnr), float(ssim)


def initial_noise(seed: int, shape, device):
    import torch
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed + X_T_SEED)).to(device)


def chain_generator(seed: int, device):
    """The chain's per-step noise is drawn where the state lives."""
    import torch
    return torch.Generator(device=device).manual_seed(seed + CHAIN_NOISE_SEED)


def fmt_db(value: float) -> str:
    return "-" if value != value else ("inf" if math.isinf(value) else f"{value:.2f}")


# -- restore ------------------------------------------------------------------------------
@dataclass
class ModelSpec:
    """What a model folder's config says, read without loading the weights."""
    folder: Path
    channels: int
    size: Tuple[int, int]
    train_steps: int


BUNDLED_MODEL = Path(__file__).resolve().parent / "assets" / "model"


def read_model_spec(folder: Path) -> ModelSpec:
    import json
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--model {folder} is not a folder (a diffusers UNet2DModel folder "
                         f"with config.json and weights is expected)")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"--model {folder} has no config.json (a diffusers UNet2DModel folder "
                         f"is expected)")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ValueError(f"--model {folder} holds no weights (*.safetensors or *.bin)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        sample = config["sample_size"]
        sample = [sample, sample] if isinstance(sample, int) else sample
        size = tuple(int(s) for s in sample)
        channels = int(config.get("in_channels", 3))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--model {folder}: cannot read sample_size and in_channels from "
                         f"config.json ({exc})") from None
    train_steps = 1000
    # The model's own schedule, if a scheduler config comes with it, bounds --steps.
    from . import models
    find = getattr(models, "find_scheduler_config", None)
    found = find(folder) if find is not None else None
    if found is not None:
        schedule = models.read_scheduler_config(found)[0]
        train_steps = schedule.num_train_timesteps
    return ModelSpec(folder, channels, size, train_steps)


def gather_inputs(items: List[str]) -> List[Path]:
    """Every file the INPUT arguments name, in order, each once."""
    from . import image_io as io
    seen, paths = set(), []
    for item in items:
        for path in io.image_files(item):
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                paths.append(path)
    return paths


def plan_outputs(out: Optional[str], inputs: List[Path], simulate: bool):
    """(output path per input, comparison figure path or None), checked writable.

    ``--out`` names a file for one input, or a folder (ending in / or already one) that
    receives INPUT-STEM.png for each input."""
    from . import image_io as io
    several = len(inputs) > 1
    if out is None:
        out = "restored/" if several else "restored.png"
    is_folder = out.endswith(("/", os.sep)) or Path(out).is_dir()
    if several and not is_folder:
        raise ValueError(f"{len(inputs)} inputs need --out to name a folder (end it with /), "
                         f"got --out {out}")
    if is_folder:
        folder = Path(out)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"--out {out} is a file, not a folder")
        io.check_folder_writable(folder, f"--out {out}")
        paths = [folder / f"{p.stem}.png" for p in inputs]
        figure = folder / "compare.png" if simulate else None
    else:
        path = Path(out)
        io.output_format(path)
        io.check_writable(path)
        paths = [path]
        figure = path.with_name(f"{path.stem}_compare.png") if simulate else None
    for path in paths + ([figure] if figure else []):
        if path.exists() and not os.access(path, os.W_OK):
            raise ValueError(f"--out: {path} exists and is read-only")
    named = [(f"the output of {p}", o) for p, o in zip(inputs, paths)]
    io.unique_outputs(named + ([("the comparison figure", figure)] if figure else []), inputs)
    return paths, figure


def resolve_mode(args, reporter: Reporter) -> str:
    """The mode a restore runs in; says which parallel-solve options a serial run leaves
    unused (given explicitly: their defaults are never worth a note)."""
    if args.optimize_init:
        return "parallel"
    mode = args.mode
    if mode == "auto":
        mode = "serial" if args.device.type == "cpu" else "parallel"
        if mode == "serial":
            reporter.note("--mode auto runs serial on a CPU: there a batched model call over "
                          "all steps costs about what the steps cost one by one, so fewer "
                          "rounds save no time (--mode parallel forces it)", once="auto-serial")
    unused = [flag for dest, flag in SOLVER_OPTIONS if dest in given_options(args)]
    if mode == "serial" and unused:
        why = "--mode serial" if args.mode == "serial" else "--mode auto on a CPU"
        reporter.note(f"{', '.join(unused)} set{'s' if len(unused) == 1 else ''} the parallel "
                      f"solve, which this run does not use ({why} runs the serial sampler); "
                      f"add --mode parallel to use {'it' if len(unused) == 1 else 'them'}")
    return mode


def prepare_pixels(paths: List[Path], channels: int, size: Tuple[int, int], args,
                   reporter: Reporter, wrong_size: str):
    """Read every input and bring it to ``channels`` x ``size``, or fail naming the input
    (``wrong_size`` says what the task takes). Returns (pixels, bits of each input)."""
    from . import image_io as io
    prepared, depths = [], []
    for path in paths:
        picture = io.read_image(path)
        for text in picture.notes:
            reporter.note(text)
        pixels = picture.pixels
        if pixels.shape[-1] != channels:
            if channels == 1:
                reporter.note(f"{path.name}: colour, but {args.task} measures grey: using the "
                              f"mean of its channels")
            elif pixels.shape[-1] == 1:
                reporter.note(f"{path.name}: grey, repeated into {channels} channels")
            pixels = io.match_channels(pixels, channels)
        h, w = pixels.shape[:2]
        if (h, w) != tuple(size):
            if not (args.resize or args.crop):
                raise ValueError(f"INPUT {path} is {h}x{w}, but {wrong_size} (--resize scales "
                                 f"an input, --crop cuts its centre, both do both)")
            pixels = io.fit_size(pixels, size, args.resize, args.crop, name=f"INPUT {path}")
            how = {(True, False): "resized", (False, True): "cropped"}.get(
                (args.resize, args.crop), "resized and cropped")
            reporter.note(f"{path.name}: {how} from {h}x{w} to {size[0]}x{size[1]}")
        if args.simulate and args.task == "colorize" and _is_grey(pixels):
            # The truth is then grey too: the pseudo-inverse (the channel mean repeated) is
            # exact, so the baseline scores >100 dB and no score measures colourisation.
            reporter.note(f"{path.name}: grey (its channels are equal), so colorize has no "
                          f"colour to restore: the truth is grey, the baseline reproduces it "
                          f"exactly, and the scores only say how far the restoration strays "
                          f"from grey; simulate with a colour image")
        prepared.append(pixels)
        depths.append(picture.bits)
    return prepared, depths


def _is_grey(pixels) -> bool:
    """Every pixel's channels within half an 8-bit level of each other."""
    return pixels.shape[-1] == 1 or float((pixels.max(-1) - pixels.min(-1)).max()) <= 0.5 / 255


def output_depths(outputs: List[Path], depths: List[int], channels: int,
                  reporter: Reporter) -> List[int]:
    """Each output's bits per sample: 16 for an input of more than 8 bits where the format
    stores 16 (``image_io.can_write_16bit``), else 8, with a note when depth is lost."""
    from . import image_io as io
    bits = []
    for path, depth in zip(outputs, depths):
        fmt = io.output_format(path)
        keep = depth > 8 and io.can_write_16bit(fmt, channels)
        if depth > 8 and not keep:
            reporter.note(f"{path.name}: written at 8 bits from a {depth}-bit input ({fmt} "
                          f"{'colour ' if channels > 1 else ''}is written at 8 bits here; "
                          f".tif keeps 16)")
        bits.append(16 if keep else 8)
    return bits


def run_restore(args) -> int:
    import torch

    import deqir_fast as dq
    from . import image_io as io
    from .tasks import build_operator, get_task
    reporter = Reporter(args.quiet)
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

    # Everything is checked: now the slow part.
    model = load_model(spec.folder, args.device)
    schedule = model_schedule(model)
    start = time.perf_counter()
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
        x0, detail = run_chain(model, chain, (batch.shape[0], *shape), seed, mode, args, reporter,
                               desc)
        restored.append(x0.cpu())
        measured.append(y.cpu())
        details.append(detail)
    seconds = time.perf_counter() - start
    restored_all = torch.cat(restored)

    writers = [(path, _image_writer(io.to_display(x), path, depth))
               for path, x, depth in zip(outputs, restored_all, bits)]
    if args.simulate:
        from . import figures
        rows = simulate_report(inputs, restored, truths, measured, probe, shape)
        writers.append((figure, lambda tmp: figures.image_grid(
            rows, ("degraded", f"baseline ({baseline_name(probe)})", "restored",
                   "ground truth"), tmp,
            title=f"{args.task}, {args.sampler.upper()}-{args.steps}, {mode}")))
    io.write_all(writers)
    where = outputs[0] if len(outputs) == 1 else outputs[0].parent
    print(f"{args.task} with {args.sampler}-{args.steps} on {plural(len(inputs), 'image')} "
          f"({'; '.join(details)}) in {seconds:.2f} s -> {where}"
          + (f", {figure}" if figure else ""))
    return 0


def _image_writer(pixels, path: Path, bits: int = 8):
    from . import image_io as io
    fmt = io.output_format(path)
    return lambda tmp: io.save_pixels(pixels, tmp, fmt, bits)


def model_schedule(model):
    """The model's own schedule when its folder has a scheduler config, else the default."""
    schedule = getattr(model, "schedule", None)
    return default_schedule() if schedule is None else schedule


def load_model(folder: Path, device):
    from .models import load_unet
    return load_unet(folder).to(device)


def run_chain(model, chain, shape, seed: int, mode: str, args, reporter: Reporter, desc: str):
    """(x0 on the device, a few words on how it was computed)."""
    import deqir_fast as dq
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
        bar = StepProgress(reporter, f"{desc} serial", args.steps)
        try:
            x0 = dq.sample_serial(model, chain, x_T, generator=gen, callback=bar)
        finally:
            bar.close()
        return x0, f"serial, {plural(args.steps, 'model call')}"
    bar = RoundProgress(reporter, f"{desc} parallel", args.steps)
    try:
        res = dq.solve(model, chain, x_T, generator=gen, callback=bar, **solve_options(args))
    finally:
        bar.close()
    return res.x0, (f"parallel, {plural(res.iterations, 'round')}, "
                    f"{plural(res.nfe, 'step evaluation')}")


def simulate_report(inputs, restored, truths, measured, op, shape):
    """Print PSNR/SSIM of restoration and baseline per image; return the figure's rows."""
    import numpy as np

    from . import figures
    from . import image_io as io
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


# -- demo ---------------------------------------------------------------------------------
def run_demo(args) -> int:
    import numpy as np
    import torch

    import deqir_fast as dq
    from . import figures
    from . import image_io as io
    from .models import bundled_model, heldout_images
    reporter = Reporter(args.quiet)
    tasks = args.tasks or list(DEMO_TASKS)
    truth_all = heldout_images()
    if args.images > len(truth_all):
        raise ValueError(f"--images {args.images}: the bundled held-out set has "
                         f"{len(truth_all)} images")
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

    torch.manual_seed(args.seed)
    model = bundled_model().to(args.device)
    schedule = model_schedule(model)
    truth = truth_all[: args.images].to(args.device)
    shape = tuple(truth.shape[1:])
    rows, grid, traces = [], [], {}
    # One task is also solved without the linearised scan, for convergence.png: the first
    # that is not plain denoising (which finishes in a few rounds either way).
    compare_task = next((t for t in tasks if t != "denoise"), tasks[0])
    for name in tasks:
        op, y, sigma_y = degrade(name, truth, args.seed)
        chain = make_chain(args.sampler, schedule, args.steps, op, y, sigma_y)
        x_T = initial_noise(args.seed, truth.shape, args.device)
        bar = StepProgress(reporter, f"{name} serial", args.steps)
        t0 = time.perf_counter()
        serial = dq.sample_serial(model, chain, x_T, callback=bar,
                                  generator=chain_generator(args.seed, args.device))
        t_serial = time.perf_counter() - t0
        bar.close()
        bar = RoundProgress(reporter, f"{name} parallel", args.steps)
        res = dq.solve(model, chain, x_T, generator=chain_generator(args.seed, args.device),
                       callback=bar, **solve_options(args))
        bar.close()
        traces[name] = {"residuals": res.residuals, "converged": res.converged}
        if name == compare_task and args.linearize != "none":
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
        rows.append(dict(task=name, sampler=args.sampler, steps=args.steps, rounds=res.iterations,
                         nfe=res.nfe, t_serial=t_serial, t_parallel=res.seconds,
                         psnr_serial=mean["serial"][0], psnr_parallel=mean["parallel"][0],
                         psnr_baseline=mean["baseline"][0], ssim_serial=mean["serial"][1],
                         ssim_parallel=mean["parallel"][1], ssim_baseline=mean["baseline"][1],
                         diff=(res.x0 - serial).abs().max().item()))
        view = degraded_view(op, y)[0].cpu()
        db = {key: fmt_db(v[0][0]) for key, v in per_image.items()}
        grid.append((name, [
            figures.Cell(io.to_display(view), degraded_caption(view, truth[0].cpu())),
            figures.Cell(io.to_display(base[0].cpu()), f"{db['baseline']} dB"),
            figures.Cell(io.to_display(serial[0].cpu()), f"{db['serial']} dB"),
            figures.Cell(io.to_display(res.x0[0].cpu()),
                         f"{db['parallel']} dB, {plural(res.iterations, 'round')}"),
            figures.Cell(io.to_display(truth[0].cpu()), "truth")]))
    generated, cells = generation_row(model, schedule, truth.shape, args, reporter)
    rows.append(generated)
    grid.append(("generate", cells))
    traces["generate (DDIM)"] = generated.pop("trace")
    print_table(rows)
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
    print(f"\nwrote {out / 'demo.png'} and {out / 'convergence.png'}")
    return 0


def degraded_caption(view, truth) -> str:
    """PSNR of the degraded input when it is comparable with the truth, else its size."""
    if view.shape == truth.shape:
        return f"{fmt_db(quality(view, truth)[0])} dB"
    kind = "grey" if view.shape[0] == 1 else "input"
    return f"{view.shape[-2]}x{view.shape[-1]} {kind}"


def generation_row(model, schedule, shape, args, reporter: Reporter):
    """Unconditional DDIM sampling: the deterministic chain the parallel solve converges
    on fastest (no ground truth, so no PSNR)."""
    import deqir_fast as dq
    from . import figures
    from . import image_io as io
    chain = dq.DDIM(schedule, dq.timesteps(schedule, args.steps))
    x_T = initial_noise(args.seed, shape, args.device)
    bar = StepProgress(reporter, "generate serial", args.steps)
    t0 = time.perf_counter()
    serial = dq.sample_serial(model, chain, x_T, callback=bar)
    t_serial = time.perf_counter() - t0
    bar.close()
    bar = RoundProgress(reporter, "generate parallel", args.steps)
    res = dq.solve(model, chain, x_T, callback=bar, **solve_options(args))
    bar.close()
    nan = float("nan")
    diff = (res.x0 - serial).abs().max().item()
    row = dict(task="generate", sampler="ddim", steps=args.steps, rounds=res.iterations,
               nfe=res.nfe, t_serial=t_serial, t_parallel=res.seconds, psnr_serial=nan,
               psnr_parallel=nan, psnr_baseline=nan, ssim_serial=nan, ssim_parallel=nan,
               ssim_baseline=nan, diff=diff,
               trace={"residuals": res.residuals, "converged": res.converged})
    cells = [figures.Cell(io.to_display(x_T[0].cpu() / 3), "noise x_T (scaled 1/3)"),
             figures.Cell(None),
             figures.Cell(io.to_display(serial[0].cpu()), plural(args.steps, "step")),
             figures.Cell(io.to_display(res.x0[0].cpu()),
                          f"{plural(res.iterations, 'round')}, |Δ| {diff:.0e}"),
             figures.Cell(None)]
    return row, cells


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


# -- info ---------------------------------------------------------------------------------
def _version(package: str) -> str:
    from importlib import metadata
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def devices() -> list:
    import torch
    found = [torch.device("cpu")]
    if torch.cuda.is_available():
        found += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append(torch.device("mps"))
    return found


def device_lines() -> List[Tuple[str, str]]:
    import torch
    lines = [("cpu", f"{plural(torch.get_num_threads(), 'thread')} (OMP_NUM_THREADS="
                     f"{os.environ.get('OMP_NUM_THREADS', 'unset')})")]
    for device in devices()[1:]:
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            lines.append((str(device), f"{props.name}, {props.total_memory / 2**30:.0f} GiB, "
                                       f"compute {props.major}.{props.minor}"))
        else:
            lines.append((str(device), "available"))
    if len(lines) == 1:
        lines.append(("cuda", "none visible to torch"))
    return lines


def backend_lines() -> List[Tuple[str, str]]:
    """The hot operations' backends: which exist, which one each device gets and why
    (``deqir_fast/ops/backends.py``). The "scan backends" line lists only the backends
    usable on some device here, and says why each other one is not."""
    from .ops import backends
    found = devices()
    lines = backends.info_lines(found)
    usable, unusable = [], []
    for name in backends.CHOICES[1:]:                 # CHOICES[0] is "auto"
        reasons = []
        for device in found:
            try:
                ok, why = backends.available(device)[name]
            except Exception as exc:  # noqa: BLE001 - info never fails on one probe
                ok, why = False, f"error: {exc}"
            if ok:
                break
            reasons.append(why)
        else:
            # The same reason on every device is said once; else the first device's.
            unusable.append(f"{name} ({reasons[0] if reasons else 'no device'})")
            continue
        usable.append(name + (" (reference)" if name == "torch" else ""))
    text = ", ".join(usable) + (f"; not usable here: {'; '.join(unusable)}" if unusable else "")
    return [(key, text if key == "scan backends" else value) for key, value in lines]


def environment_lines() -> List[Tuple[str, str]]:
    import platform

    import torch
    cuda = torch.version.cuda or "none"
    lines = [("deqir-fast", __version__), ("python", platform.python_version()),
             ("torch", f"{torch.__version__} (CUDA build: {cuda})")]
    lines += [(name, _version(name)) for name in ("triton", "diffusers", "numpy", "scikit-image",
                                                  "pillow", "matplotlib")]
    return lines + device_lines() + backend_lines()


def run_info(args) -> int:
    lines = environment_lines()
    width = max(len(k) for k, _ in lines) + 2
    for key, value in lines:
        print(f"{key:<{width}}{value}")
    return 0


# -- optional dependencies ------------------------------------------------------------------
# The modules that the optional extra installs, by import name -> distribution name.
EXTRA_MODULES = {"PIL": "pillow", "skimage": "scikit-image", "tqdm": "tqdm",
                 "diffusers": "diffusers", "safetensors": "safetensors",
                 "matplotlib": "matplotlib"}


def required_modules(args) -> List[str]:
    """The optional modules a command will import, so that a missing one is reported
    before any work (the model, a benchmark) starts."""
    if args.command == "restore":
        needed = ["PIL", "tqdm", "diffusers", "safetensors"]
        if args.simulate or args.resize or args.crop:
            needed.append("skimage")                   # metrics, resizing
        if args.simulate:
            needed.append("matplotlib")                # the comparison figure
        return needed
    if args.command == "demo":
        return ["diffusers", "safetensors", "skimage", "matplotlib", "tqdm"]
    if args.command == "bench":
        return ["tqdm"] + ([] if getattr(args, "no_plots", False) else ["matplotlib"])
    return []


def extra_for(distribution: str) -> str:
    """The extra of deqir_fast that installs ``distribution``, read from the installed
    metadata (setup.py's extras_require); "demo" when the metadata cannot say."""
    import re
    from importlib import metadata
    try:
        requirements = metadata.requires("deqir_fast") or []
    except metadata.PackageNotFoundError:
        return "demo"
    for line in requirements:
        match = re.match(r"\s*([A-Za-z0-9_.\-]+).*;\s*extra\s*==\s*['\"]([^'\"]+)['\"]", line)
        if match and match.group(1).lower() == distribution.lower():
            return match.group(2)
    return "demo"


def missing_extras_message(command: str, modules: List[str]) -> str:
    names = [EXTRA_MODULES.get(m, m) for m in modules]
    extras = sorted({extra_for(n) for n in names})
    install = " ".join(f'"deqir_fast[{e}]"' for e in extras)
    return (f"deqir-fast {command} needs {', '.join(names)}, which "
            f"{'is' if len(names) == 1 else 'are'} not installed: pip install {install}")


def check_modules(args) -> None:
    """Raise one error naming every missing optional module and the extra to install."""
    import importlib.util
    missing = []
    for name in required_modules(args):
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    if missing:
        raise ModuleNotFoundError(missing_extras_message(args.command, missing),
                                  name=missing[0])


# -- arguments ----------------------------------------------------------------------------
class _GivenStore(argparse._StoreAction):
    """argparse's store, recording which options the command line gave (a default is not
    a choice the user made, so it gets no note) and refusing a second value where the
    first would be dropped without a word: an error for ``--task`` (which image problem
    is solved), a note for the rest (scripts override a default given earlier)."""

    REFUSED_TWICE = ("task",)

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(namespace, "_given", None)
        if given is None:
            given = {}
            setattr(namespace, "_given", given)
        text = ",".join(map(str, values)) if isinstance(values, list) else str(values)
        if self.dest in given:
            first = given[self.dest]
            if self.dest in self.REFUSED_TWICE:
                raise argparse.ArgumentError(self, f"given twice ({first}, then {text}); "
                                                   f"give it once")
            notes = getattr(namespace, "_notes", None) or []
            notes.append(f"{option_string} given twice ({first}, then {text}): using {text}")
            setattr(namespace, "_notes", notes)
        given[self.dest] = text
        super().__call__(parser, namespace, values, option_string)


def given_options(args) -> Dict[str, str]:
    """dest -> text of the options given on the command line (not defaulted)."""
    return getattr(args, "_given", None) or {}


class _LazySubParsers(argparse._SubParsersAction):
    """Subcommands whose options are added once the subcommand is chosen (``builders``):
    they import torch, which the top level's --version and --help need not wait for."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.builders = {}

    def __call__(self, parser, namespace, values, option_string=None):
        self.build(values[0])
        super().__call__(parser, namespace, values, option_string)

    def build(self, name: str) -> None:
        builder = self.builders.pop(name, None)
        if builder is not None:
            builder(self._name_parser_map[name])

    def build_all(self) -> None:
        for name in list(self.builders):
            self.build(name)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (the default prints the whole usage first)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register("action", None, _GivenStore)
        self.register("action", "store", _GivenStore)
        self.register("action", "parsers", _LazySubParsers)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and appends every option's default."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=32)

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" in text or not action.option_strings
                or any(action.default is v for v in (None, False, argparse.SUPPRESS))):
            return text
        return f"{text} (default: %(default)s)"


def _checked(convert, test, requirement: str):
    """An argparse type: ``convert`` the text, then require ``test``."""
    def parse(text: str):
        try:
            value = convert(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value
    return parse


positive_int = _checked(int, lambda v: v >= 1, "an integer >= 1")
non_negative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
seed_int = _checked(int, lambda v: 0 <= v <= MAX_SEED,
                    f"an integer from 0 to 2**63 - 1 = {MAX_SEED}")
# float() accepts "inf" and "nan", which no option of this program means: every float
# option must be finite (a NaN tolerance would never stop, an infinite one stop at once).
finite_float = _checked(float, math.isfinite, "a finite number")
non_negative_float = _checked(float, lambda v: math.isfinite(v) and v >= 0,
                              "a finite number >= 0")
positive_float = _checked(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def _finite_floats(parser: argparse.ArgumentParser) -> None:
    """Give every option typed as a plain ``float`` (e.g. bench's) the finite check."""
    for action in parser._actions:
        if action.type is float:
            action.type = finite_float


def device_arg(text: str):
    """cpu, cuda, cuda:N, mps or auto (the first CUDA device when there is one)."""
    import torch
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda, cuda:N or "
                                         f"auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text} was asked for, but torch sees no CUDA "
                                             f"device (`deqir-fast info` lists the devices)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: torch sees {torch.cuda.device_count()} "
                                             f"CUDA device(s)")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise argparse.ArgumentTypeError(f"{text} was asked for, but MPS is not available")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}; use cpu, cuda, cuda:N "
                                         f"or auto")
    return device


def task_arg(text: str) -> str:
    from .tasks import TASKS
    if text not in TASKS:
        raise argparse.ArgumentTypeError(f"unknown task {text!r}; known tasks: "
                                         f"{', '.join(sorted(TASKS))}")
    return text


def task_list(text: str) -> List[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("needs at least one task name")
    return [task_arg(n) for n in names]


def add_chain_options(p, steps: int) -> None:
    g = p.add_argument_group("sampler")
    g.add_argument("--sampler", choices=SAMPLERS, default="ddrm",
                   help="DDRM (Kawar et al. 2022) or DDNM (Wang et al. 2023)")
    g.add_argument("--steps", type=positive_int, default=steps, metavar="S",
                   help="sampling steps (model evaluations of the serial sampler)")


def add_solver_options(p) -> None:
    from .api import DEFAULT_LINEARIZE, DEFAULT_SOLVER, DEFAULT_TOL
    from .linearize import LINEARIZATIONS
    from .solvers import SOLVERS
    g = p.add_argument_group("parallel solve")
    g.add_argument("--solver", choices=tuple(SOLVERS), default=DEFAULT_SOLVER,
                   help="fixed-point solver of the parallel mode")
    g.add_argument("--linearize", choices=LINEARIZATIONS, default=DEFAULT_LINEARIZE,
                   help="Jacobian guess folded into each round's scan (docs/design.md §3a); "
                        "none: the plain map")
    g.add_argument("--tol", type=non_negative_float, default=DEFAULT_TOL,
                   help="stopping tolerance per step, in noise units (0: iterate to the exact "
                        "serial result)")
    g.add_argument("--window", type=positive_int, default=None, metavar="W",
                   help="steps evaluated per round (sliding window; bounds memory to W x batch "
                        "images per model call; default: all S steps)")


def solve_options(args) -> dict:
    """The keyword arguments of dq.solve that the parallel-solve options set."""
    return dict(solver=args.solver, linearize=args.linearize, tol=args.tol, window=args.window)


def add_run_options(p) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=seed_int, default=0,
                   help="seed of every random draw, 0 to 2**63 - 1")
    g.add_argument("--device", type=device_arg, default="auto",
                   help="cpu, cuda, cuda:N, mps, or auto (CUDA when torch sees a GPU)")
    g.add_argument("--quiet", action="store_true", help="no progress bars or notes")
    g.add_argument("--verbose", action="store_true", help="show the traceback of an error")


DESCRIPTION = """\
Restore images with a diffusion model (DDRM or DDNM), solving the whole sampling chain
as one parallel fixed-point system (DeqIR) or step by step. Without --model, the bundled
1.1M-parameter UNet (32x32 coloured digits) is used."""

EXAMPLES = """\
examples:
  deqir-fast demo                                   # bundled images: serial vs parallel
  deqir-fast restore low.png --task sr4 --out high.png
  deqir-fast restore photo.png --task inpaint_box --simulate --resize --crop
  deqir-fast restore scans/ --task deblur_gauss --out restored/
  deqir-fast restore 'frames/*.png' --task denoise --mode parallel --window 10 --out out/
  deqir-fast info"""


def _build_restore(r) -> None:
    from .tasks import TASKS
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
                   help="parallel: solve all steps at once; serial: step by step; auto: "
                        "serial on a CPU, parallel on a GPU")
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


def _build_demo(d) -> None:
    d.add_argument("--tasks", type=task_list, default=None,
                   help=f"comma-separated tasks (default: {','.join(DEMO_TASKS)})")
    d.add_argument("--images", type=positive_int, default=4, help="held-out images per task")
    d.add_argument("--out", default="out", metavar="FOLDER", help="folder for the figures")
    add_chain_options(d, steps=20)
    add_solver_options(d)
    add_run_options(d)


def _build_info(i) -> None:
    i.add_argument("--verbose", action="store_true", help="show the traceback of an error")


def _build_bench(b) -> None:
    from . import benchmark
    b.description, b.epilog = benchmark.DESCRIPTION, benchmark.EXAMPLES
    benchmark.add_bench_arguments(b)
    add_run_options(b)


def build_parser(lazy: bool = False) -> argparse.ArgumentParser:
    """The whole parser; ``lazy``: each subcommand's options are added only when it is
    parsed (what ``main`` uses, so that --version and --help import nothing heavy)."""
    p = _Parser(prog="deqir-fast", description=DESCRIPTION, epilog=EXAMPLES,
                formatter_class=_HelpFormatter)
    p.add_argument("--version", action="version", version=f"deqir-fast {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    builders = {
        "restore": (dict(help="restore images (files, folders or glob patterns)",
                         description=DESCRIPTION, epilog=EXAMPLES), _build_restore),
        "demo": (dict(help="restore bundled held-out images serially and in parallel; print a "
                           "table, save demo.png and convergence.png",
                      description="Restore bundled held-out images (coloured digits) with the "
                                  "bundled model, serially and in parallel, for several tasks; "
                                  "print rounds, model evaluations, times, PSNR/SSIM against "
                                  "the truth and a baseline; save demo.png and convergence.png."),
                 _build_demo),
        "info": (dict(help="versions, devices and kernel backends",
                      description="Print the versions of deqir-fast and its dependencies, the "
                                  "devices torch sees and the kernel backends each would use."),
                 _build_info),
        "bench": (dict(help="benchmark serial against parallel sampling: tables, JSON, plots"),
                  _build_bench),
    }
    for name, (kwargs, build) in builders.items():
        parser = sub.add_parser(name, formatter_class=_HelpFormatter, **kwargs)
        sub.builders[name] = lambda parser, build=build: (build(parser), _finite_floats(parser))
    if not lazy:
        sub.build_all()
    return p


def check_args(parser: argparse.ArgumentParser, args) -> None:
    """Checks that span several options (one option's own checks are its type's), reported
    as the subcommand's usage errors."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command = sub._name_parser_map[args.command]
    if getattr(args, "quiet", False) and getattr(args, "verbose", False):
        command.error("--quiet and --verbose contradict each other (--quiet hides notes and "
                      "progress, --verbose adds tracebacks); give one")
    if getattr(args, "out", None) == "":
        # Path("") is the current folder: an empty --out would write there unasked.
        what = ("an output file (e.g. restored.png) or a folder ending in /"
                if args.command == "restore" else "a folder")
        command.error(f"argument --out: is empty; name {what}")


def run_bench(args) -> int:
    from .benchmark import run_cli
    return run_cli(args)


COMMANDS = {"restore": run_restore, "demo": run_demo, "info": run_info, "bench": run_bench}


def main(argv: Optional[list] = None) -> int:
    parser = build_parser(lazy=True)
    args = parser.parse_args(argv)
    check_args(parser, args)
    reporter = Reporter(getattr(args, "quiet", False))
    for text in getattr(args, "_notes", None) or []:
        reporter.note(text)
    try:
        check_modules(args)
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("deqir-fast: interrupted; nothing was written", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        # An optional dependency: name the extra that installs it.
        top = (exc.name or "").split(".")[0]
        if top in EXTRA_MODULES and "pip install" not in str(exc):
            exc = ModuleNotFoundError(missing_extras_message(args.command, [top]), name=top)
        return _fail(exc, args, 2, hint="")
    except (ValueError, TypeError, OSError, ImportError) as exc:
        # Mistakes in what was asked for: a one-line message says what to change.
        return _fail(exc, args, 2, hint="")
    except Exception as exc:  # noqa: BLE001 - anything else is a bug or a device failure
        return _fail(exc, args, 1, hint=" (--verbose shows the traceback)")


def _fail(exc: BaseException, args, code: int, hint: str) -> int:
    if getattr(args, "verbose", False):
        traceback.print_exc()
    message = " ".join(str(exc).split()) or type(exc).__name__
    if code != 2:
        message = f"{type(exc).__name__}: {message}"
    print(f"deqir-fast: error: {message}{'' if getattr(args, 'verbose', False) else hint}",
          file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
