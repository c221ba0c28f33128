"""Time the generic affine scan (materialised P, Q, R: the adjoint, chains without a
kernel spec): the pure-PyTorch reference and (on CUDA) the Triton kernel; and, with
``--fused``, the path a DDIM/DDRM/DDNM round took before the fused op (materialise the
window's float64 coefficients, cast, scan, then the residuals) against the fused round
(``bench/round.py`` has the fused round's own benchmark).

    OMP_NUM_THREADS=1 python bench/scan.py                      # CPU: the reference only
    OMP_NUM_THREADS=1 python bench/scan.py --fused              # + old round path vs fused round
    python bench/scan.py --device cuda --fused                  # GPU: reference vs Triton

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
    p.add_argument("--fused", action="store_true")
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
    if args.fused:
        fused_vs_old(args, device, sync)


def fused_vs_old(args, device, sync):
    """A DDRM round (4x super-resolution singular values, secant J per class) the old way
    (coefficients materialised in float64 and cast, generic scan, residuals) against the
    fused op on each backend."""
    import deqir_fast as dq
    from deqir_fast import operators as ops
    from deqir_fast.linearize import Linearization
    from deqir_fast.ops import backends, step_residuals
    from deqir_fast.ops.fused_round import fused_round, step_table
    print("\n| S x B x C x H x W | old round s | (+ coefficients, once per solve) s | fused torch s "
          "| fused native s | old/native |")
    print("|---|---|---|---|---|---|")
    sched = dq.Schedule.linear(1000)
    for spec in args.shapes.split(","):
        S, B, C, H, W = (int(v) for v in spec.split("x"))
        g = torch.Generator().manual_seed(0)
        op = ops.SuperResolution(4, (C, H, W))
        y = op.A(torch.rand((B, C, H, W), generator=g, dtype=torch.float64))
        chain = dq.DDRM(sched, dq.timesteps(sched, S), operator=op, y=y, sigma_y=0.05)
        mk = lambda *s: torch.randn(s, generator=g).to(device)  # noqa: E731
        x_T, noise, E, U, x_last = mk(B, C, H, W), mk(S, B, C, H, W), mk(S, B, C, H, W), mk(S, B, C, H, W), mk(B, C, H, W)
        scale = torch.ones(S, dtype=torch.float64, device=device)
        coeffs = chain.coefficients(x_T, noise)
        lin = Linearization(chain, coeffs, "secant")

        def materialise():                          # once per solve before the fused op
            c = chain.coefficients(x_T, noise)
            return c.P, c.Q, c.R                     # float64 [S, 1, C, H, W] math, cast
        P, Q, R = materialise()

        def old():
            FX = affine_scan_reference(P, Q, E, R, U[0], lin.jacobian(0, S), U)
            return FX, torch.cat([step_residuals(FX[:-1] - U[1:]), step_residuals(FX[-1:] - x_last[None])]).double()

        ks = chain.kernel_spec()
        args_f = dict(sampler="ddrm", table=step_table(ks).to(device), E=E, U=U, x_last=x_last, scale=scale,
                      s=ks.singulars.to(device=device, dtype=E.dtype).expand(C, H, W).contiguous(),
                      ybar=coeffs.ybar, noise=noise, slopes=lin.slopes)
        t_old = median_time(old, args.repeats, sync)
        t_mat = median_time(materialise, args.repeats, sync)
        t_t = median_time(lambda: fused_round(**args_f, backend="torch"), args.repeats, sync)
        native_ok = backends.available(device)["native"][0]
        t_n = median_time(lambda: fused_round(**args_f, backend="native"), args.repeats, sync) if native_ok else float("nan")
        print(f"| {spec} | {t_old:.4f} | {t_mat:.4f} | {t_t:.4f} | {t_n:.4f} | {t_old / t_n:.1f}x |")


if __name__ == "__main__":
    main()
