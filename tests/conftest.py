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


class HeavyBall:
    """A user's update rule, registered as ``solve(..., solver="heavy_ball")`` by
    ``register_heavy_ball``: X' = F(X) + β (X - X_prev), β = ``momentum``, with X_prev the
    step's iterate of the round before, kept per step by absolute step (a ring of
    ``ctx.rows`` rows, like the Anderson history) and exported with a step that moves to
    another rank. It exercises the whole rule contract: options, ``start``, the context,
    empty blocks, ``forget`` and the per-step history (tests/test_solvers.py,
    tests/test_distributed.py)."""

    uses_residual = False

    def __init__(self, momentum: float = 0.3):
        self.momentum = momentum

    def start(self, ctx):
        self.prev = ctx.like.new_zeros((ctx.rows, *ctx.like.shape))
        self.step_of = torch.full((ctx.rows,), -1, dtype=torch.int64)

    def __call__(self, X, FX, G, ctx):
        steps = torch.arange(ctx.a, ctx.b)
        rows = steps % self.prev.shape[0]
        seen = (self.step_of[rows] == steps).view(-1, *([1] * (X.dim() - 1))).to(X.device)
        moved = torch.where(seen, X - self.prev[rows.to(X.device)], torch.zeros_like(X))
        self.prev[rows.to(X.device)] = X
        self.step_of[rows] = steps
        return FX + self.momentum * moved

    def drop(self, n):
        pass

    def forget(self):
        self.step_of.fill_(-1)

    def export_steps(self, s0, s1):
        rows = torch.arange(s0, s1) % self.prev.shape[0]
        return [self.prev[rows.to(self.prev.device)], self.step_of[rows].to(self.prev.dtype)]

    def import_steps(self, s0, s1, tensors):
        rows = torch.arange(s0, s1) % self.prev.shape[0]
        self.prev[rows.to(self.prev.device)] = tensors[0]
        self.step_of[rows] = tensors[1].to("cpu").to(torch.int64)


def register_heavy_ball():
    from deqir_fast.solvers import register_solver
    register_solver("heavy_ball")(HeavyBall)


class HalfDamped:
    """A stateless user rule that reads G (``uses_residual``): X' = X + G/2. Registered as
    ``solve(..., solver="half_damped")`` by ``register_half_damped``; in a sharded solve a
    rank without steps calls it with an empty block, G included."""

    uses_residual = True

    def __call__(self, X, FX, G):
        return X + 0.5 * G


def register_half_damped():
    from deqir_fast.solvers import register_solver
    register_solver("half_damped")(HalfDamped)
