"""Implicit gradients through the solved chain against autograd through the serial chain."""
import pytest
import torch

import deqir_fast as dq
from conftest import make_problem

CHAINS = [("ddim", None, 0.0), ("ddim_eta", None, 0.0), ("ddrm", "inpainting", 0.1),
          ("ddrm", "sr", 0.0), ("ddnm", "sr", 0.1), ("ddnm", "inpainting", 0.0)]


def grads(model, chain, x_T, weight, grad, **kw):
    x = x_T.detach().clone().requires_grad_(True)
    y = getattr(chain, "y", None)
    if y is not None:
        y.requires_grad_(True)
        y.grad = None
    res = dq.solve(model, chain, x, generator=torch.Generator().manual_seed(4), grad=grad, **kw)
    (res.x0 * weight).sum().backward()
    return x.grad, (None if y is None else y.grad), res


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("S", [1, 3, 10])
@pytest.mark.parametrize("kind,op_name,sigma_y", CHAINS)
def test_implicit_gradient_equals_unrolled(schedule, kind, op_name, sigma_y, S):
    model, chain, x_T = make_problem(schedule, kind, op_name, S, 2, sigma_y, seed=S + 20)
    weight = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(1), dtype=x_T.dtype)
    gx, gy, _ = grads(model, chain, x_T, weight, "ift", tol=1e-12,
                      options=dq.SolveOptions(grad_tol=1e-12))
    rx, ry, _ = grads(model, chain, x_T, weight, "unrolled", tol=1e-12)
    assert gx.norm() > 0
    assert rel(gx, rx) <= 1e-6
    if gy is not None and ry.norm() > 0:
        assert rel(gy, ry) <= 1e-6


