"""Bad input raises a clear ValueError/TypeError naming the argument."""
import pytest
import torch

import deqir_fast as dq
from deqir_fast import operators as ops

SHAPE = (3, 8, 8)


@pytest.fixture
def setup(schedule):
    model = dq.testing.GaussianMixtureDenoiser(schedule, SHAPE)
    ts = dq.timesteps(schedule, 5)
    x_T = torch.randn(2, *SHAPE, dtype=torch.float64)
    op = ops.SuperResolution(2, SHAPE)
    y = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    return model, ts, x_T, op, y


def nan_like(t):
    t = t.clone()
    t.view(-1)[3] = float("nan")
    return t


def cases(schedule, model, ts, x_T, op, y):
    ddim = dq.DDIM(schedule, ts)
    ddrm = lambda **kw: dq.DDRM(schedule, ts, **{"operator": op, "y": y, **kw})  # noqa: E731
    return [
        ("x_T", lambda: dq.solve(model, ddim, x_T[0])),
        ("x_T", lambda: dq.solve(model, ddim, x_T.long())),
        ("x_T", lambda: dq.solve(model, ddim, nan_like(x_T))),
        ("x_T", lambda: dq.sample_serial(model, ddrm(), torch.randn(2, 3, 6, 6, dtype=torch.float64))),
        ("noise", lambda: dq.solve(model, dq.DDIM(schedule, ts, eta=0.5), x_T,
                                   noise=torch.randn(4, *x_T.shape, dtype=torch.float64))),
        ("noise", lambda: dq.solve(model, ddim, x_T, noise=nan_like(torch.randn(5, *x_T.shape)))),
        ("timesteps", lambda: dq.DDIM(schedule, [10, 20, 5])),
        ("timesteps", lambda: dq.DDIM(schedule, [10, 10, 5])),
        ("timesteps", lambda: dq.DDIM(schedule, [1000, 500, 0])),
        ("timesteps", lambda: dq.DDIM(schedule, [10, -1])),
        ("timesteps", lambda: dq.DDIM(schedule, [])),
        ("timesteps", lambda: dq.DDIM(schedule, torch.tensor([10.0, 5.0]))),
        ("steps", lambda: dq.timesteps(schedule, 0)),
        ("steps", lambda: dq.timesteps(schedule, 1001)),
        ("eta", lambda: dq.DDIM(schedule, ts, eta=1.5)),
        ("eta", lambda: dq.DDIM(schedule, ts, eta=-0.1)),
        ("eta", lambda: ddrm(eta=2.0)),
        ("eta_b", lambda: ddrm(eta_b=-0.5)),
        ("sigma_y", lambda: ddrm(sigma_y=-0.1)),
        ("sigma_y", lambda: dq.DDNM(schedule, ts, operator=op, y=y, sigma_y=float("nan"))),
        ("y", lambda: dq.solve(model, ddrm(y=torch.randn(2, 3, 8, 8, dtype=torch.float64)), x_T)),
        ("y", lambda: dq.solve(model, ddrm(y=torch.randn(5, 3, 4, 4, dtype=torch.float64)), x_T)),
        ("y", lambda: ddrm(y=nan_like(y))),
        ("y", lambda: ddrm(y=y.long())),
        ("operator", lambda: dq.DDRM(schedule, ts, operator="sr4", y=y)),
        ("model", lambda: dq.solve(lambda x, t: x[:, :1], ddim, x_T)),
        ("step 0", lambda: dq.solve(lambda x, t: x * float("nan"), ddim, x_T)),
        ("step 3", lambda: dq.sample_serial(
            lambda x, t: x * (float("inf") if int(t[0]) == int(ts[3]) else 1.0), ddim, x_T)),
        ("step 2", lambda: dq.solve(
            lambda x, t: torch.where((t == int(ts[2])).view(-1, 1, 1, 1), x * float("nan"), x),
            ddim, x_T, solver="picard")),
        # reading back every 3 rounds (the serial shadow's states are checked at the read)
        ("step 2", lambda: dq.solve(
            lambda x, t: torch.where((t == int(ts[2])).view(-1, 1, 1, 1), x * float("nan"), x),
            ddim, x_T, options=dq.SolveOptions(check_every=3))),
        ("model", lambda: dq.solve(lambda x, t: "eps", ddim, x_T)),
        ("model", lambda: dq.solve("not a model", ddim, x_T)),
        ("chain", lambda: dq.solve(model, "ddim", x_T)),
        ("solver", lambda: dq.solve(model, ddim, x_T, solver="newton")),
        ("tol", lambda: dq.solve(model, ddim, x_T, tol=-1.0)),
        ("window", lambda: dq.solve(model, ddim, x_T, window=0)),
        ("max_iter", lambda: dq.solve(model, ddim, x_T, max_iter=1.5)),
        ("init", lambda: dq.solve(model, ddim, x_T, init=torch.randn(4, *x_T.shape))),
        ("final_alpha", lambda: dq.DDIM(schedule, ts, final_alpha=0.0)),
        ("alphas_cumprod", lambda: dq.Schedule([0.5, 0.9])),
    ]


def test_bad_inputs_raise_clear_errors(schedule, setup):
    model, ts, x_T, op, y = setup
    for name, call in cases(schedule, model, ts, x_T, op, y):
        with pytest.raises((ValueError, TypeError)) as info:
            call()
        assert name in str(info.value), (name, str(info.value))


def test_integer_dtypes_are_type_errors(schedule, setup):
    model, ts, x_T, op, y = setup
    with pytest.raises(TypeError, match="x_T"):
        dq.solve(model, dq.DDIM(schedule, ts), x_T.int())
    with pytest.raises(TypeError, match="y"):
        dq.DDNM(schedule, ts, operator=op, y=y.int())


@pytest.mark.parametrize("bad,exc", [(torch.int32, TypeError), ("bfloat16", TypeError)])
def test_history_dtype_must_be_a_floating_dtype(bad, exc):
    import deqir_fast as dq
    model, chain, x_T = dq.testing.readme_problem("DDIM", 0)
    with pytest.raises(exc, match="history_dtype"):
        dq.SolveOptions(history_dtype=bad)
