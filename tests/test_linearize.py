"""The linearised scan (docs/design.md §3a): any J keeps the serial answer; a J equal to
the model's true Jacobian makes one round exact; the secant finds that J per class;
ParaDiGMS' update is the J = (1 - P)/Q member; a badly wrong J is caught by the guard."""
import math

import pytest
import torch

import deqir_fast as dq
from conftest import make_problem
from deqir_fast import operators as ops
from deqir_fast.api import _prepare
from deqir_fast.linearize import LINEARIZATIONS, PRIOR_VARIANCE

SHAPE = (3, 6, 5)


class ClassLinearDenoiser(torch.nn.Module):
    """A linear eps-model with a different slope on masked and unmasked pixels: the
    exact denoiser of a Gaussian prior N(μ, v_k) with v_k per pixel class k."""

    def __init__(self, schedule, mask, variances=(0.05, 1.0), seed=0):
        super().__init__()
        self.register_buffer("ac", schedule.alphas_cumprod.clone())
        self.mask = mask
        self.variances = variances
        self.mean = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def slope(self, a, k):
        return (1 - a).sqrt() / (a * self.variances[k] + 1 - a)

    def forward(self, x, t):
        a = self.ac.to(x)[t].view(-1, 1, 1, 1)
        d = x - a.sqrt() * self.mean
        return torch.where(self.mask.bool(), self.slope(a, 1), self.slope(a, 0)) * d


def chains_on(schedule, S, op, y):
    ts = dq.timesteps(schedule, S)
    return {
        "ddim": dq.DDIM(schedule, ts, eta=0.0),
        "ddpm": dq.DDIM(schedule, ts, eta=1.0),
        "ddrm": dq.DDRM(schedule, ts, operator=op, y=y, sigma_y=0.05, eta=0.85, eta_b=0.5),
        "ddnm": dq.DDNM(schedule, ts, operator=op, y=y, sigma_y=0.0, eta=0.3),
        "ddnm+": dq.DDNM(schedule, ts, operator=op, y=y, sigma_y=0.05, eta=0.3),
    }


def sr_problem(schedule, S, batch=2):
    gen = torch.Generator().manual_seed(S)
    op = ops.SuperResolution(2, (3, 6, 6))
    y = op.A(torch.randn((batch, 3, 6, 6), generator=gen, dtype=torch.float64))
    x_T = torch.randn((batch, 3, 6, 6), generator=gen, dtype=torch.float64)
    return op, y, x_T


@pytest.mark.parametrize("kind", ["ddim", "ddpm", "ddrm", "ddnm", "ddnm+"])
def test_exact_jacobian_makes_one_round_exact(schedule, kind):
    """ε of a one-component Gaussian prior is linear with slope = the Gaussian guess at
    v = std²: the linearised scan is Newton's method on a linear system, so round 1 is
    the serial answer and round 2 confirms it. J = 0 needs many rounds."""
    model = dq.testing.GaussianMixtureDenoiser(schedule, (3, 6, 6), components=1,
                                               std=math.sqrt(PRIOR_VARIANCE), seed=3)
    op, y, x_T = sr_problem(schedule, 30)
    chain = chains_on(schedule, 30, op, y)[kind]
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    serial = dq.sample_serial(model, chain, x_T, generator=gen())
    for linearize in ("gaussian", "secant"):
        res = dq.solve(model, chain, x_T, generator=gen(), linearize=linearize, tol=1e-9)
        # round 1's residual is O(1) (the initial guess), round 2's at float64 rounding
        # (~1e-14, against tol 1e-9): the count holds on any CPU
        assert res.iterations == 2, linearize
        assert (res.x0 - serial).abs().max().item() <= 1e-11
    plain = dq.solve(model, chain, x_T, generator=gen(), linearize="none", tol=1e-9)
    assert plain.iterations > 5


