"""``window="auto"``: the throughput planner (deqir_fast/solvers/planner.py).

Every decision is driven by an injected clock: the model's call advances a simulated
clock by t(n) for n images, and nothing else costs simulated time, so the planner sees
an exact cost curve and no test depends on this machine's speed. What the planner may
not depend on, the front's advance per round, comes from the solve itself, so the
assertions are about the kind of choice (serial, small windows, the rest of the chain),
never an exact round count."""
import pytest
import torch

import deqir_fast as dq
from conftest import make_problem
from deqir_fast.solvers.planner import SERIAL, CostCurve, Planner


def gen():
    return torch.Generator().manual_seed(7)


class Clocked(torch.nn.Module):
    """``model`` whose call on n images advances ``now`` by ``cost(n)`` simulated seconds;
    counts the images it saw."""

    def __init__(self, model, cost):
        super().__init__()
        self.model, self.cost, self.now, self.images = model, cost, 0.0, 0

    def clock(self):
        return self.now

    def forward(self, x, t):
        self.now += self.cost(x.shape[0])
        self.images += x.shape[0]
        return self.model(x, t)


FLAT = lambda n: 1.0                                   # noqa: E731  a big GPU, a small model
LINEAR = lambda n: 0.05 + n                            # noqa: E731  a CPU
KNEE = lambda n: 10.0 + 3.2 * max(0, n - 3)            # noqa: E731  issue #24's H200 figures


def planned(schedule, cost, kind="ddim", op_name=None, S=40, batch=1, dtype=torch.float64,
            seed=0, **solve_kw):
    model, chain, x_T = make_problem(schedule, kind, op_name, S, batch, 0.0, seed=seed,
                                     dtype=dtype)
    clocked = Clocked(model, cost)
    serial = dq.sample_serial(model, chain, x_T, generator=gen(), return_states=True)
    planner = solve_kw.pop("planner", None) or Planner(clock=clocked.clock)
    res = dq.solve(clocked, chain, x_T, generator=gen(), window=planner, **solve_kw)
    return res, serial, clocked


# -- the cost curve ------------------------------------------------------------------------

def test_cost_curve_interpolates_keeps_the_fastest_and_never_decreases():
    c = CostCurve()
    c.add(4, 2.0)
    assert c(1) == 2.0 and c(100) == 2.0               # one sample: flat
    c.add(4, 3.0)                                       # slower repeat: the fastest kept
    c.add(8, 6.0)
    assert c.samples == {4: 2.0, 8: 6.0}
    assert c(6) == pytest.approx(4.0)                   # linear in between
    assert c(12) == pytest.approx(10.0)                 # the last slope beyond
    c.add(16, 5.0)                                      # a noisy, faster larger call
    assert c(16) == 6.0 and c(12) == 6.0                # never below a smaller n's time
    c.add(0, 1.0)
    c.add(2, float("nan"))
    assert 0 not in c.samples and 2 not in c.samples


def test_cost_curve_extrapolates_with_the_upper_half_not_the_last_pair():
    c = CostCurve()
    for n, t in ((1, 0.5), (10, 1.0), (12, 1.1), (16, 1.3), (20, 2.0)):   # a noisy last call
        c.add(n, t)
    # least squares over n >= 10: 0.0966 s an image (the last pair alone says 0.175)
    assert c(40) == pytest.approx(2.0 + 20 * 5.7 / 59, rel=1e-9)


# -- the choice, on a known curve ------------------------------------------------------------

def ready(curve_fn, ns, S=100, B=1, **kw):
    """A planner as a solve has started it, with the curve measured at ``ns``."""
    p = Planner(**kw)
    p.S, p.B, p.curve, p.serial = S, B, CostCurve(), False
    p.observed, p.remembered, p.episodes = [], [], []
    for n in ns:
        p.curve.add(n, curve_fn(n))
    return p


def test_flat_curve_takes_the_rest_of_the_chain():
    p = ready(FLAT, [1, 2, 50, 101])
    assert p.choose(0, 0, shadow=True) == 100
    assert p.choose(60, 30, shadow=True) == 40


def test_linear_curve_runs_the_serial_sampler():
    p = ready(LINEAR, [1, 3, 10])
    assert p.choose(0, 0, shadow=True) == SERIAL
    p_no = ready(LINEAR, [1, 3, 10], serial=False)
    assert p_no.choose(0, 0, shadow=True) == 2        # serial=False: the smallest window


def test_knee_curve_takes_a_window_below_the_knee():
    p = ready(KNEE, range(1, 102))
    # a(W) = W^0.5 before any round: W = 2 (3 rows with the shadow, under the knee) moves
    # 1.41 steps for one call's price; W = 3 adds a paid image
    assert p.choose(0, 0, shadow=True) == 2
    assert p.choose(0, 0, shadow=False) == 3           # no shadow row: one more step fits


