"""The solver loop reading its residuals back once every k rounds (``check_every``), with
the window and freeze bookkeeping on the device, and CUDA-graph replay of those rounds
(skipped without a GPU)."""
import pytest
import torch

import deqir_fast as dq
from conftest import make_problem


def gen():
    return torch.Generator().manual_seed(5)


@pytest.mark.parametrize("solver", ["picard", "anderson", "triangular_anderson"])
@pytest.mark.parametrize("k", [2, 3, 7])
@pytest.mark.parametrize("kind,op_name,sigma_y,window", [("ddim_eta", None, 0.0, None),
                                                         ("ddrm", "sr", 0.1, 6),
                                                         ("ddnm", "inpainting", 0.1, None)])
def test_every_k_rounds_reaches_the_serial_answer(schedule, kind, op_name, sigma_y, window, k, solver):
    S = 14
    model, chain, x_T = make_problem(schedule, kind, op_name, S, 2, sigma_y, seed=k)
    serial = dq.sample_serial(model, chain, x_T, generator=gen(), return_states=True)
    res = dq.solve(model, chain, x_T, generator=gen(), solver=solver, tol=1e-10, window=window,
                   options=dq.SolveOptions(check_every=k))
    assert res.converged and res.iterations <= S
    assert (res.states - serial).abs().max().item() <= 1e-8 * serial.abs().max().item()
    assert res.residuals.shape == (res.iterations, S)


@pytest.mark.parametrize("k", [2, 5])
def test_picard_is_exact_after_S_rounds_whatever_k(schedule, k):
    """tol = 0: only the freeze rule ends the solve; S rounds must suffice, and the
    device-side rule freezes one step per round like the host one."""
    S = 12
    model, chain, x_T = make_problem(schedule, "ddim", None, S, 2, seed=3)
    serial = dq.sample_serial(model, chain, x_T, return_states=True)
    res = dq.solve(model, chain, x_T, solver="picard", linearize="none", tol=0.0, init="x_T",
                   options=dq.SolveOptions(check_every=k))
    assert res.converged and res.iterations <= S
    assert (res.states - serial).abs().max().item() <= 1e-13
    # the residual rows mark frozen steps with NaN: at least one more per round (exactly
    # one unless a late iterate already holds the serial bits, which depends on the CPU's
    # kernels: see test_parity.test_picard_exact_after_S_rounds)
    frozen = torch.isnan(res.residuals).sum(1)
    assert frozen[0] == 0 and bool((frozen[1:] >= frozen[:-1] + 1).all()), frozen


def test_check_every_one_is_todays_loop(schedule):
    model, chain, x_T = make_problem(schedule, "ddrm", "sr", 20, 2, 0.1, seed=8)
    a = dq.solve(model, chain, x_T, generator=gen(), solver="triangular_anderson")
    b = dq.solve(model, chain, x_T, generator=gen(), solver="triangular_anderson",
                 options=dq.SolveOptions(check_every=1))
    assert a.iterations == b.iterations and torch.equal(a.states, b.states)
    assert torch.equal(torch.nan_to_num(a.residuals, 7.0), torch.nan_to_num(b.residuals, 7.0))


def test_not_converged_when_rounds_run_out(schedule):
    model, chain, x_T = make_problem(schedule, "ddim", None, 30, 1, seed=2)
    res = dq.solve(model, chain, x_T, solver="picard", linearize="none", tol=0.0, max_iter=5,
                   init="x_T", options=dq.SolveOptions(check_every=2))
    assert res.iterations == 5 and not res.converged
    # tol = 0 freezes exactly one step a round while no residual is exactly 0 (every one
    # is > 2e-5 here: J = 0 from x_T, far from rounding on any CPU); the window only
    # slides at a read, so frozen steps are evaluated again until then: 30 + 30, 28 + 28, 26
    assert float(res.residuals.nan_to_num(1.0).min()) > 1e-6
    assert res.nfe == 142


def test_default_tolerance_within_one_grey_level_every_4(schedule):
    model, chain, x_T = make_problem(schedule, "ddrm", "inpainting", 50, 2, 0.05, seed=5,
                                     dtype=torch.float32)
    serial = dq.sample_serial(model, chain, x_T, generator=gen())
    res = dq.solve(model, chain, x_T, generator=gen(), options=dq.SolveOptions(check_every=4))
    assert res.converged
    assert (res.x0 - serial).abs().max().item() < 2 / 255


