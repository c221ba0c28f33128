"""The kernels on a real GPU (compiled Triton, CUDA C++), against the reference: run by
bench/gpu_check.sh on a lent GPU; every test here skips without CUDA and says so."""
import pytest
import torch

import deqir_fast as dq
from deqir_fast.ops import backends, native
from deqir_fast.ops.fused_round import fused_round, fused_round_reference
from kernel_cases import GRID, call, cast, make_case, within_criterion

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA GPU visible: the CUDA kernels are tested by bench/gpu_check.sh")


@pytest.fixture(autouse=True)
def fresh_backend_settings():
    backends.reset()
    yield
    backends.reset()


def on_cuda(case):
    return {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


def available(name):
    ok, why = backends.available(torch.device("cuda"))[name]
    if not ok:
        pytest.skip(f"{name} unavailable on cuda: {why}")


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", range(len(GRID)))
def test_cuda_kernels_match_reference(k, dtype, backend):
    available(backend)
    sampler, kw = GRID[k]
    case = make_case(sampler, seed=100 + k, **kw)
    ref64 = call(fused_round_reference, case)
    low = on_cuda(cast(case, dtype))
    ref = call(fused_round_reference, low)
    out = call(fused_round, low, backend=backend)
    for o, r, r64 in zip(out, ref, ref64):
        ok, msg = within_criterion(o.cpu(), r.cpu(), r64, dtype)
        assert ok, f"{backend} {sampler} {kw} {dtype}: {msg}"


def test_cuda_native_anderson_ring_matches_torch_ring():
    available("native")
    from deqir_fast.ops.anderson import AndersonRing
    if not torch._C._dispatch_has_kernel_for_dispatch_key("deqir_fast::anderson_mix", "CUDA"):
        pytest.skip("the native library has no CUDA Anderson kernels")
    gen = torch.Generator().manual_seed(0)
    B, item = 2, (3, 17, 9)
    rings = [AndersonRing(4, 8, torch.zeros((B, *item), device="cuda")) for _ in range(2)]
    rings[0].native, rings[1].native = True, False
    for lo, hi in [(0, 8), (1, 9), (1, 9), (3, 11), (5, 12)]:
        X = torch.randn((hi - lo, B, *item), generator=gen).cuda()
        FX = X + 0.1 * torch.randn((hi - lo, B, *item), generator=gen).cuda()
        outs = []
        for ring in rings:
            ring.push(lo, hi, X, FX=FX)
            outs.append(ring.mix(lo, hi, prefix=True, damping=0.9))
        assert torch.allclose(outs[0], outs[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
@pytest.mark.parametrize("kind,op_name,sigma_y", [("ddim_eta", None, 0.0), ("ddrm", "sr", 0.1),
                                                  ("ddnm", "inpainting", 0.1)])
def test_solve_on_cuda_equals_serial(schedule, monkeypatch, backend, kind, op_name, sigma_y):
    if backend != "torch":
        available(backend)
    monkeypatch.setenv("DEQIR_FAST_BACKEND", backend)
    from conftest import make_problem
    model, chain, x_T = make_problem(schedule, kind, op_name, 20, 2, sigma_y, seed=11)
    model, x_T = model.cuda(), x_T.cuda()
    if hasattr(chain, "y"):
        chain.y = chain.y.cuda()
    noise = torch.randn((20, *x_T.shape), generator=torch.Generator().manual_seed(3), dtype=x_T.dtype).cuda()
    serial = dq.sample_serial(model, chain, x_T, noise=noise, return_states=True)
    res = dq.solve(model, chain, x_T, noise=noise, tol=1e-10, solver="triangular_anderson")
    assert res.converged
    assert (res.states - serial).abs().max().item() <= 1e-8 * serial.abs().max().item()
    assert not res.handle.system.coeffs.materialized
    assert native.status().ok or backend != "native"