@pytest.mark.parametrize("kind", ["ddrm", "ddnm"])
def test_secant_learns_a_slope_per_coefficient_class(schedule, kind):
    """Masked and unmasked pixels have different slopes; the chain puts them in
    different classes, so two rounds fit both exactly and round 3 confirms."""
    S = 25
    gen = torch.Generator().manual_seed(11)
    mask = (torch.rand(SHAPE[1:], generator=gen) > 0.5).to(torch.float64)
    op = ops.Inpainting(mask)
    model = ClassLinearDenoiser(schedule, mask)
    y = op.A(torch.randn((2, *SHAPE), generator=gen, dtype=torch.float64))
    x_T = torch.randn((2, *SHAPE), generator=gen, dtype=torch.float64)
    chain = chains_on(schedule, S, op, y)[kind]
    seed = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    serial = dq.sample_serial(model, chain, x_T, generator=seed())
    res = dq.solve(model, chain, x_T, generator=seed(), linearize="secant", tol=1e-9)
    # rounds 1-2 are O(1) off (two slopes to fit), round 3 at rounding against tol 1e-9
    assert res.iterations == 3
    assert (res.x0 - serial).abs().max().item() <= 1e-10
    # the fitted slopes are the model's, class by class (missing pixels: class 0; the
    # observed ones change class along a DDRM chain as s·σ' falls below σ_y)
    lin = res.stats.linearization
    ids = chain.jacobian_classes(0, S, x_T).expand(S, 1, *SHAPE)
    seen = mask.bool().expand(SHAPE)
    for i in range(2, S):
        observed = int(ids[i, 0][seen][0])
        assert bool((ids[i, 0][seen] == observed).all()) and observed != 0
        for k, v in ((0, 0), (observed, 1)):
            assert lin.slopes[i, :, k].tolist() == pytest.approx([model.slope(chain.alpha[i], v).item()] * 2,
                                                                 rel=1e-8)


def test_jacobian_classes_follow_the_coefficient_cases(schedule):
    """DDRM: 0 missing, 1 less noisy than y, 2 noisier (by s·σ'); DDNM: 0 null, 1 full
    range (λ = 1), 2 partial (λ < 1). Checked against the chains' own case tests."""
    sep = ops.Separable((1, 4, 4), height=torch.diag(torch.tensor([2.0, 0.5, 0.05, 0.0], dtype=torch.float64)))
    y = sep.A(torch.randn((1, 1, 4, 4), dtype=torch.float64))
    ts = dq.timesteps(schedule, 40)
    ddrm = dq.DDRM(schedule, ts, operator=sep, y=y, sigma_y=0.1)
    like = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    ids = ddrm.jacobian_classes(0, 40, like).expand(40, 1, 1, 4, 4)
    s = sep.singulars_as(like)
    an = ddrm.alpha_next.view(-1, 1, 1, 1, 1)
    sn = ((1 - an) / an).sqrt()
    assert torch.equal(ids == 0, (s == 0) | (s * sn == 0.1).expand_as(ids))
    assert torch.equal(ids == 1, ((s > 0) & (s * sn < 0.1)).expand_as(ids))
    assert torch.equal(ids == 2, ((s > 0) & (s * sn > 0.1)).expand_as(ids))
    assert {0, 1, 2} <= set(ids.unique().tolist())
    ddnm = dq.DDNM(schedule, ts, operator=sep, y=y, sigma_y=0.1)
    ids = ddnm.jacobian_classes(5, 40, like).expand(35, 1, 1, 4, 4)
    an = ddnm.alpha_next[5:].view(-1, 1, 1, 1, 1)
    full = (s > 0) & ((1 - an).sqrt() >= an.sqrt() * 0.1 / s.clamp_min(1e-300))
    assert torch.equal(ids == 1, full)
    assert torch.equal(ids == 2, (s > 0) & ~full)
    assert torch.equal(ids == 0, (s == 0).expand_as(ids))
    assert {0, 1, 2} <= set(ids.unique().tolist())