def test_growth_limit_bounds_a_guess_past_the_measured_curve():
    p = ready(FLAT, [1])                               # only t(B) known
    W = p.choose(0, 0, shadow=True)
    assert 2 <= W and (W + 1) <= 4                     # at most 4x the largest call, 1 image
    p.curve.add(4, 1.0)
    assert p.choose(0, 0, shadow=True) + 1 <= 16


def test_serial_switch_pays_for_the_steps_the_shadow_has_not_checked():
    # W = 2 (3 images, 1.6x a single call) moves 1.41 steps a call: 0.88 of serial's rate.
    # With the shadow one step behind the front, serial is faster for the rest; with it 60
    # steps behind, going serial would redo those 60 steps: the window stays cheaper.
    slow = lambda n: 1.0 if n == 1 else 1.6 + 50.0 * (n - 3) * (n > 3)  # noqa: E731
    p = ready(slow, range(1, 102))
    assert p.choose(80, 79, shadow=True) == SERIAL
    assert p.choose(80, 20, shadow=True) == 2
    assert ready(LINEAR, [1, 3, 10]).choose(80, 79, shadow=True) == SERIAL


def test_the_advance_fit_follows_the_observed_rounds():
    p = ready(FLAT, [1, 101])
    c0, g0, rho0 = p.advance_fit()
    assert c0 == pytest.approx(1.0) and g0 == pytest.approx(0.5)
    assert rho0 == pytest.approx(1.0)       # the prior episode: the law's own rounds
    p.observed = [(16, 8, False)] * 10 + [(4, 2, False)] * 10   # a = W / 2: exponent above 0.5
    c, g, _ = p.advance_fit()
    assert g > 0.7 and c * 16 ** g == pytest.approx(8, rel=0.15)
    p.observed = [(16, 1, False)] * 10                   # no progress past one step a round
    assert p.advance(16, 100) < 1.5


def test_a_window_that_reaches_the_end_finishes_in_the_episodes_rounds():
    """The last window is accepted at tol, not tol * freeze_ratio: it finishes in bursts
    the W**g law does not predict. Its rounds do not drag the law; the episodes (steps
    left when it reached the end, rounds to finish) set its advance, never below the
    law's for a window of its size."""
    p = ready(FLAT, [1, 101])
    p.observed = [(10, 3, False)] * 10 + [(40, 1, True), (40, 1, True), (40, 38, True)]
    c, g, _ = p.advance_fit()
    assert c * 10 ** g == pytest.approx(3, rel=0.1)     # the law from the other rounds only
    law = p.advance(40, 100)
    assert p.advance(40, 40) == pytest.approx(law)      # no episode yet: as elsewhere
    p.episodes = [(100, 3), (64, 2)]                    # whole chains finished fast
    assert p.advance(40, 40) > 1.5 * law
    p.episodes = [(100, 60)]                            # ... or slowly
    assert p.advance(40, 40) < law


def test_an_episode_is_recorded_only_when_the_solve_ends_at_the_end(schedule):
    res, _, clocked = planned(schedule, FLAT, "ddim", S=30, batch=1)
    ep = res.stats.plan.end_episode
    assert ep is not None and res.converged
    m, rounds = ep
    windows = res.stats.plan.windows
    assert rounds == len(windows) - next(i for i, w in enumerate(windows)
                                         if sum(res.stats.plan.advances[:i]) + w >= 30)
    res2, _, _ = planned(schedule, LINEAR, "ddim", S=30, batch=1)
    assert res2.stats.plan.end_episode is None          # serial: no episode


def test_planner_options_are_checked():
    with pytest.raises(ValueError, match="growth"):
        Planner(growth=0.5)
    with pytest.raises(ValueError, match="max_window"):
        Planner(max_window=0)
    with pytest.raises(TypeError, match="clock"):
        Planner(clock=3)


# -- planned solves ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind,op_name", [("ddim", None), ("ddim_eta", None), ("ddrm", "sr"),
                                          ("ddnm", "inpainting")])
def test_linear_cost_is_the_serial_sampler(schedule, kind, op_name, dtype):
    """A warm planner on a CPU-like curve runs the serial sampler from x_T: the serial
    states bit for bit, one model call on B images a step, no initial guess."""
    S = 23
    res0, serial, clocked = planned(schedule, LINEAR, kind, op_name, S=S, batch=2, dtype=dtype)
    assert res0.stats.plan.probe_calls == 1            # the first solve measures t(B)
    clocked.images = 0
    # the same model again: the cached curve (no probe), serial from the first step
    res = dq.solve(clocked, *_same(schedule, kind, op_name, S, 2, dtype), generator=gen(),
                   window=Planner(clock=clocked.clock))
    plan = res.stats.plan
    assert plan.serial_from == 0 and plan.probe_calls == 0
    assert res.converged and res.iterations == S and res.nfe == S
    assert clocked.images == 2 * S
    assert torch.equal(res.states, serial)


