"""Train the small bundled diffusion model (a diffusers ``UNet2DModel``) on coloured
handwritten digits, offline and reproducibly (seeded).

Data: scikit-learn's 8x8 digits (1797 images, shipped with scikit-learn), upsampled to
32x32 and drawn in one of six ink colours on a dark background (so colourisation is a
real task). A seeded split holds out ``HELD_OUT`` digits that training never sees;
evaluation images of them are written next to the weights.

    pip install scikit-learn
    OMP_NUM_THREADS=2 python scripts/train_bundled_model.py        # ~13 min, 2 cores

writes ``deqir_fast/assets/model`` (config.json + safetensors + scheduler_config.json),
``deqir_fast/assets/heldout.npz`` and ``docs/bundled_model_loss.csv``.

``--preset photo16`` trains a second, differently made model for calibrating the solver
on more than one network (issue #8): 16x16 RGB patches of scikit-image's bundled
photographs (astronaut, coffee, chelsea, rocket, immunohistochemistry; all offline), taken
at 1/2, 1/3 and 1/4 scale with random flips; the right quarter of every photograph is
held out. Cosine (``squaredcos_cap_v2``) betas, a smaller two-level UNet (0.40 M
parameters, 1.6 MB). No scikit-learn needed:

    OMP_NUM_THREADS=1 python scripts/train_bundled_model.py --preset photo16

writes ``bench/models/photo16`` (config.json + safetensors + scheduler_config.json +
heldout.npz) and ``bench/models/photo16_{loss.csv,loss.png,samples.png}``; the measured
run is in ``bench/models/README.md``. Every run ends by printing the eps-MSE of the EMA
weights on held-out and on training images, stratified over t.
"""
from __future__ import annotations

import argparse
import csv
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Tuple

import numpy as np
import torch
import torch.nn.functional as nnf
from diffusers import DDPMScheduler, UNet2DModel
from tqdm import tqdm

SIZE = 32
HELD_OUT = 297
PATCH = 16
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")
PHOTO_SCALES = (2, 3, 4)
PHOTO_HELD_FRACTION = 0.25
ROOT = Path(__file__).resolve().parents[1]
INKS = torch.tensor([[1.0, 0.25, 0.2], [0.2, 0.8, 0.3], [0.25, 0.45, 1.0],
                     [1.0, 0.85, 0.2], [0.9, 0.3, 0.9], [0.2, 0.9, 0.95]])
BACKGROUND = torch.tensor([0.08, 0.08, 0.1])


def digits(seed: int = 0):
    """(train, held-out) grey digits in [0, 1], [N, 1, 32, 32], split by a seeded shuffle."""
    from sklearn.datasets import load_digits

    img = torch.from_numpy(load_digits().images).float().unsqueeze(1) / 16.0
    img = nnf.interpolate(img, size=(SIZE, SIZE), mode="bicubic", align_corners=False).clamp(0, 1)
    order = torch.randperm(img.shape[0], generator=torch.Generator().manual_seed(seed))
    return img[order[HELD_OUT:]], img[order[:HELD_OUT]]


def colour(grey: torch.Tensor, ink: torch.Tensor) -> torch.Tensor:
    """Ink colour where the digit is, dark background elsewhere; in [-1, 1]."""
    rgb = BACKGROUND.view(1, 3, 1, 1) * (1 - grey) + ink.view(-1, 3, 1, 1) * grey
    return rgb * 2 - 1


def batch_of(grey, n, gen):
    idx = torch.randint(grey.shape[0], (n,), generator=gen)
    ink = INKS[torch.randint(len(INKS), (n,), generator=gen)]
    return colour(grey[idx], ink)


def heldout_images(count: int = 16) -> torch.Tensor:
    _, held = digits()
    held = held[:count]
    return colour(held, INKS[torch.arange(held.shape[0]) % len(INKS)])


def photo_regions(held: bool) -> list:
    """Each photograph at each scale in PHOTO_SCALES, [3, H, W] in [-1, 1]: the left
    three quarters (training) or the right quarter (``held=True``) of every photograph."""
    from skimage import data

    regions = []
    for name in PHOTOS:
        img = torch.from_numpy(getattr(data, name)()[..., :3].copy()).permute(2, 0, 1)
        img = img.float().div(127.5).sub(1.0)
        cut = int(round(img.shape[-1] * (1 - PHOTO_HELD_FRACTION)))
        part = img[..., cut:] if held else img[..., :cut]
        for scale in PHOTO_SCALES:
            small = nnf.interpolate(part[None], scale_factor=1 / scale, mode="area")[0]
            regions.append(small.clamp(-1, 1))
    return regions


