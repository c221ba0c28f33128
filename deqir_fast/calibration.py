"""The calibration catalogue: the models and chains on which the stopping rule was
calibrated (``bench/calibrate.py``, bench/RESULTS.md §8) and on which ``deqir-fast bench``
measures. It lives in the package because ``deqir-fast bench`` needs it at run time;
the recording and replay scripts in ``bench/`` import it from here.

- ``load("bundled")``: the bundled UNet (coloured digits, 3x32x32, linear betas) and its
  held-out digits.
- ``load_folder(folder)``: any diffusers UNet2DModel folder with a ``heldout.npz`` of
  clean images (e.g. the source repository's ``bench/models/photo16``: photo patches,
  cosine betas; it is not installed with the package).
- ``chains(schedule, steps, truth, seed)``: the calibration chains, by name
  (``CHAIN_NAMES``), on one clean image.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Tuple, Union

import torch

from .chains import DDIM, DDNM, DDRM
from .operators import Deblurring, Inpainting, SuperResolution
from .schedules import Schedule, timesteps

GREY = 2 / 255
"""One 8-bit grey level on the [-1, 1] scale: the calibration target."""

CHAIN_NAMES = ("DDIM", "DDIM-eta0.5", "DDPM", "DDRM-inp", "DDRM-sr2", "DDRM-deblur",
               "DDNM-sr2", "DDNM-inp", "DDNM+-sr2")
"""The names ``chains`` yields, in its order."""

MODEL_NAMES = ("bundled",)
"""The models ``load`` knows by name (others: ``load_folder``)."""


def load(model_name: str):
    """(model, schedule, clean images [N, C, H, W]) of a model the package ships."""
    if model_name == "bundled":
        from .models import bundled_model, heldout_images
        return bundled_model(), Schedule.linear(1000), heldout_images()
    if model_name == "photo16":
        raise ValueError("photo16 is not installed with the package: it is kept in the source "
                         "repository (bench/models/photo16); load it with load_folder(FOLDER) "
                         "(deqir-fast bench --model path/to/bench/models/photo16)")
    raise ValueError(f"unknown calibration model {model_name!r}; known: {', '.join(MODEL_NAMES)} "
                     f"(or a folder: load_folder)")


def load_folder(folder: Union[str, Path]):
    """(model, schedule, clean images [N, C, H, W]) of a diffusers UNet2DModel folder
    with its scheduler config and a ``heldout.npz`` (array ``images``)."""
    import numpy as np

    from .models import load_unet
    folder = Path(folder)
    heldout = folder / "heldout.npz"
    if not heldout.is_file():
        raise ValueError(f"{folder}: no heldout.npz (clean images to degrade)")
    model = load_unet(folder)
    images = torch.from_numpy(np.load(heldout)["images"]).float()
    return model, model.schedule or Schedule.linear(1000), images


def chains(schedule: Schedule, steps: int, truth: torch.Tensor,
           seed: int = 0) -> Iterator[Tuple[str, object]]:
    """The calibration chains on one clean image ``truth`` [1, C, H, W] (or a batch):
    (name, chain) in the order of ``CHAIN_NAMES``. DDRM inpainting keeps 30% of the
    pixels with sigma_y 0.05; super-resolution is x2 block averages; the deblurring is a
    Gaussian blur (std 1.5, reflect padding) with sigma_y 0.02."""
    shape = tuple(truth.shape[1:])
    ts = timesteps(schedule, steps)
    gen = torch.Generator().manual_seed(seed + 5)
    inp = Inpainting.random(shape, 0.7, seed)
    sr = SuperResolution(2, shape)
    blur = Deblurring.gaussian(shape, 1.5, padding="reflect")

    def noisy(op, s):
        clean = op.A(truth)
        return clean + s * torch.randn(clean.shape, generator=gen)

    yield "DDIM", DDIM(schedule, ts)
    yield "DDIM-eta0.5", DDIM(schedule, ts, eta=0.5)
    yield "DDPM", DDIM(schedule, ts, eta=1.0)
    yield "DDRM-inp", DDRM(schedule, ts, operator=inp, y=noisy(inp, 0.05) * inp.singulars_as(truth),
                           sigma_y=0.05)
    yield "DDRM-sr2", DDRM(schedule, ts, operator=sr, y=sr.A(truth), sigma_y=0.0)
    yield "DDRM-deblur", DDRM(schedule, ts, operator=blur, y=noisy(blur, 0.02), sigma_y=0.02)
    yield "DDNM-sr2", DDNM(schedule, ts, operator=sr, y=sr.A(truth))
    yield "DDNM-inp", DDNM(schedule, ts, operator=inp, y=inp.A(truth), eta=0.85)
    yield "DDNM+-sr2", DDNM(schedule, ts, operator=sr, y=noisy(sr, 0.05), sigma_y=0.05)
