"""Time the affine scan: the pure-PyTorch reference and (on CUDA) the Triton kernel.

    OMP_NUM_THREADS=1 python bench/scan.py                      # CPU: the reference only
    python bench/scan.py --device cuda                          # GPU: reference vs Triton

Shapes: a 100-step chain of [B, 3, H, W] states with per-element coefficients (DDRM/DDNM)
and a noise term. Medians over ``--repeats``; markdown table.
"""
from __future__ import annotations

import argparse

import torch
from timing import median_time

from deqir_fast.ops.scan import affine_scan_reference


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--shapes", default="100x1x3x64x64,100x4x3x256x256")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    print("| S x B x C x H x W | dtype | reference s | triton s | reference/triton | max abs diff |")
    print("|---|---|---|---|---|---|")
    for spec in args.shapes.split(","):
        S, B, C, H, W = (int(v) for v in spec.split("x"))
        for dtype in (torch.float32,):
            g = torch.Generator(device=device).manual_seed(0)
            mk = lambda *s: torch.randn(s, generator=g, device=device, dtype=dtype)  # noqa: E731
            P, Q, E, R, u0 = mk(S, 1, C, H, W), mk(S, 1, C, H, W), mk(S, B, C, H, W), mk(S, B, C, H, W), mk(B, C, H, W)
            t_ref = median_time(lambda: affine_scan_reference(P, Q, E, R, u0), args.repeats, sync)
            if device.type == "cuda":
                from deqir_fast.ops.triton_scan import affine_scan_triton
                t_tri = median_time(lambda: affine_scan_triton(P, Q, E, R, u0), args.repeats, sync)
                diff = (affine_scan_triton(P, Q, E, R, u0) - affine_scan_reference(P, Q, E, R, u0)).abs().max().item()
                print(f"| {spec} | {dtype} | {t_ref:.4f} | {t_tri:.4f} | {t_ref / t_tri:.1f}x | {diff:.1e} |")
            else:
                print(f"| {spec} | {dtype} | {t_ref:.4f} | - (no GPU) | - | - |")


if __name__ == "__main__":
    main()
