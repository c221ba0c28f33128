import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import deqir_fast as dq  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def schedule():
    return dq.Schedule.linear(1000, beta_start=1e-4, beta_end=0.02)


def make_problem(schedule, kind, op_name, S, batch, sigma_y=0.0, shape=(3, 8, 8), seed=0,
                 dtype=torch.float64):
    """A chain on the Gaussian-mixture denoiser with fresh random inputs."""
    from deqir_fast import operators as ops
    gen = torch.Generator().manual_seed(seed)
    model = dq.testing.GaussianMixtureDenoiser(schedule, shape, seed=seed, dtype=dtype)
    ts = dq.timesteps(schedule, S)
    x_T = torch.randn((batch, *shape), generator=gen, dtype=dtype)
    if kind.startswith("ddim"):
        return model, dq.DDIM(schedule, ts, eta=0.5 if kind == "ddim_eta" else 0.0), x_T
    if op_name == "identity":
        op = ops.Identity()
    elif op_name == "inpainting":
        op = ops.Inpainting((torch.rand(shape[1:], generator=gen) > 0.4).to(dtype))
    elif op_name == "sr":
        op = ops.SuperResolution(2, shape)
    else:
        raise ValueError(op_name)
    truth = model.means[:1].detach() + 0.1 * torch.randn((batch, *shape), generator=gen, dtype=dtype)
    y = op.A(truth)
    y = y + sigma_y * torch.randn(y.shape, generator=gen, dtype=dtype)
    if kind == "ddrm":
        chain = dq.DDRM(schedule, ts, operator=op, y=y, sigma_y=sigma_y, eta=0.85, eta_b=1.0)
    else:
        chain = dq.DDNM(schedule, ts, operator=op, y=y, sigma_y=sigma_y, eta=0.3)
    return model, chain, x_T