def test_scripted_stop_and_freeze_rules_on_the_device():
    """The device-side rules on scripted residuals (tests/test_solvers.py's fake system):
    a step at exactly tol meets it, one 0.1% over does not; steps that met 5% of tol do
    not freeze (the freeze level is tol/100), so the window slides by the one step per
    round that always freezes."""
    from test_solvers import TOL, run
    script = [[TOL] * 5 + [TOL * 1.001], [TOL * 0.05] * 5 + [1.0], [0.0] * 6]
    windows, stats, _ = run(script, TOL, check_every=2)
    # (the rounds between two reads all run: the fourth finds the window already frozen)
    assert windows == [(0, 6), (0, 6), (2, 6), (2, 6)] and stats.converged
    # a read-back row marks the steps frozen before its round with NaN
    assert torch.isnan(stats.residual_trace[1]).tolist() == [True] + [False] * 5
    windows, stats, _ = run([[TOL] * 6, [1.0] * 6], TOL, check_every=2)
    assert stats.converged and torch.isnan(stats.residual_trace[1]).all()   # met at once


def test_check_every_is_validated(schedule):
    model, chain, x_T = make_problem(schedule, "ddim", None, 4, 1)
    with pytest.raises(ValueError, match="check_every must be an int >= 1"):
        dq.solve(model, chain, x_T, options=dq.SolveOptions(check_every=0))
    # an expert option given to solve itself is refused with the way to pass it
    with pytest.raises(TypeError, match=r"options=deqir_fast.SolveOptions\(check_every=3\)"):
        dq.solve(model, chain, x_T, check_every=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (none visible)")
@pytest.mark.parametrize("kind,linearize,window", [
    ("ddim", "secant", None), ("ddim_eta", "gaussian", None), ("ddrm", "none", None),
    # per-class secant (class ids every round) and DDNM's weighted residual in the graph
    ("ddrm", "secant", None), ("ddnm", "secant", None),
    # a sliding window: the last model output copied in the graph, the extended start
    ("ddim", "secant", 10)])
def test_cuda_graph_replay_equals_eager(schedule, kind, linearize, window):
    model, chain, x_T = make_problem(schedule, kind, "sr", 30, 2, 0.1, seed=1, dtype=torch.float32)
    model = model.cuda()
    x_T = x_T.cuda()
    if hasattr(chain, "y"):
        chain.y = chain.y.cuda()
    noise = torch.randn((30, *x_T.shape), generator=torch.Generator().manual_seed(2)).cuda()
    kw = dict(noise=noise, solver="picard", linearize=linearize, tol=0.0, window=window)
    eager = dq.solve(model, chain, x_T, options=dq.SolveOptions(check_every=5), **kw)
    graph = dq.solve(model, chain, x_T, options=dq.SolveOptions(check_every=5, cuda_graph=True),
                     **kw)
    assert graph.stats.graph_rounds > 0, graph.stats.graph_error
    assert graph.iterations == eager.iterations and graph.converged
    assert torch.allclose(graph.states, eager.states, rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (none visible)")
def test_cuda_graph_rounds_carry_the_serial_shadow():
    """The serial shadow (docs/design.md §3d) inside captured rounds: its step index and
    state advance in place on the device. A tolerance above 0 so that it runs; DDNM with
    eta 0 on the mixture prior restarts it. On a GPU the model's reductions may depend on
    the batch, so the restarted result is not asserted bit-equal to serial here."""
    model, chain, x_T = dq.testing.readme_problem("DDNM", 0, eta=0.0)
    model, x_T = model.cuda(), x_T.cuda()
    chain.y = chain.y.cuda()
    kw = dict(tol=1e-2, options=dq.SolveOptions(check_every=5))
    graphed = dict(tol=1e-2, options=dq.SolveOptions(check_every=5, cuda_graph=True))
    eager = dq.solve(model, chain, x_T, **kw)
    graph = dq.solve(model, chain, x_T, **graphed)
    assert graph.stats.graph_rounds > 0, graph.stats.graph_error
    assert graph.stats.serial_mismatch is not None and graph.converged
    assert graph.stats.serial_mismatch == eager.stats.serial_mismatch
    assert graph.iterations == eager.iterations
    # a chain the shadow passes without a restart: it compared frozen states in the graph
    model, chain, x_T = dq.testing.readme_problem("DDIM", 1)
    model, x_T = model.cuda(), x_T.cuda()
    noise = torch.randn((chain.num_steps, *x_T.shape), generator=torch.Generator().manual_seed(0)).cuda()
    eager = dq.solve(model, chain, x_T, noise=noise, **kw)
    graph = dq.solve(model, chain, x_T, noise=noise, **graphed)
    assert graph.stats.graph_rounds > 0 and graph.stats.serial_mismatch is None
    assert graph.stats.shadow_deviation == graph.stats.shadow_deviation    # compared something
    assert graph.iterations == eager.iterations
    assert torch.allclose(graph.states, eager.states, rtol=0, atol=1e-5)
