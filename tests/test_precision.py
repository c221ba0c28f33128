"""TF32 stays off inside the model calls on CUDA unless asked for (system.ieee_float32):
with TF32 an H200 put parallel DDIM-100 1.2e-2 away from serial (bench/RESULTS.md §11).
The GPU check (bench/gpu_check.sh) measures the effect; here the flag logic is pinned."""
import pytest
import torch

import deqir_fast as dq
from deqir_fast.system import ieee_float32

CUDA = torch.device("cuda")


def flags():
    return (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)


@pytest.fixture
def tf32_on():
    saved = flags()
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    yield
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved


def test_cuda_model_calls_run_in_ieee_float32_and_flags_are_restored(tf32_on):
    with ieee_float32(CUDA):
        assert flags() == ("ieee", "ieee")
    assert flags() == ("tf32", "tf32")


def test_flags_are_restored_when_the_model_raises(tf32_on):
    with pytest.raises(RuntimeError, match="boom"):
        with ieee_float32(CUDA):
            raise RuntimeError("boom")
    assert flags() == ("tf32", "tf32")


@pytest.mark.parametrize("device,allow", [(CUDA, True), (torch.device("cpu"), False)])
def test_allow_tf32_or_cpu_leaves_the_flags_alone(tf32_on, device, allow):
    with ieee_float32(device, allow_tf32=allow):
        assert flags() == ("tf32", "tf32")


@pytest.mark.parametrize("allow", [False, True])
def test_solve_and_serial_pass_allow_tf32_to_the_system(schedule, allow):
    from conftest import make_problem
    model, chain, x_T = make_problem(schedule, "ddim_eta", None, 6, 1, 0.0, seed=2)
    seen = []

    def spy(x, t):
        seen.append(flags())
        return model(x, t)

    res = dq.solve(spy, chain, x_T, generator=torch.Generator().manual_seed(0),
                   options=dq.SolveOptions(allow_tf32=allow))
    assert res.handle.system.allow_tf32 is allow
    dq.sample_serial(spy, chain, x_T, generator=torch.Generator().manual_seed(0), allow_tf32=allow)
    assert seen      # on CPU the flags are never touched, whatever allow_tf32 says