def test_flat_cost_grows_the_window_to_the_rest_and_matches_serial(schedule):
    S = 60
    res, serial, clocked = planned(schedule, FLAT, "ddim", S=S, batch=2)
    plan = res.stats.plan
    assert plan.serial_from is None and res.converged
    assert max(plan.windows) >= S // 2                 # the window grew to most of the chain
    assert plan.windows[0] <= 3                        # from t(B) alone: at most 4 images a call
    assert (res.states - serial).abs().max() <= 2 / 255
    # a warm second solve starts from the cached curve: a large window at once
    res2 = dq.solve(clocked, *_same(schedule, "ddim", None, S, 2, torch.float64), generator=gen(),
                    window=Planner(clock=clocked.clock))
    assert res2.stats.plan.probe_calls == 0 and res2.stats.plan.windows[0] >= 16
    assert res2.iterations < res.iterations or res2.iterations <= 12


def test_knee_cost_runs_small_windows_faster_than_serial(schedule):
    S = 60
    res, serial, clocked = planned(schedule, KNEE, "ddim", S=S, batch=1)
    plan = res.stats.plan
    assert res.converged and (res.states - serial).abs().max() <= 2 / 255
    # one exploratory round past the knee at most, while the curve is being learned
    assert sum(w > 8 for w in plan.windows) <= 1
    warm = dq.solve(clocked, *_same(schedule, "ddim", None, S, 1, torch.float64),
                    generator=gen(), window=Planner(clock=clocked.clock)).stats.plan
    assert max(warm.windows) <= 8 and warm.probe_calls == 0
    # the simulated time of the plan beats S serial calls (t(1) each) and the whole chain
    assert plan.measured < S * KNEE(1)
    assert plan.measured < plan.projected["whole chain"]


def test_a_slow_first_round_does_not_price_windows_out(schedule):
    """The first round of a process pays one-off costs (allocations, first dispatches): a
    flat curve whose first batched call costs 20x must still get windows, in this solve
    and the next."""
    first = {"done": False}

    def cost(n):
        if n > 1 and not first["done"]:
            first["done"] = True
            return 20.0
        return 1.0
    res, serial, clocked = planned(schedule, cost, "ddim", S=40, batch=1)
    assert res.stats.plan.serial_from is None and max(res.stats.plan.windows) >= 8
    assert (res.states - serial).abs().max() <= 2 / 255


def test_nfe_counts_every_image_the_model_saw(schedule):
    for cost in (FLAT, KNEE, LINEAR):
        res, _, clocked = planned(schedule, cost, "ddrm", "sr", S=30, batch=2)
        assert clocked.images == 2 * res.nfe
        assert res.stats.plan.measured == pytest.approx(clocked.now - _init_cost(res, cost, 2))


def test_switch_to_serial_mid_solve_continues_from_the_shadow(schedule):
    """A first solve on a CPU-like curve knows only t(B): its first round guesses a window
    (4 images, charged 4x), then the measured slope sends it to the serial sampler, which
    continues from the serial shadow's exact state."""
    S = 40
    res, serial, clocked = planned(schedule, LINEAR, "ddim", S=S, batch=1)
    plan = res.stats.plan
    q = plan.serial_from
    assert plan.windows[0] >= 2 and q is not None and 0 < q < S
    assert plan.windows[q:] == [1] * (S - q)           # the serial sampler's steps, one a round
    assert res.converged and res.iterations == S
    # from the shadow's exact state on, the serial sampler's own arithmetic
    assert (res.states[q - 1:] - serial[q - 1:]).abs().max() <= 1e-10
    # what the first solve's guesses cost: at most 10 serial steps' worth over the 40 (the
    # probe, the initial guess, two rounds of at most 4 images: the first round of a
    # process's first solve is not timed, it carries one-off costs)
    assert clocked.now <= (S + 10) * LINEAR(1)


@pytest.mark.parametrize("kind,op_name", [("ddim_eta", None), ("ddrm", "sr")])
def test_serial_switch_without_a_shadow_continues_from_the_front(schedule, kind, op_name):
    """No shadow (serial_shadow=False): the serial sampler continues from the first step
    not frozen, after this round's freezes, and reaches the end within max_iter."""
    S = 30
    res, serial, _ = planned(schedule, LINEAR, kind, op_name, S=S, batch=1,
                             options=dq.SolveOptions(serial_shadow=False))
    plan = res.stats.plan
    assert plan.serial_from is not None and res.converged and res.iterations <= S
    assert (res.states - serial).abs().max() <= 2 / 255


