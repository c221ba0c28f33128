"""Random inputs for the fused-round op tests (tests/test_kernels.py in-process, and
tests/triton_round_check.py under Triton's interpreter). Every input is a fresh random
draw (never zeros), in float64; tests cast them to the dtype under test."""
from __future__ import annotations

import math

import torch

import deqir_fast as dq
from deqir_fast.ops.fused_round import KernelSpec, step_table, window_coefficients
from deqir_fast.ops.layout import NUM_CLASSES

SCHEDULE = dq.Schedule.linear(1000, beta_start=1e-4, beta_end=0.02)


def singulars(item, kind, gen):
    """Zeros (null space) on about a quarter of the elements and values spread over
    [0.01, 3] elsewhere, so that s·σ' crosses σ_y inside a chain; ``broadcast`` gives one
    value per (H, W) shared by the channels, as operators like inpainting lay them out."""
    shape = item if kind == "full" else (1, *item[1:])
    s = torch.exp(torch.empty(shape, dtype=torch.float64).uniform_(math.log(0.01), math.log(3.0),
                                                                   generator=gen))
    return torch.where(torch.rand(shape, generator=gen, dtype=torch.float64) < 0.25, 0.0, s)


def spec_for(sampler, S, *, eta=0.0, eta_b=1.0, sigma_y=0.0, s=None):
    ts = dq.timesteps(SCHEDULE, S)
    ac = SCHEDULE.alphas_cumprod
    alpha = ac[ts]
    alpha_next = torch.cat([ac[ts[1:]], torch.ones(1, dtype=torch.float64)])
    return KernelSpec(sampler, alpha, alpha_next, eta=eta, eta_b=eta_b, sigma_y=sigma_y,
                      singulars=s, uses_y=sampler != "ddim",
                      uses_noise=sampler == "ddrm" or eta > 0)


def make_case(sampler, *, S, lo, hi, B, item, seed, eta=0.3, eta_b=1.0, sigma_y=0.1,
              s_kind="full", ybar="item", noise=True, slopes="class"):
    """A window [lo, hi) of an S-step chain with all op inputs in float64.
    ybar: 'item' ([B, ...]) or 'shared' ([1, ...]); slopes: None, 'step' ([W, 1, 1]),
    'item' ([W, B, 1]) or 'class' ([W, B, K])."""
    gen = torch.Generator().manual_seed(seed)
    s = None if sampler == "ddim" else singulars(item, s_kind, gen)
    spec = spec_for(sampler, S, eta=eta, eta_b=eta_b, sigma_y=sigma_y, s=s)
    W = hi - lo
    rnd = lambda *shape: torch.randn(shape, generator=gen, dtype=torch.float64)  # noqa: E731
    K = NUM_CLASSES[sampler]
    shapes = {None: None, "step": (W, 1, 1), "item": (W, B, 1), "class": (W, B, K),
              "shared-class": (W, 1, K)}
    case = dict(
        sampler=sampler, spec=spec, table=step_table(spec)[lo:hi],
        E=rnd(W, B, *item), U=rnd(W, B, *item), x_last=rnd(B, *item),
        scale=torch.rand(W, generator=gen, dtype=torch.float64) + 0.5,
        s=s,
        ybar=None if sampler == "ddim" else rnd(B if ybar == "item" else 1, *item),
        noise=rnd(W, B, *item) if (noise and spec.uses_noise) else None,
        slopes=None if slopes is None else torch.rand(shapes[slopes], generator=gen, dtype=torch.float64) * 2,
    )
    return case


def classes_in(case):
    """The set of Jacobian classes the window's elements fall in."""
    if case["sampler"] == "ddim":
        return {0}
    *_, cls = window_coefficients(case["sampler"], case["table"], case["s"], case["s"].dim())
    return set(cls.unique().tolist())


def cast(case, dtype):
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and k not in ("table", "scale") else v)
            for k, v in case.items()}


def call(fn, case, **kw):
    return fn(case["sampler"], case["table"], case["E"], case["U"], case["x_last"], case["scale"],
              case["s"], case["ybar"], case["noise"], case["slopes"], **kw)


def within_criterion(out, ref_lowp, ref64, dtype):
    """flash-attention's test criterion: the backend's error against the float64
    reference is within twice the reference's own error in ``dtype``, plus atol."""
    atol = (1e-6 if dtype == torch.float32 else 1e-12) * max(1.0, float(ref64.abs().max()))
    err = float((out.double() - ref64).abs().max())
    ref_err = float((ref_lowp.double() - ref64).abs().max())
    return err <= 2 * ref_err + atol, f"error {err:.3e} > 2 x {ref_err:.3e} + {atol:.1e}"


# The grid both backends run: every sampler; B = 1 and > 1; odd item shapes; ȳ shared
# and per item; J absent, per step, per item, per (item, class) and per class shared
# across the batch; noise on and off; DDRM with η_b ∈ {0, 0.5, 1} and σ_y ∈ {0, 0.1}
# (s·σ' crosses σ_y inside the window), DDNM and DDNM+.
GRID = [
    ("ddim", dict(S=9, lo=0, hi=9, B=1, item=(1, 3, 5), eta=0.0, slopes="step", noise=False)),
    ("ddim", dict(S=30, lo=7, hi=30, B=3, item=(3, 5, 7), eta=0.5, slopes="item")),
    ("ddrm", dict(S=12, lo=0, hi=12, B=1, item=(3, 5, 7), eta_b=0.0, sigma_y=0.1, slopes="class",
                  ybar="shared")),
    ("ddrm", dict(S=25, lo=3, hi=22, B=3, item=(2, 7, 5), eta_b=0.5, sigma_y=0.1, slopes="shared-class",
                  s_kind="broadcast")),
    ("ddrm", dict(S=20, lo=0, hi=20, B=2, item=(3, 4, 9), eta=0.85, eta_b=1.0, sigma_y=0.0,
                  slopes=None)),
    ("ddnm", dict(S=15, lo=2, hi=15, B=2, item=(3, 5, 7), sigma_y=0.0, slopes="class", noise=False,
                  eta=0.0)),
    ("ddnm", dict(S=40, lo=10, hi=40, B=1, item=(1, 9, 7), sigma_y=0.1, slopes="class",
                  s_kind="broadcast", ybar="shared")),
    # ȳ shared across a batch of 3 (batch stride 0): a kernel reading ȳ at the per-item
    # stride passes every case above (B = 1 wherever ȳ is shared) and fails here
    ("ddrm", dict(S=16, lo=0, hi=16, B=3, item=(2, 5, 6), eta_b=0.5, sigma_y=0.1, slopes="item",
                  ybar="shared")),
]
