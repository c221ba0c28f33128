"""DDNM's residual weighting (system.ChainSystem._derived_weights; docs/design.md §3b).

A DDNM state's range-space elements with λ = 1 are derived (P = 0: sqrt(a')ȳ/s + Q ē), so
a change in them moves the rest of the chain only through the next model call: their
residual is weighted by |Q_null(i+1)|·L(i+1)·scale(i+1)/scale(i), L = 1/sqrt(1-ᾱ).

Mutations these tests catch: the leak not summed over the span (one step only, which
shrinks with S); the weight on the null space instead of the range; the
weight of step i+1 used at step i+1 instead of i; the Lipschitz cap or the scale ratio
dropped; the weight applied to DDNM+'s λ < 1 class or to DDRM; the fused round's residual
returned unweighted; the sharded solve measuring unweighted residuals (test_distributed).
"""
import pytest
import torch

import deqir_fast as dq
from conftest import make_problem
from deqir_fast.api import _prepare


def _system(schedule, kind="ddnm", op="sr", sigma_y=0.0, S=30, dtype=torch.float64):
    model, chain, x_T = make_problem(schedule, kind, op, S, 2, sigma_y=sigma_y,
                                     shape=(3, 8, 8), dtype=dtype)
    system, _ = _prepare(model, chain, x_T, None, torch.Generator().manual_seed(0))
    return model, chain, x_T, system


def test_derived_elements_have_P_zero_and_the_others_do_not(schedule):
    """The premise: DDNM's class 1 is where P = 0 (every step), DDNM+'s class 2 is not."""
    for sigma_y in (0.0, 0.3):
        _, chain, x_T, system = _system(schedule, sigma_y=sigma_y)
        P = system.coeffs.P.expand(chain.num_steps, 1, *x_T.shape[1:])
        ids = chain.jacobian_classes(0, chain.num_steps, x_T).expand_as(P)
        assert (ids == 1).any() and bool((P[ids == 1] == 0).all())
        assert bool((P[ids != 1].abs() > 0).all())
        if sigma_y > 0:
            assert (ids == 2).any()


@pytest.mark.parametrize("sigma_y", [0.0, 0.3])
def test_weights_follow_the_formula_from_the_materialised_coefficients(schedule, sigma_y):
    """w_i = min(1, max |Q(i+1)| over the elements that are not derived · 1/sqrt(1-ᾱ_{i+1})
    · scale_{i+1}/scale_i), w_{S-1} = 1, computed here from the chain's own P/Q tensors
    (not the kernel table); with σ_y > 0 the λ < 1 elements count (DDNM+)."""
    _, chain, x_T, system = _system(schedule, S=40, sigma_y=sigma_y)
    floor = 0.1
    scale = system.residual_scale(floor)
    w = system._derived_weight.cpu()
    Q = system.coeffs.Q.expand(40, 1, *x_T.shape[1:])
    ids = chain.jacobian_classes(0, 40, x_T).expand_as(Q)
    q_null = torch.stack([Q[i][ids[i] != 1].abs().max() for i in range(40)])
    if sigma_y > 0:       # the λ < 1 elements do raise some weights above the null space's
        q0 = torch.stack([Q[i][ids[i] == 0].abs().max() for i in range(40)])
        assert bool((q_null > q0 * 1.01).any())
    want = _one_step_weights(chain, system, x_T, scale)
    assert torch.allclose(w, want, rtol=1e-10)         # S = 40: one step per span
    if sigma_y == 0:
        assert 0.05 < float(w[:-1].median()) < 0.5     # it does relax (S = 40)
    assert float(w[-1]) == 1.0


def _one_step_weights(chain, system, x_T, scale):
    S = chain.num_steps
    Q = system.coeffs.Q.expand(S, 1, *x_T.shape[1:])
    ids = chain.jacobian_classes(0, S, x_T).expand_as(Q)
    q_other = torch.stack([Q[i][ids[i] != 1].abs().max() for i in range(S)])
    cap = (1 - chain.alpha).rsqrt()
    w = torch.ones(S, dtype=torch.float64)
    w[:-1] = (q_other[1:] * cap[1:] * scale[1:] / scale[:-1]).clamp_max(1)
    return w


def _ddnm_eta0_weights(schedule, S):
    """(timesteps, the system's weights, the one-step factors) of DDNM SR x2, η = 0."""
    model, chain, x_T = make_problem(schedule, "ddnm", "sr", S, 2, shape=(3, 8, 8))
    chain = dq.DDNM(schedule, chain.timesteps, operator=chain.operator, y=chain.y, eta=0.0)
    system, _ = _prepare(model, chain, x_T, None, torch.Generator().manual_seed(0))
    scale = system.residual_scale(0.1)
    one = _one_step_weights(chain, system, x_T, scale)
    return chain.timesteps.tolist(), system._derived_weight.cpu(), one