def test_the_adjoint_of_a_planned_solve_reaches_its_end(schedule):
    """The adjoint has no shadow and no serial sampler: it goes serial as one-step windows
    from its front, and must still converge to the whole-chain adjoint's gradient."""
    model, chain, x_T = make_problem(schedule, "ddim_eta", None, 20, 1, seed=4)
    grads = []
    for window in (None, "planned"):
        clocked = Clocked(model, LINEAR)
        w = Planner(clock=clocked.clock) if window else None
        res = dq.solve(clocked, chain, x_T, generator=gen(), window=w, tol=1e-8)
        out = res.handle.gradients(torch.ones_like(res.x0), params=[], tol=1e-10,
                                   x_T=x_T.detach().requires_grad_(True))
        assert out["stats"].converged
        grads.append(out["x_T"])
    assert torch.allclose(grads[1], grads[0], rtol=1e-6, atol=1e-9 * grads[0].abs().max())


def test_planner_edge_cases(schedule):
    # the switch decided on the last round max_iter allows: no serial step to run
    res, _, _ = planned(schedule, LINEAR, "ddim_eta", S=30, batch=1, max_iter=2)
    assert res.iterations == 2 and not res.converged
    # a clock too coarse to see a call: samples are never free, no division by zero
    model, chain, x_T = make_problem(schedule, "ddim", None, 12, 1)
    res = dq.solve(model, chain, x_T, window=Planner(clock=lambda: 0.0))
    assert res.converged
    # serial=False holds after a restart too, and max_window bounds every choice
    p = ready(LINEAR, [1, 3, 10], serial=False, max_window=3)
    assert p.choose(0, 0, shadow=True) <= 3
    assert p.choose(0, 0, shadow=True, exact=True) != SERIAL


def test_exact_tol_runs_the_serial_sampler(schedule):
    res, serial, _ = planned(schedule, FLAT, "ddim", S=20, batch=2, tol=0.0)
    assert res.stats.plan.serial_from == 0 and torch.equal(res.states, serial)


@pytest.mark.parametrize("solver", ["anderson", "triangular_anderson"])
def test_history_rules_survive_a_growing_window(schedule, solver):
    res, serial, _ = planned(schedule, FLAT, "ddnm", "inpainting", S=40, batch=2, solver=solver)
    assert res.converged and len(set(res.stats.plan.windows)) > 1
    assert (res.states - serial).abs().max() <= 2 / 255


def test_check_every_with_the_planner(schedule):
    res, serial, clocked = planned(schedule, FLAT, "ddim_eta", S=40, batch=2,
                                   options=dq.SolveOptions(check_every=3))
    assert res.converged and (res.states - serial).abs().max() <= 2 / 255
    assert clocked.images == 2 * res.nfe


def test_serial_steps_reach_the_callback_with_the_round_schema(schedule):
    seen = []
    res, _, _ = planned(schedule, LINEAR, "ddim", S=12, batch=1, callback=seen.append)
    assert [p["iteration"] for p in seen] == list(range(1, res.iterations + 1))
    assert seen[-1]["window"] == (11, 12) and seen[-1]["nfe"] == res.nfe
    assert seen[-1]["residuals"].shape == (12,)


def test_gradients_through_a_planned_solve(schedule):
    model, chain, x_T = make_problem(schedule, "ddim", None, 16, 1, seed=2)
    clocked = Clocked(model, KNEE)
    x = x_T.clone().requires_grad_(True)
    res = dq.solve(clocked, chain, x, generator=gen(), window=Planner(clock=clocked.clock),
                   tol=1e-6)
    (res.x0 ** 2).sum().backward()
    y = x_T.clone().requires_grad_(True)
    ref = dq.sample_serial(model, chain, y, generator=gen())
    (ref ** 2).sum().backward()
    assert torch.allclose(x.grad, y.grad, rtol=1e-3, atol=1e-6 * y.grad.abs().max().item())


def test_window_argument_is_checked(schedule):
    model, chain, x_T = make_problem(schedule, "ddim", None, 8, 1)
    with pytest.raises(ValueError, match="window must be an int >= 1, None .*'auto'"):
        dq.solve(model, chain, x_T, window="fast")
    with pytest.raises(ValueError, match="window"):
        dq.solve(model, chain, x_T, window=0)


# -- helpers -------------------------------------------------------------------------------

def _same(schedule, kind, op_name, S, batch, dtype):
    """(chain, x_T) of ``planned``'s problem, drawn again."""
    _, chain, x_T = make_problem(schedule, kind, op_name, S, batch, 0.0, seed=0, dtype=dtype)
    return chain, x_T


def _init_cost(res, cost, batch):
    """The simulated seconds the planner did not time: the initial guess's one call."""
    return 0.0 if res.stats.plan.serial_from == 0 else cost(batch)