def photo_patches(regions: list, n: int, gen: torch.Generator) -> torch.Tensor:
    """n random PATCH x PATCH crops (region uniform, position uniform, random h-flip)."""
    out = torch.empty(n, 3, PATCH, PATCH)
    pick = torch.randint(len(regions), (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    for k in range(n):
        img = regions[int(pick[k])]
        i = int(torch.randint(img.shape[-2] - PATCH + 1, (1,), generator=gen))
        j = int(torch.randint(img.shape[-1] - PATCH + 1, (1,), generator=gen))
        crop = img[:, i:i + PATCH, j:j + PATCH]
        out[k] = crop.flip(-1) if flip[k] else crop
    return out


@dataclass(frozen=True)
class Preset:
    """One trained model: its data, noise schedule, network and where it is written."""
    size: int
    schedule: str                      # diffusers beta_schedule
    channels: Tuple[int, ...]
    down: Tuple[str, ...]
    up: Tuple[str, ...]
    norm_groups: int
    steps: int
    batch: int
    out: Path                          # the diffusers model folder
    heldout_file: str                  # 16 held-out evaluation images, relative to out
    docs: Path                         # loss curve and samples go here ...
    prefix: str                        # ... as {prefix}_loss.csv etc.
    title: str
    train_sampler: Callable            # () -> (gen, n) -> [n, 3, size, size] batch
    heldout: Callable                  # (count) -> [count, 3, size, size]


def _digits_sampler():
    images, _ = digits()
    return lambda gen, n: batch_of(images, n, gen)


def _photo_sampler():
    regions = photo_regions(held=False)
    return lambda gen, n: photo_patches(regions, n, gen)


def photo_heldout(count: int = 16, seed: int = 1) -> torch.Tensor:
    return photo_patches(photo_regions(held=True), count, torch.Generator().manual_seed(seed))


PRESETS = {
    "bundled": Preset(
        size=SIZE, schedule="linear", channels=(32, 64, 64),
        down=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_groups=16, steps=2200, batch=32,
        out=ROOT / "deqir_fast" / "assets" / "model",
        heldout_file="../heldout.npz",
        docs=ROOT / "docs", prefix="bundled_model",
        title="the bundled model", train_sampler=_digits_sampler, heldout=heldout_images),
    "photo16": Preset(
        size=PATCH, schedule="squaredcos_cap_v2", channels=(24, 48),
        down=("DownBlock2D", "AttnDownBlock2D"), up=("AttnUpBlock2D", "UpBlock2D"),
        norm_groups=8, steps=2000, batch=64,
        out=ROOT / "bench" / "models" / "photo16",
        heldout_file="heldout.npz",
        docs=ROOT / "bench" / "models",
        prefix="photo16", title="photo16", train_sampler=_photo_sampler, heldout=photo_heldout),
}


def build_model(preset: Preset = PRESETS["bundled"]) -> UNet2DModel:
    return UNet2DModel(
        sample_size=preset.size, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=preset.channels, norm_num_groups=preset.norm_groups,
        down_block_types=preset.down, up_block_types=preset.up,
    )


def make_scheduler(preset: Preset, cls=DDPMScheduler, **extra):
    """The training schedule as a diffusers scheduler (beta_start/end matter for linear)."""
    return cls(num_train_timesteps=1000, beta_schedule=preset.schedule, beta_start=1e-4,
               beta_end=0.02, clip_sample=False, **extra)


@torch.no_grad()
def eps_mse(model, sched, images: torch.Tensor, seed: int = 123, bands: int = 4) -> list:
    """eps-MSE on ``images`` with t stratified over [0, 1000): [overall, band 1, ...]."""
    gen = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    t = (torch.arange(n) * 1000) // n
    noise = torch.randn(images.shape, generator=gen)
    err = torch.cat([(model(sched.add_noise(x, e, tt), tt).sample - e).pow(2).flatten(1).mean(1)
                     for x, e, tt in zip(images.split(256), noise.split(256), t.split(256))])
    per_band = [float(err[(t >= 1000 * b // bands) & (t < 1000 * (b + 1) // bands)].mean())
                for b in range(bands)]
    return [float(err.mean())] + per_band


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="bundled",
                        help="bundled: coloured digits 32x32, linear betas (the package's "
                             "model); photo16: photograph patches 16x16, cosine betas")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps (bundled: 2200, ~13 min with 2 threads here; "
                             "photo16: 2000)")
    parser.add_argument("--batch", type=int, default=None, help="bundled: 32, photo16: 64")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="model folder (default: the preset's); heldout.npz goes "
                             "where the preset puts it relative to this folder")
    parser.add_argument("--docs", type=Path, default=None,
                        help="folder for the loss curve and samples (default: the preset's)")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    steps = args.steps or preset.steps
    batch = args.batch or preset.batch
    out = args.out or preset.out
    docs = args.docs or preset.docs

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    sample_batch = preset.train_sampler()
    model = build_model(preset)
    sched = make_scheduler(preset)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    ema = [p.detach().clone() for p in model.parameters()]
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M")

    losses, start = [], time.perf_counter()
    for step in tqdm(range(steps), desc="training", unit="step", mininterval=30):
        x0 = sample_batch(gen, batch)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        xt = sched.add_noise(x0, noise, t)
        loss = nnf.mse_loss(model(xt, t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        frac = step / steps                            # cosine decay over the run

        for group in opt.param_groups:
            group["lr"] = args.lr * 0.5 * (1.0 + np.cos(np.pi * frac))
        opt.step()
        # EMA over the last ~200 steps: a run of ~1-2k steps must not average in the
        # weights of its first minutes (0.999 did, and its samples came out as flat
        # colour fields).
        decay = min(0.995, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, model.parameters()):
                e.lerp_(p.detach(), 1.0 - decay)
        losses.append((step, time.perf_counter() - start, loss.item()))

    with torch.no_grad():
        for e, p in zip(ema, model.parameters()):
            p.copy_(e)
    model.eval()
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    sched.save_pretrained(out)                         # scheduler_config.json
    np.savez_compressed(out / preset.heldout_file, images=preset.heldout(16).numpy())
    docs.mkdir(parents=True, exist_ok=True)
    with open(docs / f"{preset.prefix}_loss.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["step", "seconds", "loss"])
        writer.writerows(losses)
    print(f"trained {steps} steps in {seconds:.0f} s; "
          f"last-100 mean loss {np.mean([l for _, _, l in losses[-100:]]):.4f}")
    bands = "/".join(f"t<{250 * (b + 1)}" for b in range(4))
    for name, images in (("held-out", preset.heldout(1024)),
                         ("training", sample_batch(torch.Generator().manual_seed(7), 1024))):
        mse = eps_mse(model, sched, images)
        print(f"EMA eps-MSE on {images.shape[0]} {name} images: {mse[0]:.4f} "
              f"({bands}: {' '.join(f'{v:.4f}' for v in mse[1:])})")
    save_plots(model, losses, preset, docs, args.seed)


def save_plots(model, losses, preset: Preset, docs: Path, seed: int) -> None:
    """The loss curve and a grid of 16 DDIM-50 samples (diffusers' scheduler)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from diffusers import DDIMScheduler

    size = preset.size

    steps, _, values = zip(*losses)
    smooth = np.convolve(values, np.ones(50) / 50, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.semilogy(steps, values, alpha=0.3, label="batch loss")
    ax.semilogy(steps[49:], smooth, label="50-step mean")
    ax.set_xlabel("step")
    ax.set_ylabel("eps MSE")
    ax.legend()
    fig.tight_layout()
    fig.savefig(docs / f"{preset.prefix}_loss.png", dpi=100)
    plt.close(fig)

    sched = make_scheduler(preset, DDIMScheduler, set_alpha_to_one=True)
    sched.set_timesteps(50)
    x = torch.randn((16, 3, size, size), generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(model(x, t).sample, t, x).prev_sample
    grid = ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    fig, axes = plt.subplots(2, 8, figsize=(8, 2.2))
    for img, ax in zip(grid, axes.flat):
        ax.imshow(img)
        ax.axis("off")
    fig.suptitle(f"DDIM-50 samples of {preset.title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(docs / f"{preset.prefix}_samples.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
