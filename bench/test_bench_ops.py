"""pytest-benchmark micro suite for the hot ops (deqir_fast/ops/): the fused solver round
on each available backend and Anderson mixing (the ring buffer against the list-based
reference). Every timed result is checked against the reference first.

    OMP_NUM_THREADS=1 python -m pytest bench/test_bench_ops.py --benchmark-only --benchmark-autosave --benchmark-storage=bench/.benchmarks

Groups put the backends of one configuration side by side (``--benchmark-group-by=group``).
"""
import pytest
import torch

from deqir_fast.ops import anderson_mix, backends
from deqir_fast.ops.fused_round import fused_round

from round import round_inputs

SHAPES = {"S100-3x64x64": (100, 1, (3, 64, 64)), "S20-B4-3x32x32": (20, 4, (3, 32, 32))}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SYNC = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)


def _available(name):
    return backends.available(DEVICE)[name][0]


@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
@pytest.mark.parametrize("sampler", ["ddim", "ddrm", "ddnm"])
@pytest.mark.parametrize("size", sorted(SHAPES))
def test_fused_round(benchmark, size, sampler, backend):
    if not _available(backend):
        pytest.skip(f"{backend} unavailable on {DEVICE}: {backends.available(DEVICE)[backend][1]}")
    S, B, shape = SHAPES[size]
    a = round_inputs(sampler, S, B, shape, DEVICE)
    ref = fused_round(**a, backend="torch")
    out = fused_round(**a, backend=backend)
    scale = max(1.0, float(ref[0].abs().max()))
    assert float((out[0] - ref[0]).abs().max()) <= 1e-4 * scale
    assert torch.allclose(out[1], ref[1], rtol=1e-4, atol=1e-6)
    benchmark.group = f"fused round {sampler} {size} {DEVICE.type}"

    def run():
        fused_round(**a, backend=backend)
        SYNC()
    benchmark(run)


@pytest.mark.parametrize("impl", ["reference", "ring"])
@pytest.mark.parametrize("prefix", [False, True])
def test_anderson_mix(benchmark, impl, prefix):
    from deqir_fast.ops.anderson import AndersonRing
    S, B, shape, m = 100, 1, (3, 64, 64), 4
    gen = torch.Generator().manual_seed(0)
    Xs = [torch.randn((S, B, *shape), generator=gen).to(DEVICE) for _ in range(m)]
    Gs = [torch.randn((S, B, *shape), generator=gen).to(DEVICE) * 0.1 for _ in range(m)]
    valid = torch.ones((m, S), dtype=torch.bool, device=DEVICE)
    ref = anderson_mix(Xs, Gs, valid, prefix=prefix)
    ring = AndersonRing(m, rows=S, like=Xs[0][0])
    for X, G in zip(Xs, Gs):
        ring.push(0, S, X, G)
    assert torch.allclose(ring.mix(0, S, prefix=prefix), ref, rtol=1e-4, atol=1e-5)
    benchmark.group = f"anderson mix m={m} prefix={prefix} {DEVICE.type}"

    def run():
        if impl == "reference":
            anderson_mix(Xs, Gs, valid, prefix=prefix)
        else:
            ring.mix(0, S, prefix=prefix)
        SYNC()
    benchmark(run)
