"""Train the small bundled diffusion model (a diffusers ``UNet2DModel``) on 32x32 RGB
patches of scikit-image's sample photographs, offline and reproducibly (seeded).

The held-out photographs (``HELD_OUT``) are never seen in training; evaluation crops of
them are written next to the weights, so the demo restores images the model never saw.

    OMP_NUM_THREADS=2 python scripts/train_bundled_model.py --minutes 14

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
from skimage import data as skdata
from skimage.transform import rescale
from tqdm import tqdm

TRAIN = ["astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
         "colorwheel", "coffee"]
HELD_OUT = ["chelsea"]
PATCH = 32
ROOT = Path(__file__).resolve().parents[1]


def load_photo(name: str, scale: float) -> np.ndarray:
    """An RGB photograph in [-1, 1], shrunk so 32x32 patches hold whole objects."""
    img = getattr(skdata, name)()[..., :3].astype(np.float64) / 255.0
    img = rescale(img, scale, channel_axis=-1, anti_aliasing=True)
    return (img * 2.0 - 1.0).astype(np.float32)


def photos(names, scales=(0.125, 0.25)):
    out = []
    for name in names:
        for scale in scales:
            img = load_photo(name, scale)
            if min(img.shape[:2]) >= PATCH:
                out.append(torch.from_numpy(img).permute(2, 0, 1).contiguous())
    return out


def random_patches(images, n, gen):
    idx = torch.randint(len(images), (n,), generator=gen)
    batch = []
    for i in idx.tolist():
        img = images[i]
        top = int(torch.randint(img.shape[1] - PATCH + 1, (1,), generator=gen))
        left = int(torch.randint(img.shape[2] - PATCH + 1, (1,), generator=gen))
        patch = img[:, top:top + PATCH, left:left + PATCH]
        if bool(torch.rand((), generator=gen) < 0.5):
            patch = patch.flip(-1)
        batch.append(patch)
    return torch.stack(batch)


def heldout_crops(count: int = 16, seed: int = 1) -> torch.Tensor:
    """Non-overlapping-ish evaluation crops of the held-out photographs."""
    gen = torch.Generator().manual_seed(seed)
    return random_patches(photos(HELD_OUT, scales=(0.125,)), count, gen)


def build_model() -> UNet2DModel:
    return UNet2DModel(
        sample_size=PATCH, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=16,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=14.0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "deqir_fast" / "assets")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    images = photos(TRAIN)
    model = build_model()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                          beta_start=1e-4, beta_end=0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    ema = [p.detach().clone() for p in model.parameters()]
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M")

    losses, start, step = [], time.perf_counter(), 0
    budget = args.minutes * 60.0
    bar = tqdm(desc="training", unit="step")
    while time.perf_counter() - start < budget:
        x0 = random_patches(images, args.batch, gen)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        xt = sched.add_noise(x0, noise, t)
        loss = nnf.mse_loss(model(xt, t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # Cosine decay over the wall-clock budget: the run length is set in minutes.
        frac = min((time.perf_counter() - start) / budget, 1.0)
        for group in opt.param_groups:
            group["lr"] = args.lr * 0.5 * (1.0 + np.cos(np.pi * frac))
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, model.parameters()):
                e.lerp_(p.detach(), 1.0 - decay)
        losses.append((step, time.perf_counter() - start, loss.item()))
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1][2]:.4f}")
    bar.close()

    with torch.no_grad():
        for e, p in zip(ema, model.parameters()):
            p.copy_(e)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out / "model")
    np.savez_compressed(args.out / "heldout.npz", images=heldout_crops().numpy(),
                        source=np.array(HELD_OUT))
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    with open(docs / "bundled_model_loss.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["step", "seconds", "loss"])
        writer.writerows(losses)
    print(f"trained {step} steps in {time.perf_counter() - start:.0f} s; "
          f"last-100 mean loss {np.mean([l for _, _, l in losses[-100:]]):.4f}")


if __name__ == "__main__":
    main()
