"""Train the small bundled diffusion model (a diffusers ``UNet2DModel``) on coloured
handwritten digits, offline and reproducibly (seeded).

Data: scikit-learn's 8x8 digits (1797 images, shipped with scikit-learn), upsampled to
32x32 and drawn in one of six ink colours on a dark background (so colourisation is a
real task). A seeded split holds out ``HELD_OUT`` digits that training never sees;
evaluation images of them are written next to the weights.

    pip install scikit-learn
    OMP_NUM_THREADS=2 python scripts/train_bundled_model.py        # ~13 min, 2 cores

writes ``deqir_fast/assets/model`` (config.json + safetensors),
``deqir_fast/assets/heldout.npz`` and ``docs/bundled_model_loss.csv``.
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as nnf
from diffusers import DDPMScheduler, UNet2DModel
from sklearn.datasets import load_digits
from tqdm import tqdm

SIZE = 32
HELD_OUT = 297
ROOT = Path(__file__).resolve().parents[1]
INKS = torch.tensor([[1.0, 0.25, 0.2], [0.2, 0.8, 0.3], [0.25, 0.45, 1.0],
                     [1.0, 0.85, 0.2], [0.9, 0.3, 0.9], [0.2, 0.9, 0.95]])
BACKGROUND = torch.tensor([0.08, 0.08, 0.1])


def digits(seed: int = 0):
    """(train, held-out) grey digits in [0, 1], [N, 1, 32, 32], split by a seeded shuffle."""
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
    return colour(held[:count], INKS[torch.arange(count) % len(INKS)])


def build_model() -> UNet2DModel:
    return UNet2DModel(
        sample_size=SIZE, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=16,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2200,
                        help="optimizer steps (2200 take ~13 min with 2 threads here)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "deqir_fast" / "assets")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    images, _ = digits()
    model = build_model()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                          beta_start=1e-4, beta_end=0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    ema = [p.detach().clone() for p in model.parameters()]
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M")

    losses, start = [], time.perf_counter()
    for step in tqdm(range(args.steps), desc="training", unit="step"):
        x0 = batch_of(images, args.batch, gen)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        xt = sched.add_noise(x0, noise, t)
        loss = nnf.mse_loss(model(xt, t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        frac = step / args.steps                       # cosine decay over the run

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
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out / "model")
    np.savez_compressed(args.out / "heldout.npz", images=heldout_images().numpy())
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    with open(docs / "bundled_model_loss.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["step", "seconds", "loss"])
        writer.writerows(losses)
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.0f} s; "
          f"last-100 mean loss {np.mean([l for _, _, l in losses[-100:]]):.4f}")
    save_plots(model.eval(), losses, docs, args.seed)


def save_plots(model, losses, docs: Path, seed: int) -> None:
    """The loss curve and a grid of 16 DDIM-50 samples (diffusers' scheduler)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from diffusers import DDIMScheduler

    steps, _, values = zip(*losses)
    smooth = np.convolve(values, np.ones(50) / 50, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.semilogy(steps, values, alpha=0.3, label="batch loss")
    ax.semilogy(steps[49:], smooth, label="50-step mean")
    ax.set_xlabel("step")
    ax.set_ylabel("eps MSE")
    ax.legend()
    fig.tight_layout()
    fig.savefig(docs / "bundled_model_loss.png", dpi=100)
    plt.close(fig)

    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                          beta_end=0.02, clip_sample=False, set_alpha_to_one=True)
    sched.set_timesteps(50)
    x = torch.randn((16, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(model(x, t).sample, t, x).prev_sample
    grid = ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    fig, axes = plt.subplots(2, 8, figsize=(8, 2.2))
    for img, ax in zip(grid, axes.flat):
        ax.imshow(img)
        ax.axis("off")
    fig.suptitle("DDIM-50 samples of the bundled model", fontsize=9)
    fig.tight_layout()
    fig.savefig(docs / "bundled_model_samples.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