@pytest.mark.parametrize("S", [100, 250, 300, 500, 1000])
def test_weights_sum_the_leak_over_a_hundredth_of_the_schedule(schedule, S):
    """w_i = min(1, Σ of the one-step factors of the steps within 10 timesteps of step i)
    (1/100 of the 1000-step schedule), counted in timesteps, not steps: at S = 100 and
    1000 the two agree (1 and 10 steps), at S = 250 (4 timesteps a step: 3 steps) and
    S = 300 (3 timesteps a step: 4 steps) they do not."""
    t, w, one = _ddnm_eta0_weights(schedule, S)
    want = torch.tensor([min(1.0, sum(float(one[j]) for j in range(i, S) if t[i] - t[j] < 10))
                         for i in range(S)], dtype=torch.float64)
    assert torch.allclose(w, want, rtol=1e-10, atol=1e-12), (w - want).abs().max()
    if S > 100:      # the sums do sum (several steps within the span), so w exceeds one step's
        assert bool((w[:-10] > one[:-10] * 1.5).all())


def test_the_summed_weights_do_not_shrink_with_the_step_count(schedule):
    """For η = 0 (where the one-step factor scales with the step) the summed weights at the
    timesteps both chains visit are within 2x of S = 100's at S = 1000. The one-step
    factor alone, about 10x smaller at S = 1000, let DDNM SR x2 on photo16 stop 9.1e-3 off
    serial."""
    got = {}
    for S in (100, 1000):
        t, w, one = _ddnm_eta0_weights(schedule, S)
        got[S] = dict(zip(t, w.tolist()))
        if S == 1000:
            assert float(one[:-10].median()) < 0.02       # the one-step factor is small
    common = [t for t in got[100] if t in got[1000] and got[100][t] < 1]
    ratio = torch.tensor([got[1000][t] / got[100][t] for t in common])
    assert len(common) > 50 and float(ratio.min()) > 0.5 and float(ratio.max()) < 2, ratio


def test_only_ddnm_range_elements_are_weighted(schedule):
    """DDIM and DDRM keep the plain residual; in DDNM a change confined to the range
    elements counts w_i times, one in the null space counts whole."""
    for kind, op in (("ddim", None), ("ddrm", "sr")):
        _, _, _, system = _system(schedule, kind=kind, op=op)
        system.residual_scale(0.1)
        assert system._derived_weight is None
    _, chain, x_T, system = _system(schedule, S=20)
    scale = system.residual_scale(0.1).clone()
    w = system._derived_weight
    gen = torch.Generator().manual_seed(4)
    lo, hi = 3, 15
    ids = chain.jacobian_classes(lo, hi, x_T).expand(hi - lo, 2, *x_T.shape[1:])
    D = torch.randn(ids.shape, generator=gen, dtype=torch.float64)
    for cls, factor in ((1, w[lo:hi]), (0, torch.ones(hi - lo, dtype=torch.float64))):
        only = torch.where(ids == cls, D, torch.zeros_like(D))
        r = system.residuals(only, lo, hi, scale[lo:hi])
        want = only.abs().flatten(1).amax(1) * factor * scale[lo:hi]
        assert torch.allclose(r, want, rtol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_the_fused_round_returns_the_weighted_residual(schedule, backend, monkeypatch):
    """round_and_residuals (the kernels' path) measures what ``residuals`` measures."""
    from deqir_fast.ops import backends
    if backend == "native" and not backends.native_available(torch.device("cpu"))[0]:
        pytest.skip("native kernels unavailable")
    monkeypatch.setenv("DEQIR_FAST_BACKEND", backend)
    backends.reset()
    try:
        _check_fused_round(schedule)
        assert backends.choose(torch.device("cpu"))[0] == backend
    finally:
        monkeypatch.delenv("DEQIR_FAST_BACKEND")
        backends.reset()


def _check_fused_round(schedule):
    model, chain, x_T, system = _system(schedule, S=25, dtype=torch.float32)
    scale = system.residual_scale(0.1).to(torch.float64)
    X = system.jump_init()
    lin = system.linearization("secant")
    lo, hi = 2, 20
    U = system.inputs(X, lo, hi)
    E = system.model_term(U, lo)
    FX, r = system.round_and_residuals(E, U, X[hi - 1], lo, hi, lin, scale[lo:hi])
    want = system.residuals(FX - X[lo:hi], lo, hi, scale[lo:hi])
    assert torch.allclose(r.cpu(), want.cpu(), rtol=1e-6)
    plain = (FX - X[lo:hi]).abs().flatten(1).amax(1).double() * scale[lo:hi]
    assert bool((r.cpu() <= plain + 1e-12).all()) and bool((r.cpu() < plain).any())


@pytest.mark.parametrize("sigma_y", [0.0, 0.1])
@pytest.mark.parametrize("seed", range(4))
def test_converged_ddnm_super_resolution_is_within_one_grey_level(schedule, seed, sigma_y):
    """The promise on the chain the weighting relaxes most (DDNM SR×2, η 0, S = 100,
    float32, default solve) and on DDNM+, over fresh seeds."""
    model, chain, x_T = make_problem(schedule, "ddnm", "sr", 100, 1, shape=(3, 8, 8), seed=seed,
                                     sigma_y=sigma_y, dtype=torch.float32)
    chain = dq.DDNM(schedule, chain.timesteps, operator=chain.operator, y=chain.y, eta=0.0,
                    sigma_y=sigma_y)
    gen = lambda: torch.Generator().manual_seed(seed)  # noqa: E731
    serial = dq.sample_serial(model, chain, x_T, generator=gen())
    res = dq.solve(model, chain, x_T, generator=gen())
    assert res.converged and (res.x0 - serial).abs().max().item() < 2 / 255
