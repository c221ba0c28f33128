"""What restore and demo share: the chains they build, simulated measurements, the
baseline a restoration must beat, PSNR/SSIM, the seeded draws, and the serial sampler and
parallel solve run with progress bars. Imported only when one of those commands runs, so
torch is imported here at module level (``deqir_fast.cli`` re-exports these names)."""
from __future__ import annotations

import math
from typing import Tuple

import torch

import deqir_fast as dq

from .. import image_io as io
from .. import operators as ops
from ..tasks import build_operator, get_task
from .options import SAMPLERS, solve_options
from .reporting import RoundProgress, StepProgress

# Seeds of the random draws, offset from --seed so that each draw has its own stream.
MEASUREMENT_SEED, X_T_SEED, CHAIN_NOISE_SEED = 1, 2, 3


def default_schedule():
    """The schedule of models that bring none: DDPM's linear betas (the bundled model's)."""
    return dq.Schedule.linear(1000, beta_start=1e-4, beta_end=0.02)


def model_schedule(model):
    """The model's own schedule when its folder has a scheduler config, else the default."""
    schedule = getattr(model, "schedule", None)
    return default_schedule() if schedule is None else schedule


def make_chain(sampler: str, schedule, steps: int, op, y, sigma_y: float):
    ts = dq.timesteps(schedule, steps)
    if sampler == "ddrm":
        return dq.DDRM(schedule, ts, operator=op, y=y, sigma_y=sigma_y, eta=0.85, eta_b=1.0)
    if sampler == "ddnm":
        return dq.DDNM(schedule, ts, operator=op, y=y, sigma_y=sigma_y, eta=0.0)
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")


def degrade(task_name: str, truth, seed: int):
    """(operator, y = A(truth) + noise, sigma_y) for a simulated measurement."""
    op = build_operator(task_name, truth.shape[1:], seed)
    sigma_y = get_task(task_name).sigma_y
    return op, measure(op, truth, sigma_y, seed), sigma_y


def measure(op, truth, sigma_y: float, seed: int):
    clean = op.A(truth)
    gen = torch.Generator().manual_seed(seed + MEASUREMENT_SEED)
    return clean + sigma_y * torch.randn(clean.shape, generator=gen).to(clean)


def baseline(op, y, shape):
    """The simple baseline a restoration must beat: bicubic upsampling for
    super-resolution, the pseudo-inverse (zero fill, or y itself) otherwise."""
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
    return op.pinv(y) if isinstance(op, ops.CompressedSensing) else y


def quality(x, truth) -> Tuple[float, float]:
    """PSNR (dB) and SSIM (scikit-image) of one image [C, H, W] against the truth, on the
    [0, 1] display range."""
    # scikit-image is an optional extra, which restore without --simulate does not need
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    a, b = io.to_display(x), io.to_display(truth)
    psnr = peak_signal_noise_ratio(b, a, data_range=1.0)
    win = min(7, *[n if n % 2 else n - 1 for n in b.shape[:2]])
    ssim = structural_similarity(b, a, data_range=1.0, channel_axis=-1, win_size=win)
    return float(psnr), float(ssim)


def degraded_caption(view, truth) -> str:
    """PSNR of the degraded input when it is comparable with the truth, else its size."""
    if view.shape == truth.shape:
        return f"{fmt_db(quality(view, truth)[0])} dB"
    kind = "grey" if view.shape[0] == 1 else "input"
    return f"{view.shape[-2]}x{view.shape[-1]} {kind}"


def initial_noise(seed: int, shape, device):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed + X_T_SEED)).to(device)


def chain_generator(seed: int, device):
    """The chain's per-step noise is drawn where the state lives."""
    return torch.Generator(device=device).manual_seed(seed + CHAIN_NOISE_SEED)


def fmt_db(value: float) -> str:
    return "-" if value != value else ("inf" if math.isinf(value) else f"{value:.2f}")


def serial_with_progress(model, chain, x_T, reporter, desc: str, steps: int, generator=None):
    """The serial sampler, with a progress bar over its steps."""
    bar = StepProgress(reporter, desc, steps)
    try:
        return dq.sample_serial(model, chain, x_T, generator=generator, callback=bar)
    finally:
        bar.close()


def parallel_with_progress(model, chain, x_T, args, reporter, desc: str, generator=None,
                           planned: bool = False):
    """The parallel solve with the command line's solver options (``solve_options``; the
    planner picks the window with ``planned``), with a progress bar over its rounds."""
    bar = RoundProgress(reporter, desc, args.steps)
    try:
        return dq.solve(model, chain, x_T, generator=generator, callback=bar,
                        **solve_options(args, planned=planned))
    finally:
        bar.close()
