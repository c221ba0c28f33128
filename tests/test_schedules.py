import pytest
import torch

import deqir_fast as dq


@pytest.mark.parametrize("kind,beta_schedule", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_schedules_match_diffusers(kind, beta_schedule):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule,
                                  beta_start=1e-4, beta_end=0.02).alphas_cumprod.double()
    ours = getattr(dq.Schedule, kind)(1000).alphas_cumprod
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-7)


def test_uniform_timesteps():
    # exact: integer arithmetic
    s = dq.Schedule.linear(1000)
    assert dq.timesteps(s, 20).tolist() == list(range(950, -1, -50))
    assert dq.timesteps(s, 1).tolist() == [0]
    assert dq.timesteps(s, 7).tolist() == [852, 710, 568, 426, 284, 142, 0]
    assert dq.timesteps(s, [999, 500, 3]).tolist() == [999, 500, 3]
    assert dq.timesteps(s, 1000).tolist() == list(range(999, -1, -1))


def test_zero_terminal_snr_schedule():
    """A schedule may end in ᾱ = 0 (diffusers' rescale_betas_zero_snr); no chain may run
    the model at that timestep (its eps form divides by sqrt(ᾱ)), every other one works."""
    a = dq.Schedule.linear(100).alphas_cumprod.clone()
    a[-1] = 0.0
    s = dq.Schedule(a)
    with pytest.raises(ValueError, match=r"t = 99, where the schedule has ᾱ = 0"):
        dq.DDIM(s, [99, 50, 0])
    with pytest.raises(ValueError, match=r"t = 99.*ᾱ = 0"):
        dq.timesteps(s, [99, 3])
    chain = dq.DDIM(s, [98, 50, 0])
    assert bool(torch.isfinite(chain.coefficients(torch.zeros(1, 1, 2, 2), None).P).all())
    # no value may be negative; an earlier 0 would need a negative one after it
    a[-1] = -1e-9
    with pytest.raises(ValueError, match="alphas_cumprod"):
        dq.Schedule(a)
