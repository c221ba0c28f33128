"""The models ``deqir-fast bench`` measures: the bundled UNet (from
``deqir_fast.calibration``, which the installed package carries), the exact Gaussian
mixture, a randomly initialised UNet of chosen cost (speed only), or a diffusers UNet
folder, each with ground-truth images for the restoration chains' measurements."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

import deqir_fast as dq

from .. import calibration
from ..models import EpsModel, load_unet
from .config import NAMED_MODELS, BenchConfig


@dataclass
class BenchModel:
    """A model to benchmark: ``model(x, t) -> eps``, its schedule, clean images for the
    restoration chains' measurements ([N, C, H, W] in [-1, 1], on the CPU), and what a
    user's own loop would call (``network(x, t)``, a diffusers output or a tensor) with
    its scheduler config (None: diffusers' DDIMScheduler defaults, linear betas)."""
    name: str
    model: Callable
    schedule: dq.Schedule
    truth: torch.Tensor
    network: Optional[Callable] = None
    scheduler_config: Optional[dict] = None
    speed_only: bool = False
    description: str = ""

    @property
    def shape(self):
        return tuple(self.truth.shape[1:])


def smooth_images(n: int, shape, seed: int) -> torch.Tensor:
    """n smooth random images in [-1, 1] (low-resolution noise, upsampled): stand-in
    ground truth for a model that brings no images."""
    C, H, W = shape
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand((n, C, max(H // 4, 1), max(W // 4, 1)), generator=gen) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(H, W), mode="bilinear", align_corners=False)


def random_unet(size: int, channels: Sequence[int], seed: int):
    """A randomly initialised diffusers UNet2DModel at size x size (attention at the
    lowest resolution only): a model of chosen cost, for speed only."""
    from diffusers import UNet2DModel
    n = len(channels)
    torch.manual_seed(seed)
    net = UNet2DModel(sample_size=size, in_channels=3, out_channels=3, layers_per_block=1,
                      block_out_channels=tuple(channels),
                      down_block_types=("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",),
                      up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
                      norm_num_groups=min(32, min(channels)))
    return net.eval().requires_grad_(False)


def _parameters(model) -> int:
    params = getattr(model, "parameters", None)
    return sum(p.numel() for p in params()) if params else 0


def load_model(cfg: BenchConfig) -> BenchModel:
    """The ``BenchModel`` that ``cfg.model`` names: bundled, gmm, random64, random256, or
    a diffusers UNet2DModel folder (the source repository's ``bench/models/photo16`` is
    one)."""
    name = str(cfg.model)
    if name == "bundled":
        model, schedule, images = calibration.load(name)
        return BenchModel(name, model, schedule, images.float(), network=model.network,
                          scheduler_config=model.scheduler_config,
                          description="the bundled 1.1M-parameter UNet (coloured digits, "
                                      "3x32x32), held-out digits")
    if name == "gmm":
        size = cfg.gmm_size
        schedule = dq.Schedule.linear(1000)
        model = dq.testing.GaussianMixtureDenoiser(schedule, (3, size, size), components=8,
                                                   std=0.15, dtype=torch.float32)
        return BenchModel(name, model, schedule, model.means.detach().clone(), network=model,
                          description=f"the exact Gaussian-mixture denoiser (8 components, std "
                                      f"0.15, 3x{size}x{size}); its means as ground truth")
    if name.startswith("random"):
        size = int(name[len("random"):] or 0)
        if size < 8:
            raise ValueError(f"--model {name}: say the size, e.g. random64 or random256")
        net = random_unet(size, cfg.random_channels, cfg.seed)
        model = EpsModel(net)
        return BenchModel(name, model, dq.Schedule.linear(1000),
                          smooth_images(8, (3, size, size), cfg.seed), network=net,
                          speed_only=True,
                          description=f"a randomly initialised UNet2DModel, channels "
                                      f"{tuple(cfg.random_channels)}, 3x{size}x{size}, "
                                      f"{_parameters(net) / 1e6:.2g}M parameters: speed only")
    folder = Path(name)
    if not folder.is_dir():
        raise ValueError(unknown_model(name))
    model = load_unet(folder)
    schedule = model.schedule or dq.Schedule.linear(1000)
    shape = _unet_shape(model.network)
    heldout = folder / "heldout.npz"
    if heldout.is_file():
        truth = torch.from_numpy(np.load(heldout)["images"]).float()
        source = "its heldout.npz"
    else:
        truth = smooth_images(8, shape, cfg.seed)
        source = "smooth random images as ground truth"
    sched = "its scheduler config" if model.schedule is not None else "linear betas (no config)"
    return BenchModel(folder.name, model, schedule, truth, network=model.network,
                      scheduler_config=model.scheduler_config,
                      description=f"{folder} ({_parameters(model.network) / 1e6:.2f}M parameters, "
                                  f"{sched}, {source})")


def unknown_model(name: str) -> str:
    text = f"--model {name}: not one of {', '.join(NAMED_MODELS)} and not a folder"
    if Path(name).name == "photo16":
        text += ("; photo16 is not installed with the package: pass its folder in the source "
                 "repository, --model path/to/bench/models/photo16")
    return text


def _unet_shape(net):
    config = net.config
    size = config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (config.in_channels, *size)
