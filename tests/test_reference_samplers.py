"""The serial samplers against step-by-step implementations of the papers' equations,
written here independently of the package's affine coefficients."""
import math

import pytest
import torch

import deqir_fast as dq
from conftest import make_problem


def alphas(chain):
    ac = chain.schedule.alphas_cumprod
    ts = chain.timesteps.tolist()
    return [(float(ac[t]), float(ac[ts[i + 1]]) if i + 1 < len(ts) else chain.final_alpha)
            for i, t in enumerate(ts)]


def t_batch(t, n):
    return torch.full((n,), t, dtype=torch.long)


def ddim_paper(model, chain, x_T, noise):
    """DDIM, Song et al. 2021, Eq. 12 with σ from Eq. 16."""
    x = x_T
    for i, (a, an) in enumerate(alphas(chain)):
        e = model(x, t_batch(int(chain.timesteps[i]), x.shape[0]))
        x0 = (x - math.sqrt(1 - a) * e) / math.sqrt(a)
        sigma = chain.eta * math.sqrt((1 - an) / (1 - a)) * math.sqrt(1 - a / an)
        x = math.sqrt(an) * x0 + math.sqrt(1 - an - sigma ** 2) * e + sigma * noise[i]
    return x


def ddrm_paper(model, chain, x_T, noise):
    """DDRM, Kawar et al. 2022: Eq. 7-8 (three cases per singular value) and p(x_T|y),
    with the variance-exploding state x/sqrt(a) written out element by element."""
    op, sy, eta, eta_b = chain.operator, chain.sigma_y, chain.eta, chain.eta_b
    s = op.singulars.expand(x_T.shape[1:]).reshape(-1)
    ybar = op.Ut(chain.y).expand(x_T.shape).reshape(x_T.shape[0], -1)
    a0 = float(chain.schedule.alphas_cumprod[chain.timesteps[0]])
    sT = math.sqrt((1 - a0) / a0)
    zT = x_T.reshape(x_T.shape[0], -1)
    xbar = torch.empty_like(zT)
    for k in range(s.numel()):
        sk = float(s[k])
        if sk > 0 and sk * sT > sy:
            xbar[:, k] = ybar[:, k] / sk + math.sqrt(sT ** 2 - sy ** 2 / sk ** 2) * zT[:, k]
        else:
            xbar[:, k] = sT * zT[:, k]
    x = math.sqrt(a0) * op.V(xbar.view_as(x_T))
    for i, (a, an) in enumerate(alphas(chain)):
        e = model(x, t_batch(int(chain.timesteps[i]), x.shape[0]))
        x0 = (x - math.sqrt(1 - a) * e) / math.sqrt(a)
        x0b = op.Vt(x0).reshape(x.shape[0], -1)
        eb = op.Vt(e).reshape(x.shape[0], -1)
        z = noise[i].reshape(x.shape[0], -1)
        sn = math.sqrt((1 - an) / an)
        out = torch.empty_like(x0b)
        for k in range(s.numel()):
            sk = float(s[k])
            if sk == 0 or sk * sn == sy:            # missing pixel
                out[:, k] = x0b[:, k] + math.sqrt(1 - eta ** 2) * sn * eb[:, k] + eta * sn * z[:, k]
            elif sk * sn < sy:                      # less noisy than y
                out[:, k] = (x0b[:, k] + math.sqrt(1 - eta ** 2) * sn * (ybar[:, k] - sk * x0b[:, k]) / sy
                             + eta * sn * z[:, k])
            else:                                   # noisier than y
                out[:, k] = ((1 - eta_b) * x0b[:, k] + eta_b * ybar[:, k] / sk
                             + math.sqrt(sn ** 2 - sy ** 2 * eta_b ** 2 / sk ** 2) * z[:, k])
        x = math.sqrt(an) * op.V(out.view_as(x))
    return x


def ddnm_paper(model, chain, x_T, noise):
    """DDNM, Wang et al. 2023: x̂0 = x0 - A⁺(A x0 - y) (Eq. 13), then
    x' = sqrt(a') x̂0 + sqrt(1-a') (η z + sqrt(1-η²) ε), all in pixel space."""
    op, eta = chain.operator, chain.eta
    x = op.V(x_T)
    y = chain.y
    for i, (a, an) in enumerate(alphas(chain)):
        e = model(x, t_batch(int(chain.timesteps[i]), x.shape[0]))
        x0 = (x - math.sqrt(1 - a) * e) / math.sqrt(a)
        x0_hat = x0 - op.pinv(op.A(x0) - y)
        z = op.V(noise[i])
        x = math.sqrt(an) * x0_hat + math.sqrt(1 - an) * (eta * z + math.sqrt(1 - eta ** 2) * e)
    return x


