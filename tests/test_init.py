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
    # the window's steps of every round, the initial guess's model call and the serial
    # shadow's step in every round
    assert auto.nfe == named.nfe and auto.nfe == sum(int(torch.isfinite(r).sum())
                                                     for r in auto.residuals) + 1 + auto.iterations


def test_pinv_init_needs_a_measurement(schedule):
    model, chain, x_T = make_problem(schedule, "ddim", None, 10, 1)
    with pytest.raises(ValueError, match="init='pinv' needs a restoration chain"):
        dq.solve(model, chain, x_T, init="pinv")
    with pytest.raises(ValueError, match="init must be one of"):
        dq.solve(model, chain, x_T, init="zeros")


class _ConstantEps(torch.nn.Module):
    """ε(x, t) = e whatever x and t: the chain is then affine in its start."""

    def __init__(self, e):
        super().__init__()
        self.e = e

    def forward(self, x, t):
        return self.e.repeat(x.shape[0] // self.e.shape[0], 1, 1, 1)


@pytest.mark.parametrize("kind,op", [("ddim", None), ("ddnm", "sr")])
@pytest.mark.parametrize("hi,new_hi", [(3, 8), (9, 10)])
def test_steps_entering_a_window_start_on_the_chain_with_the_last_eps_held(schedule, kind, op,
                                                                           hi, new_hi):
    """``extend``: the states of steps hi..new_hi-1 from X[hi-1] with ε held at the
    window's last model output are the serial sampler's states when the model's ε is
    that constant (η = 0 chains; fresh random ε, odd step counts)."""
    model, chain, x_T = make_problem(schedule, kind, op, 11, 2, shape=(3, 6, 6), seed=4)
    if kind == "ddnm":                                   # make_problem's DDNM has η = 0.3
        chain = dq.DDNM(schedule, chain.timesteps, operator=chain.operator, y=chain.y, eta=0.0)
    assert not chain.needs_noise
    e = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(5), dtype=x_T.dtype)
    const = _ConstantEps(e)
    states = dq.sample_serial(const, chain, x_T, return_states=True)      # [S, B, ...] pixels
    system, _ = _prepare(const, chain, x_T, None, torch.Generator().manual_seed(0))
    X = chain.to_basis(states.flatten(0, 1)).view(11, *system.coeffs.u0.shape)
    start = X.clone()
    start[hi:] = 0.0                                     # nothing past hi-1 may be read
    got = system.extend(start, chain.to_basis(e).unsqueeze(0), hi, new_hi)
    assert torch.allclose(got, X[hi:new_hi], rtol=1e-10, atol=1e-10), (got - X[hi:new_hi]).abs().max()


def test_chains_that_draw_noise_enter_from_a_copy(schedule):
    """η > 0: ``extend`` declines (None) and the solver starts entering steps from a
    copy of the last state."""
    model, chain, x_T = make_problem(schedule, "ddim_eta", None, 8, 1, shape=(3, 6, 6))
    system, _ = _prepare(model, chain, x_T, None, torch.Generator().manual_seed(0))
    X = system.jump_init()
    assert system.extend(X, X[:1], 2, 5) is None


def test_a_sliding_window_starts_entering_steps_on_the_trajectory(schedule, monkeypatch):
    """DDIM-100, window 20 (GMM, float64): the extended start takes fewer rounds than the
    copy (measured 12 against 14; the counts themselves can move by a round with the
    CPU's kernels, so only the order is pinned), and both land on the serial answer."""
    from deqir_fast.system import ChainSystem
    model, chain, x_T = make_problem(schedule, "ddim", None, 100, 2, shape=(3, 16, 16), seed=1)
    serial = dq.sample_serial(model, chain, x_T)
    extended = dq.solve(model, chain, x_T, window=20)
    monkeypatch.setattr(ChainSystem, "extend", lambda self, *a: None)
    copied = dq.solve(model, chain, x_T, window=20)
    for res in (extended, copied):
        assert res.converged and (res.x0 - serial).abs().max().item() < 1e-4
    assert extended.iterations < copied.iterations, (extended.iterations, copied.iterations)