def test_implicit_gradient_on_a_small_unet(schedule):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    net = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4,
                                down_block_types=("DownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "UpBlock2D")).double().eval()
    model = dq.models.EpsModel(net)
    for p in net.parameters():
        p.requires_grad_(False)
    _, chain, x_T = make_problem(schedule, "ddrm", "sr", 10, 2, 0.05, seed=3)
    weight = torch.randn(x_T.shape, dtype=x_T.dtype)
    gx, gy, _ = grads(model, chain, x_T, weight, "ift", tol=1e-12,
                      options=dq.SolveOptions(grad_tol=1e-12))
    rx, ry, _ = grads(model, chain, x_T, weight, "unrolled", tol=1e-12)
    assert rel(gx, rx) <= 1e-6 and rel(gy, ry) <= 1e-6


def test_gradcheck_tiny_problem(schedule):
    model, chain, x_T = make_problem(schedule, "ddrm", "sr", 3, 1, 0.1, shape=(1, 2, 4), seed=1)
    noise = torch.randn((3, *x_T.shape), dtype=torch.float64)
    y = chain.y.detach().clone().requires_grad_(True)

    def f(x, yy):
        c = dq.DDRM(schedule, chain.timesteps, operator=chain.operator, y=yy, sigma_y=0.1)
        return dq.solve(model, c, x, noise=noise, tol=1e-13,
                        options=dq.SolveOptions(grad_tol=1e-13)).x0

    assert torch.autograd.gradcheck(f, (x_T.clone().requires_grad_(True), y), eps=1e-6, atol=1e-6)


def test_backward_api_equals_autograd_and_fills_parameters(schedule):
    model, chain, x_T = make_problem(schedule, "ddnm", "sr", 8, 2, 0.1, seed=5)
    weight = torch.randn(x_T.shape, dtype=x_T.dtype)
    # autograd reference, parameters included
    model.means.grad = None
    rx, ry, _ = grads(model, chain, x_T, weight, "unrolled", tol=1e-12)
    ref_param = model.means.grad.clone()
    model.means.grad = None
    chain.y.grad = None
    res = dq.solve(model, chain, x_T, generator=torch.Generator().manual_seed(4), tol=1e-12)
    out = dq.backward(res, weight, params=True, tol=1e-12)
    assert rel(out["x_T"], rx) <= 1e-6 and rel(out["y"], ry) <= 1e-6
    assert rel(model.means.grad, ref_param) <= 1e-6
    assert out["rounds"] <= 8


def test_phantom_gradient_is_a_cheap_approximation(schedule):
    model, chain, x_T = make_problem(schedule, "ddim", None, 20, 1, seed=6)
    weight = torch.randn(x_T.shape, dtype=x_T.dtype)
    px, _, _ = grads(model, chain, x_T, weight, "phantom", tol=1e-10)
    rx, _, _ = grads(model, chain, x_T, weight, "unrolled", tol=1e-10)
    cos = torch.nn.functional.cosine_similarity(px.flatten(), rx.flatten(), dim=0).item()
    assert torch.isfinite(px).all() and px.shape == x_T.shape
    # Five damped rounds see only part of the chain's Jacobian: close, not equal.
    assert 0.5 < cos < 1 - 1e-9


def init_problem(schedule):
    """DDIM (eta 0) on a Gaussian prior: x0 is an affine function of x_T with a gain of
    about the prior's std, so a measurement loss ||A x0 - y||² on it is a smooth quadratic
    in x_T that Adam lowers by a wide margin. (On DDRM/DDNM the observed components of x0
    forget x_T: DDRM's update of an observed element does not read the state, DDNM's
    replaces it by A⁺y. With a prior that does not couple components the measurement
    loss is flat in x_T, its gradient ~1e-12, and whether it falls is down to rounding.)"""
    from deqir_fast import operators as ops
    shape = (3, 8, 8)
    gen = torch.Generator().manual_seed(7)
    model = dq.testing.GaussianMixtureDenoiser(schedule, shape, components=1, std=0.5, seed=7)
    x_T = torch.randn((1, *shape), generator=gen, dtype=torch.float64)
    truth = model.means.detach() + 0.5 * torch.randn((1, *shape), generator=gen,
                                                     dtype=torch.float64)
    op = ops.SuperResolution(2, shape)
    y = op.A(truth)
    chain = dq.DDIM(schedule, dq.timesteps(schedule, 20), eta=0.0)
    return model, chain, x_T, (lambda x0: (op.A(x0) - y).pow(2).sum())


def test_optimize_init_reduces_the_measurement_loss(schedule):
    model, chain, x_T, loss = init_problem(schedule)
    kw = dict(loss=loss, steps=6, lr=0.05, tol=1e-8, options=dq.SolveOptions(grad_tol=1e-10))
    warm = dq.optimize_init(model, chain, x_T, **kw)
    cold = dq.optimize_init(model, chain, x_T, warm_start=False, **kw)
    unrolled = dq.optimize_init(model, chain, x_T, warm_start=False, grad="unrolled", **kw)
    # Every Adam step lowers the loss, by 44% in all (5.17 -> 2.91): assert 25%.
    assert all(b < a for a, b in zip(warm.losses, warm.losses[1:]))
    assert warm.losses[-1] < 0.75 * warm.losses[0]
    # The implicit gradient steers exactly as autograd through the serial chain.
    assert all(abs(a - b) <= 1e-6 * b for a, b in zip(warm.losses, unrolled.losses))
    assert torch.allclose(warm.x_T, unrolled.x_T, atol=1e-6, rtol=0)
    # Same optimisation, same answer, warm-started or not.
    assert torch.allclose(warm.x0, cold.x0, atol=1e-6, rtol=0)
    assert torch.allclose(warm.x0, dq.sample_serial(model, chain, warm.x_T), atol=1e-6, rtol=0)


def test_optimize_init_warm_start_reuses_the_previous_solution(schedule):
    # lr = 0 keeps x_T fixed, so every solve after the first starts from its own answer
    # when warm-started (measured: 2 + 1 + 1 rounds against 17 each from scratch).
    model, chain, x_T, loss = init_problem(schedule)
    kw = dict(loss=loss, steps=3, lr=0.0, tol=1e-8)
    warm = dq.optimize_init(model, chain, x_T, **kw)
    cold = dq.optimize_init(model, chain, x_T, warm_start=False, **kw)
    assert warm.rounds[0] == cold.rounds[0]
    assert sum(warm.rounds[1:]) * 3 <= sum(cold.rounds[1:])
    assert torch.allclose(warm.x0, cold.x0, atol=1e-6, rtol=0)


def test_gradient_bad_inputs(schedule):
    model, chain, x_T = make_problem(schedule, "ddrm", "sr", 5, 1, 0.05, seed=8)
    res = dq.solve(model, chain, x_T)
    with pytest.raises(ValueError, match="grad_x0"):
        dq.backward(res, torch.randn(2, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match="result"):
        dq.backward("res", torch.randn_like(x_T))
    with pytest.raises(ValueError, match="scalar"):
        dq.optimize_init(model, chain, x_T, loss=lambda x0: x0, steps=1)
    with pytest.raises(ValueError, match="reference"):
        dq.optimize_init(model, chain, x_T, loss="reference", steps=1)
    with pytest.raises(ValueError, match="grad"):
        dq.solve(model, chain, x_T, grad="magic")


def test_phantom_gradient_options_reach_the_implicit_gradient(schedule):
    """``grad="phantom"`` backpropagates through ``phantom_steps`` damped rounds
    X <- (1-τ)X + τF(X) from the solution, τ = ``phantom_damping``: a truncated Neumann
    series of the implicit gradient, so more steps come closer (measured on DDIM-10:
    relative error 120 after 1 step, 1.4e-2 after 20, 5e-12 after 60 at τ = 0.5), and
    τ = 1 is Picard, exact after S steps."""
    model, chain, x_T = make_problem(schedule, "ddim", None, 10, 1, seed=2)
    weight = torch.linspace(-1, 1, x_T.numel(), dtype=x_T.dtype).view_as(x_T)
    ift, _, _ = grads(model, chain, x_T, weight, "ift", tol=1e-12,
                      options=dq.SolveOptions(grad_tol=1e-12))
    err = {}
    for steps, damping in ((1, 0.5), (20, 0.5), (60, 0.5), (10, 1.0)):
        g, _, _ = grads(model, chain, x_T, weight, "phantom", tol=1e-12,
                        options=dq.SolveOptions(phantom_steps=steps, phantom_damping=damping))
        err[steps, damping] = rel(g, ift)
    assert err[1, 0.5] > 10 * err[20, 0.5] > 100 * err[60, 0.5], err
    assert err[60, 0.5] < 1e-8 and err[10, 1.0] < 1e-8, err
