"""Initial guesses of ``solve`` (``init=``): "auto" picks "pinv" for restoration chains and
"jump" for DDIM; "pinv" starts x̂0 from A⁺y where the measurement sees the image.

Mutations these tests catch: "auto" resolving to "jump" for DDRM/DDNM; x̂0 = A⁺y taken on
elements with s ≤ σ_y (noise amplified) or everywhere s > 0 ignoring σ_y; the pinv
states missing the model's ε̂ term; the init's model call not counted in nfe.
"""
import pytest
import torch

import deqir_fast as dq
from conftest import make_problem
from deqir_fast.api import _prepare


def test_pinv_init_is_the_jump_from_the_pseudo_inverse(schedule):
    """σ_y = 0: the last state (ᾱ' = 1) is A⁺y exactly, and every state is
    sqrt(a') A⁺y + sqrt(1-a') ε̂ with ε̂ the model's ε at the initial state."""
    model, chain, x_T = make_problem(schedule, "ddrm", "sr", 12, 2, shape=(3, 8, 8))
    system, _ = _prepare(model, chain, x_T, None, torch.Generator().manual_seed(0))
    X = system.pinv_init()
    pinv = chain.operator.pinv(chain.y)
    assert torch.allclose(chain.from_basis(X[-1]), pinv, atol=1e-12)
    e = system.eps_bar(system.coeffs.u0.unsqueeze(0), 0)[0]
    an = chain.alpha_next.to(X).view(-1, 1, 1, 1, 1)
    assert torch.allclose(X, an.sqrt() * chain.to_basis(pinv) + (1 - an).sqrt() * e, atol=1e-12)


def test_pinv_init_ignores_elements_the_noise_would_swamp(schedule):
    """With σ_y > 0 only elements with s > σ_y take ȳ/s; the others start at x̂0 = 0."""
    from deqir_fast import operators as ops
    gen = torch.Generator().manual_seed(1)
    shape = (1, 6, 6)
    op = ops.Deblurring.gaussian(shape, 1.2)
    s = op.singulars_as(torch.zeros(1, *shape))
    sigma_y = float(s.flatten().sort().values[s.numel() // 2])     # half the elements below
    model = dq.testing.GaussianMixtureDenoiser(schedule, shape, seed=0, dtype=torch.float64)
    y = op.A(torch.rand((1, *shape), generator=gen, dtype=torch.float64))
    chain = dq.DDRM(schedule, dq.timesteps(schedule, 10), operator=op, y=y, sigma_y=sigma_y)
    x_T = torch.randn((1, *shape), generator=gen, dtype=torch.float64)
    system, _ = _prepare(model, chain, x_T, None, torch.Generator().manual_seed(0))
    last = system.pinv_init()[-1]                    # ᾱ' = 1: the state is x̂0 itself
    seen = s > sigma_y
    assert bool(seen.any()) and bool((~seen).any())
    assert torch.equal(last[~seen.expand_as(last)], torch.zeros_like(last[~seen.expand_as(last)]))
    ybar = system.coeffs.ybar
    s = op.singulars_as(x_T)                                     # float64, as the solve's
    want = (ybar / s.clamp_min(1e-300))[seen.expand_as(last)]
    assert torch.allclose(last[seen.expand_as(last)], want, rtol=1e-10, atol=1e-12), (last[seen.expand_as(last)] - want).abs().max()


@pytest.mark.parametrize("kind,op,resolved", [("ddim", None, "jump"), ("ddrm", "inpainting", "pinv"),
                                              ("ddnm", "sr", "pinv")])
def test_auto_init_picks_pinv_for_restoration_and_jump_for_ddim(schedule, kind, op, resolved):
    model, chain, x_T = make_problem(schedule, kind, op, 20, 1, shape=(3, 8, 8), seed=2)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    auto = dq.solve(model, chain, x_T, generator=gen())
    named = dq.solve(model, chain, x_T, generator=gen(), init=resolved)
    assert auto.iterations == named.iterations and torch.equal(auto.x0, named.x0)
    assert auto.nfe == named.nfe and auto.nfe == sum(int(torch.isfinite(r).sum())
                                                     for r in auto.residuals) + 1


def test_pinv_init_needs_a_measurement(schedule):
    model, chain, x_T = make_problem(schedule, "ddim", None, 10, 1)
    with pytest.raises(ValueError, match="init='pinv' needs a restoration chain"):
        dq.solve(model, chain, x_T, init="pinv")
    with pytest.raises(ValueError, match="init must be one of"):
        dq.solve(model, chain, x_T, init="zeros")