def ddnm_plus_spectral(model, chain, x_T, noise):
    """DDNM+ (σ_y > 0), Eq. 17-19 with Σ_t = λ per spectral element."""
    op, eta, sy = chain.operator, chain.eta, chain.sigma_y
    s = op.singulars.expand(x_T.shape[1:]).reshape(-1)
    ybar = op.Ut(chain.y).expand(x_T.shape).reshape(x_T.shape[0], -1)
    x = op.V(x_T)
    for i, (a, an) in enumerate(alphas(chain)):
        e = model(x, t_batch(int(chain.timesteps[i]), x.shape[0]))
        x0 = (x - math.sqrt(1 - a) * e) / math.sqrt(a)
        x0b = op.Vt(x0).reshape(x.shape[0], -1)
        eb = op.Vt(e).reshape(x.shape[0], -1)
        z = noise[i].reshape(x.shape[0], -1)
        sig = math.sqrt(1 - an)
        out = torch.empty_like(x0b)
        for k in range(s.numel()):
            sk = float(s[k])
            if sk == 0:
                lam, gamma = 0.0, sig
            elif sig >= math.sqrt(an) * sy / sk:
                lam, gamma = 1.0, math.sqrt(sig ** 2 - (math.sqrt(an) * sy / sk) ** 2)
            else:
                lam, gamma = sig * sk / (math.sqrt(an) * sy), 0.0
            x0hat = x0b[:, k] - lam * (x0b[:, k] - (ybar[:, k] / sk if sk > 0 else 0.0))
            out[:, k] = math.sqrt(an) * x0hat + gamma * (eta * z[:, k] + math.sqrt(1 - eta ** 2) * eb[:, k])
        x = op.V(out.view_as(x))
    return x


CASES = [
    ("ddim", None, 0.0, ddim_paper), ("ddim_eta", None, 0.0, ddim_paper),
    ("ddrm", "identity", 0.0, ddrm_paper), ("ddrm", "identity", 0.3, ddrm_paper),
    ("ddrm", "inpainting", 0.0, ddrm_paper), ("ddrm", "inpainting", 0.1, ddrm_paper),
    ("ddrm", "sr", 0.0, ddrm_paper), ("ddrm", "sr", 0.05, ddrm_paper),
    ("ddnm", "inpainting", 0.0, ddnm_paper), ("ddnm", "sr", 0.0, ddnm_paper),
    ("ddnm", "identity", 0.0, ddnm_paper),
    ("ddnm", "sr", 0.1, ddnm_plus_spectral), ("ddnm", "inpainting", 0.2, ddnm_plus_spectral),
]


@pytest.mark.parametrize("S", [1, 5, 20])
@pytest.mark.parametrize("kind,op_name,sigma_y,paper", CASES)
def test_serial_sampler_matches_paper(schedule, kind, op_name, sigma_y, paper, S):
    model, chain, x_T = make_problem(schedule, kind, op_name, S, 2, sigma_y, shape=(3, 4, 6),
                                     seed=11 + S)
    noise = torch.randn((S, *x_T.shape), generator=torch.Generator().manual_seed(5),
                        dtype=x_T.dtype)
    ours = dq.sample_serial(model, chain, x_T, noise=noise)
    with torch.no_grad():
        ref = paper(model, chain, x_T, noise)
    assert (ours - ref).abs().max().item() <= 1e-10 * ref.abs().max().item()


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("S", [10, 50])
def test_ddim_matches_diffusers_scheduler(schedule, eta, S):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                    beta_schedule="linear", clip_sample=False,
                                    set_alpha_to_one=True, steps_offset=0,
                                    timestep_spacing="leading")
    sched.set_timesteps(S)
    ts = dq.timesteps(schedule, S)
    assert sched.timesteps.tolist() == ts.tolist()
    # float32 end to end: diffusers keeps its schedule in float32.
    model, chain, x_T = make_problem(schedule, "ddim", None, S, 2, dtype=torch.float32, seed=S)
    chain = dq.DDIM(schedule, ts, eta=eta)
    noise = torch.randn((S, *x_T.shape), generator=torch.Generator().manual_seed(1))
    x = x_T.clone()
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            e = model(x, t.repeat(x.shape[0]))
            x = sched.step(e, t, x, eta=eta, variance_noise=noise[i]).prev_sample
    ours = dq.sample_serial(model, chain, x_T, noise=noise)
    assert (ours - x).abs().max().item() < 2e-4
