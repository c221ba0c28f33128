"""A registry of restoration tasks by name (``--task sr4``): each builds the degradation
operator for an image shape and carries the measurement noise level it is run with."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Sequence

from . import operators as ops


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    build: Callable[[Sequence[int], int], ops.Operator]
    sigma_y: float = 0.0


TASKS: Dict[str, Task] = {}


def register(name: str, description: str, build: Callable, sigma_y: float = 0.0) -> None:
    """Add a task: ``build(shape, seed) -> Operator``."""
    TASKS[name] = Task(name, description, build, sigma_y)


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def build_operator(name: str, shape: Sequence[int], seed: int = 0) -> ops.Operator:
    """The operator of task ``name`` for images of ``shape`` = (C, H, W)."""
    return get_task(name).build(tuple(int(s) for s in shape), seed)


def _box(shape, seed):
    _, h, w = shape
    return ops.Inpainting.box(shape, h // 4, w // 4, h // 2, w // 2)


register("denoise", "Gaussian noise of std 0.2 (on the [-1, 1] scale)",
         lambda shape, seed: ops.Identity(shape), sigma_y=0.2)
register("inpaint_random", "70% of the pixels missing at random",
         lambda shape, seed: ops.Inpainting.random(shape, 0.7, seed))
register("inpaint_channels", "70% of the values missing at random, per channel",
         lambda shape, seed: ops.Inpainting.random(shape, 0.7, seed, per_channel=True))
register("inpaint_box", "a centred box of half the height and width missing", _box)
for _f in (2, 4):
    register(f"sr{_f}", f"super-resolution x{_f} ({_f}x{_f} block averages)",
             lambda shape, seed, f=_f: ops.SuperResolution(f, shape))
    register(f"sr{_f}_bicubic", f"super-resolution x{_f} (antialiased bicubic downsampling)",
             lambda shape, seed, f=_f: ops.BicubicSuperResolution(f, shape))
register("deblur_gauss", "Gaussian blur, sigma 1.5 px, reflect padding",
         lambda shape, seed: ops.Deblurring.gaussian(shape, 1.5, padding="reflect"))
register("deblur_aniso", "anisotropic Gaussian blur, sigma 2.5 x 0.8 px",
         lambda shape, seed: ops.Deblurring.gaussian(shape, 2.5, 0.8))
register("deblur_uniform", "5x5 box blur, zero padding",
         lambda shape, seed: ops.Deblurring.uniform(shape, 5))
register("colorize", "colourisation from the channel mean",
         lambda shape, seed: ops.Colorization(shape))
for _r in (25, 50):
    register(f"cs{_r}", f"compressed sensing, {_r}% of the DCT coefficients",
             lambda shape, seed, r=_r: ops.CompressedSensing(shape, r / 100, seed))