@pytest.mark.parametrize("kind", ["ddim_eta", "ddnm"])
def test_paradigms_linearisation_is_the_paradigms_update(schedule, kind):
    """J = (1 - P)/Q turns the scan into ParaDiGMS' state-reusing Picard update,
    x_{i+1} = x_i + (P_i - 1) U_i + Q_i ε(U_i) + R_i (sums of drifts from the carry)."""
    model, chain, x_T = make_problem(schedule, kind, "inpainting", 15, 2, seed=7)
    system, _ = _prepare(model, chain, x_T, None, torch.Generator().manual_seed(0))
    c = system.coeffs
    X = torch.randn((15, *x_T.shape), generator=torch.Generator().manual_seed(5), dtype=x_T.dtype)
    lo, hi = 3, 14                    # DDNM's last step has Q = 0 in the range space
    assert bool((c.Q[lo:hi] != 0).all())
    U = system.inputs(X, lo, hi)
    E = system.model_term(U, lo)
    J = system.linearization("paradigms").jacobian(lo, hi)
    ours = system.scan(E, U, lo, hi, J)
    x = U[0]
    for r, i in enumerate(range(lo, hi)):
        x = x + (c.P[i] - 1) * U[r] + c.Q[i] * E[r] + (0 if c.R is None else c.R[i])
        assert torch.allclose(ours[r], x, rtol=0, atol=1e-12 * max(1.0, x.abs().max().item()))


@pytest.mark.parametrize("linearize", LINEARIZATIONS)
@pytest.mark.parametrize("solver", ["picard", "triangular_anderson"])
@pytest.mark.parametrize("kind,op_name,sigma_y", [("ddim_eta", None, 0.0), ("ddrm", "sr", 0.1),
                                                  ("ddnm", "inpainting", 0.0)])
def test_every_linearisation_keeps_the_serial_answer(schedule, kind, op_name, sigma_y, solver,
                                                      linearize):
    model, chain, x_T = make_problem(schedule, kind, op_name, 20, 2, sigma_y, seed=13)
    gen = lambda: torch.Generator().manual_seed(6)  # noqa: E731
    serial = dq.sample_serial(model, chain, x_T, generator=gen())
    res = dq.solve(model, chain, x_T, generator=gen(), solver=solver, linearize=linearize,
                   tol=1e-10, window=7)
    assert res.converged and res.iterations <= 20
    assert (res.x0 - serial).abs().max().item() <= 1e-8 * serial.abs().max().item()


@pytest.mark.parametrize("kind", ["gaussian", "secant"])
def test_a_badly_wrong_jacobian_still_reaches_the_serial_answer(schedule, kind, monkeypatch):
    """A Gaussian J 30x too large over-corrects: the guard switches it off (the secant
    refits it after one round instead), and the solve still ends at the serial
    sampler's answer within S rounds."""
    import deqir_fast.linearize as lin
    good = lin.gaussian_slopes
    monkeypatch.setattr(lin, "gaussian_slopes", lambda a, v=PRIOR_VARIANCE: 30 * good(a, v))
    model, chain, x_T = make_problem(schedule, "ddim", None, 40, 2, seed=17)
    gen = lambda: torch.Generator().manual_seed(6)  # noqa: E731
    serial = dq.sample_serial(model, chain, x_T, generator=gen())
    res = dq.solve(model, chain, x_T, generator=gen(), linearize=kind, tol=1e-10)
    assert res.stats.guard_fallback == (kind == "gaussian")
    assert res.converged and res.iterations <= 40
    assert (res.x0 - serial).abs().max().item() <= 1e-8 * serial.abs().max().item()


@pytest.mark.parametrize("gain", [-5.0, 5.0])
def test_secant_slopes_stay_within_the_denoiser_range(schedule, gain):
    """A fitted slope lies in [0, 1/sqrt(1-ᾱ)] whatever the model does: here a model
    whose eps falls as x grows (raw slopes < 0) and one 5x steeper than any denoiser
    (raw slopes up to 5x the cap, measured)."""
    model, chain, x_T = make_problem(schedule, "ddim", None, 15, 1, seed=2)
    res = dq.solve(lambda x, t: gain * model(x, t), chain, x_T, tol=1e-10)
    slopes = res.stats.linearization.slopes
    cap = (1 - chain.alpha).rsqrt().view(-1, 1, 1)
    assert bool((slopes >= 0).all()) and bool((slopes <= cap * 1.01).all())
    assert res.converged


def test_linearize_is_validated(schedule):
    model, chain, x_T = make_problem(schedule, "ddim", None, 5, 1)
    with pytest.raises(ValueError, match="linearize must be one of"):
        dq.solve(model, chain, x_T, linearize="newton")
