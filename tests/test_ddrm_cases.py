"""DDRM in all three of its cases, against the paper's equations (Kawar et al. 2022,
Eq. 7-8, written out element by element in ``test_reference_samplers.ddrm_paper``).

The problems here are chosen so that each case really occurs: measurement noise σ_y > 0,
singular values other than 1, and s·σ' crossing σ_y inside the chain, so that elements
move from "noisier than y" (case 3) to "less noisy than y" (case 2) at different steps,
next to a null space (case 1). ``eta_b`` takes 0, 0.5 and 1 (at 1 the case-3 noise term
σ'² - σ_y² η_b²/s² cannot tell η_b from 1).

Mutations of ``deqir_fast/chains.py`` these tests catch (each planted alone, suite run):
- η_b dropped from the case-3 noise term (sqrt(σ'² - σ_y²/s²));
- the case split on σ' instead of s·σ'.
"""
import math

import pytest
import torch

import deqir_fast as dq
from deqir_fast import operators as ops
from deqir_fast.tasks import TASKS, build_operator
from test_operators import FakePhysics
from test_reference_samplers import ddrm_paper

SHAPE = (3, 4, 6)
S = 20
SIGMA_Y = 0.3
SCHEDULE = dq.Schedule.linear()


def orthogonal(n, gen):
    q, r = torch.linalg.qr(torch.randn((n, n), generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def spread_operator():
    """A = A_c ⊗ A_h with random orthogonal factors and singular values spread over three
    decades: products from 2 down to 0.002, and a null space."""
    gen = torch.Generator().manual_seed(3)
    c = orthogonal(3, gen) @ torch.diag(torch.tensor([2.0, 0.6, 0.002], dtype=torch.float64)) \
        @ orthogonal(3, gen)
    h = orthogonal(4, gen) @ torch.diag(torch.tensor([1.0, 0.5, 0.3, 0.0], dtype=torch.float64)) \
        @ orthogonal(4, gen)
    return ops.Separable(SHAPE, channel=c, height=h)


def adapter_operator():
    """deepinv-style decomposition (a DCT) with a mask of singular values in [0, 2)."""
    phys = FakePhysics(SHAPE)
    scale = 2 * torch.rand(phys.mask.shape, generator=torch.Generator().manual_seed(4),
                           dtype=torch.float64)
    phys.mask = phys.mask * scale
    return ops.from_deepinv(phys, SHAPE)


OPERATORS = {
    "spread": spread_operator,
    "sr2": lambda: ops.SuperResolution(2, SHAPE),             # every s = 0.5
    "deblur": lambda: ops.Deblurring.gaussian(SHAPE, 1.0),
    "adapter": adapter_operator,
}


def problem(op, sigma_y, eta, eta_b, steps=S, seed=0, shape=SHAPE):
    gen = torch.Generator().manual_seed(seed)
    model = dq.testing.GaussianMixtureDenoiser(SCHEDULE, shape, seed=seed)
    x_T = torch.randn((2, *shape), generator=gen, dtype=torch.float64)
    truth = model.means[:2].detach() + 0.1 * torch.randn((2, *shape), generator=gen,
                                                          dtype=torch.float64)
    y = op.A(truth)
    y = y + sigma_y * torch.randn(y.shape, generator=gen, dtype=torch.float64)
    chain = dq.DDRM(SCHEDULE, dq.timesteps(SCHEDULE, steps), operator=op, y=y,
                    sigma_y=sigma_y, eta=eta, eta_b=eta_b)
    noise = torch.randn((steps, *x_T.shape), generator=gen, dtype=torch.float64)
    return model, chain, x_T, noise


def case_table(chain, shape=SHAPE):
    """[S, elements]: 1 null space, 2 less noisy than y (s σ' < σ_y), 3 noisier than y,
    computed here from the paper's rule, not from the package's coefficients."""
    s = chain.operator.singulars.expand(shape).reshape(-1)
    ac = chain.schedule.alphas_cumprod
    ts = chain.timesteps.tolist()
    rows = []
    for i in range(len(ts)):
        an = float(ac[ts[i + 1]]) if i + 1 < len(ts) else chain.final_alpha
        sn = math.sqrt((1 - an) / an)
        rows.append([1 if sk == 0 else (2 if sk * sn < chain.sigma_y else 3) for sk in s.tolist()])
    return torch.tensor(rows)


def assert_matches_paper(model, chain, x_T, noise, x):
    with torch.no_grad():
        ref = ddrm_paper(model, chain, x_T, noise)
    assert (x - ref).abs().max().item() <= 1e-10 * ref.abs().max().item()


@pytest.mark.parametrize("eta", [0.0, 0.85])
@pytest.mark.parametrize("eta_b", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("op_name", sorted(OPERATORS))
def test_ddrm_matches_the_paper_in_every_case(op_name, eta_b, eta):
    op = OPERATORS[op_name]()
    model, chain, x_T, noise = problem(op, SIGMA_Y, eta, eta_b)
    cases = case_table(chain)
    # The problem exercises what it claims: both measured cases occur, elements switch
    # from case 3 to case 2 inside the chain, and for s != 1 the switch happens at a
    # step where σ' alone would put it elsewhere.
    assert {2, 3} <= set(cases.unique().tolist())
    switches = (cases[1:] != cases[:-1]).any(0)
    assert switches.sum() > 0
    s = op.singulars.expand(SHAPE).reshape(-1)
    sn = torch.tensor([math.sqrt((1 - float(a)) / float(a)) for a in chain.alpha_next])
    by_sigma_alone = torch.where(s > 0, torch.where(sn[:, None] < SIGMA_Y, 2, 3), 1)
    assert (by_sigma_alone != cases).any()
    if op_name != "sr2":
        assert (cases == 1).any()
    assert_matches_paper(model, chain, x_T, noise, dq.sample_serial(model, chain, x_T, noise=noise))


@pytest.mark.parametrize("eta_b", [0.0, 0.5, 1.0])
def test_ddrm_parallel_solve_matches_the_paper_across_case_changes(eta_b):
    model, chain, x_T, noise = problem(spread_operator(), SIGMA_Y, 0.85, eta_b, seed=1)
    res = dq.solve(model, chain, x_T, noise=noise, tol=1e-12)
    assert res.converged
    assert_matches_paper(model, chain, x_T, noise, res.x0)


@pytest.mark.parametrize("eta_b", [0.0, 0.5, 1.0])
def test_ddrm_eta_b_changes_the_result_when_y_is_noisy(eta_b):
    # η_b enters the case-3 mean and noise: two values must give different samples
    # (a guard against η_b being ignored in both places at once).
    model, chain, x_T, noise = problem(spread_operator(), SIGMA_Y, 0.85, eta_b, seed=2)
    other = dq.DDRM(chain.schedule, chain.timesteps, operator=chain.operator, y=chain.y,
                    sigma_y=SIGMA_Y, eta=0.85, eta_b=0.25)
    a = dq.sample_serial(model, chain, x_T, noise=noise)
    b = dq.sample_serial(model, other, x_T, noise=noise)
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("task", sorted(TASKS))
def test_ddrm_with_measurement_noise_on_every_task(task):
    # Every registered operator with σ_y > 0 (the task's own, else 0.1), η_b = 0.5.
    shape = (3, 8, 8)
    op = build_operator(task, shape, seed=0)
    sigma_y = TASKS[task].sigma_y or 0.1
    model, chain, x_T, noise = problem(op, sigma_y, 0.85, 0.5, steps=10, seed=5, shape=shape)
    assert {2, 3} <= set(case_table(chain, shape).unique().tolist())
    assert_matches_paper(model, chain, x_T, noise, dq.sample_serial(model, chain, x_T, noise=noise))
