"""``sample_deq``: k-diffusion's ``sample_euler`` call signature, solved in parallel
(issue #11).

The reference is k-diffusion's ``sample_euler`` (Karras et al. 2022, Alg. 2 with
s_churn = 0) REIMPLEMENTED here, because k-diffusion cannot be installed beside this
project's torch 2.13: ``pip install k-diffusion`` pulls torch 2.14 and torchvision,
and its ``__init__`` imports clip/torchvision, which fail beside torch 2.13. In a
throwaway environment (k-diffusion 0.1.1.post1, torch 2.14.1) ``euler_reference`` and
``get_sigmas_karras`` below were checked to be bitwise equal to
``k_diffusion.sampling.sample_euler`` (final x and every callback's x and denoised) and
``k_diffusion.sampling.get_sigmas_karras`` for n = 10 and 50.

Assertions between two computations use tolerances (float32, relative to the values'
scale); the few exact ones compare values passed through untouched (each says why).
"""
import pytest
import torch

import deqir_fast as dq
from deqir_fast.k_diffusion import chain_from_sigmas


def get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0):
    """k_diffusion.sampling.get_sigmas_karras (descending, with a final 0)."""
    ramp = torch.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros([1])])


@torch.no_grad()
def euler_reference(model, x, sigmas, extra_args=None, callback=None):
    """k_diffusion.sampling.sample_euler with s_churn = 0 (gamma = 0, sigma_hat = sigma)."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        sigma_hat = sigmas[i] * (0.0 + 1)
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = (x - denoised) / sigma_hat[(...,) + (None,) * x.dim()]       # to_d, append_dims
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat,
                      "denoised": denoised})
        x = x + d * (sigmas[i + 1] - sigma_hat)
    return x


class Denoiser(torch.nn.Module):
    """A k-diffusion-style wrapped denoiser D(x, σ, cond): the Gaussian-prior denoiser
    plus a small random nonlinear term, and an optional per-image conditioning."""

    def __init__(self, channels=3, prior_var=0.5):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.copy_(torch.randn(channels, generator=g) * 0.1)
        self.prior_var = prior_var

    def forward(self, x, sigma, cond=None):
        s2 = sigma.view(-1, *([1] * (x.dim() - 1))) ** 2
        h = x / (s2 + self.prior_var).sqrt()
        if h.dim() != 4:
            h = h.reshape(h.shape[0], 3, -1, 1)
        net = torch.tanh(self.conv(h)).reshape(x.shape)
        out = x * self.prior_var / (s2 + self.prior_var) + 0.1 * net * (s2 / (s2 + 1)).sqrt()
        if cond is not None:
            out = out + cond.view(-1, *([1] * (x.dim() - 1))) * 0.05
        return out


def _rel(a, b):
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


SIGMAS = {
    "karras10": lambda: get_sigmas_karras(10, 0.002, 80.0),
    "karras50": lambda: get_sigmas_karras(50, 0.002, 80.0),
    "linear33": lambda: torch.cat([torch.linspace(14.6, 0.03, 33), torch.zeros(1)]),
    "stops_at_0.5": lambda: get_sigmas_karras(20, 0.5, 20.0),      # last sigma > 0: no final 0
}


@pytest.mark.parametrize("name", list(SIGMAS))
def test_equals_euler_step_for_step(name):
    sigmas = SIGMAS[name]()
    if name == "stops_at_0.5":
        sigmas = sigmas[:-1]
    model = Denoiser()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    cond = torch.tensor([0.5, -1.0])
    ref_steps, our_steps = [], []
    ref = euler_reference(model, x, sigmas, extra_args={"cond": cond}, callback=ref_steps.append)
    n = len(sigmas) - 1
    with torch.no_grad():
        out, res = dq.sample_deq(model, x, sigmas, extra_args={"cond": cond},
                                 callback=our_steps.append, disable=True, tol=0, max_iter=n,
                                 return_result=True)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert _rel(out, ref) <= 1e-5
    assert res.iterations <= n
    assert [c["i"] for c in our_steps] == list(range(n))
    for mine, theirs in zip(our_steps, ref_steps):
        assert set(mine) == set(theirs)
        # exact: both are sigmas[i] (k-diffusion multiplies it by 1.0, exact in IEEE arithmetic)
        assert float(mine["sigma"]) == float(theirs["sigma"])
        assert float(mine["sigma_hat"]) == float(theirs["sigma_hat"])
        assert _rel(mine["x"], theirs["x"]) <= 1e-5
        assert _rel(mine["denoised"], theirs["denoised"]) <= 1e-5


def test_default_tolerance_and_other_shapes():
    sigmas = get_sigmas_karras(40, 0.002, 80.0)
    model = Denoiser()
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * sigmas[0]
    ref = euler_reference(model, x, sigmas)
    with torch.no_grad():
        out, res = dq.sample_deq(model, x, sigmas, return_result=True)
    assert res.converged and res.iterations < 40
    assert (out - ref).abs().max() < 2 / 255
    # a non-image state (batch, 3, 16): the chain runs on it flattened
    x3 = x.reshape(1, 3, 64)[..., :16].contiguous()
    with torch.no_grad():
        out3 = dq.sample_deq(model, x3, sigmas, tol=0)
    assert out3.shape == x3.shape and _rel(out3, euler_reference(model, x3, sigmas)) <= 1e-5
    # one sigma: nothing to do (exact: x is returned untouched)
    assert torch.equal(dq.sample_deq(model, x, sigmas[:1]), x)


def test_gradient_flows_to_the_initial_state():
    sigmas = get_sigmas_karras(8, 0.01, 10.0)
    model = Denoiser()
    x = (torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 10).requires_grad_(True)
    dq.sample_deq(model, x, sigmas, tol=0).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        xi = x_ref
        for i in range(len(sigmas) - 1):          # Euler with a graph
            d = (xi - model(xi, sigmas[i] * xi.new_ones(1))) / sigmas[i]
            xi = xi + d * (sigmas[i + 1] - sigmas[i])
    xi.square().sum().backward()
    assert _rel(x.grad, x_ref.grad) <= 1e-3


def test_chain_from_sigmas_is_ddim_in_ve_form():
    sigmas = get_sigmas_karras(5, 0.1, 10.0).double()
    chain = chain_from_sigmas(sigmas)
    assert torch.allclose(chain.alpha, 1 / (1 + sigmas[:-1] ** 2))
    assert torch.allclose(chain.alpha_next, 1 / (1 + sigmas[1:] ** 2))
    assert chain.eta == 0 and chain.final_alpha == 1.0


def test_clear_errors():
    model = Denoiser()
    x = torch.randn(1, 3, 8, 8)
    sig = get_sigmas_karras(5, 0.1, 10.0)
    with pytest.raises(ValueError, match="s_churn=0"):
        dq.sample_deq(model, x, sig, s_churn=1.0)
    with pytest.raises(ValueError, match="descending"):
        dq.sample_deq(model, x, sig.flip(0)[1:])
    with pytest.raises(ValueError, match="> 0"):
        dq.sample_deq(model, x, torch.tensor([3.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="1-D"):
        dq.sample_deq(model, x, sig.view(1, -1))
    with pytest.raises(ValueError, match="NaN"):
        dq.sample_deq(model, x, torch.tensor([float("nan"), 0.0]))
    with pytest.raises(ValueError, match="shaped like its input"):
        dq.sample_deq(lambda x, s: x[:, :1], x, sig)
