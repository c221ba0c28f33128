"""The fused solver round (deqir_fast/ops/fused_round.py) and its backends.

- the new reference (coefficients per element, in the state dtype) equals today's path
  (materialised float64 P, Q, R cast to the state dtype, the generic scan, then the
  residuals) to float rounding, on every sampler;
- the native C++/OpenMP kernel equals the reference on fresh random inputs under
  flash-attention's criterion (the Triton kernel: tests/test_triton_round.py);
- the launcher names bad arguments; dispatch reads DEQIR_FAST_BACKEND once, falls back
  with a reason, and demotes a kernel that fails its first-use validation;
- a solve on the native backend equals the serial sampler and never materialises the
  [S, 1, C, H, W] coefficient tensors.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deqir_fast as dq
from conftest import make_problem
from deqir_fast import operators as ops
from deqir_fast.ops import affine_scan_reference, backends, native, step_residuals
from deqir_fast.ops.fused_round import (fused_round, fused_round_reference, step_table,
                                        window_coefficients)
from kernel_cases import GRID, call, cast, classes_in, make_case, within_criterion

NATIVE = native.status()
needs_native = pytest.mark.skipif(not NATIVE.ok, reason=f"native kernels unavailable: {NATIVE.reason}")


@pytest.fixture(autouse=True)
def fresh_backend_settings():
    backends.reset()
    yield
    backends.reset()


# -- the reference against today's path ---------------------------------------------------
def chains(S, op, y):
    ts = dq.timesteps(dq.Schedule.linear(1000), S)
    sched = dq.Schedule.linear(1000)
    out = {"ddim": dq.DDIM(sched, ts, eta=0.0), "ddim_eta": dq.DDIM(sched, ts, eta=0.5)}
    for eb in (0.0, 0.5, 1.0):
        out[f"ddrm_eb{eb}"] = dq.DDRM(sched, ts, operator=op, y=y, sigma_y=0.1, eta=0.85, eta_b=eb)
    out["ddrm_sy0"] = dq.DDRM(sched, ts, operator=op, y=y, sigma_y=0.0, eta=0.5)
    out["ddnm"] = dq.DDNM(sched, ts, operator=op, y=y, sigma_y=0.0, eta=0.3)
    out["ddnm+"] = dq.DDNM(sched, ts, operator=op, y=y, sigma_y=0.1, eta=0.3)
    return out


@pytest.mark.parametrize("name", ["ddim", "ddim_eta", "ddrm_eb0.0", "ddrm_eb0.5", "ddrm_eb1.0",
                                  "ddrm_sy0", "ddnm", "ddnm+"])
def test_reference_equals_todays_materialised_path(name):
    """Singular values from 3 down to 0 (a Separable operator): s·σ' crosses σ_y inside
    the 40-step chain, so every DDRM / DDNM+ class occurs in the window."""
    S, B, lo, hi = 40, 2, 3, 37
    shape = (3, 6, 5)
    gen = torch.Generator().manual_seed(3)
    sep = ops.Separable(shape, height=torch.diag(torch.tensor([3.0, 0.5, 0.05, 0.0, 1.0, 0.3],
                                                              dtype=torch.float64)))
    y = sep.A(torch.randn((B, *shape), generator=gen, dtype=torch.float64))
    chain = chains(S, sep, y)[name]
    spec = chain.kernel_spec()
    rnd = lambda *s: torch.randn(s, generator=gen, dtype=torch.float64)  # noqa: E731
    x_T, noise = rnd(B, *shape), rnd(S, B, *shape)
    W = hi - lo
    E, U, x_last = rnd(W, B, *shape), rnd(W, B, *shape), rnd(B, *shape)
    slopes = torch.rand((W, B, chain.num_jacobian_classes), generator=gen, dtype=torch.float64)
    scale = torch.rand(W, generator=gen, dtype=torch.float64) + 0.5
    results = {}
    for dtype in (torch.float64, torch.float32):
        c = chain.coefficients(x_T.to(dtype), noise.to(dtype) if chain.needs_noise else None)
        lin = dq.linearize.Linearization(chain, c, "secant")
        lin.slopes[lo:hi] = slopes.to(dtype)
        J = lin.jacobian(lo, hi)
        old = affine_scan_reference(c.P[lo:hi], c.Q[lo:hi], E.to(dtype), None if c.R is None else c.R[lo:hi],
                                    U[0].to(dtype), J, U.to(dtype))
        old_r = step_residuals(old - torch.cat([U[1:], x_last[None]]).to(dtype)).double() * scale
        s = None if spec.singulars is None else spec.singulars.to(dtype)
        new, new_r = fused_round_reference(
            spec.sampler, step_table(spec)[lo:hi], E.to(dtype), U.to(dtype), x_last.to(dtype), scale,
            s, c.ybar if spec.uses_y else None,
            noise[lo:hi].to(dtype) if (spec.uses_noise and chain.needs_noise) else None, slopes.to(dtype))
        results[dtype] = (old, old_r, new, new_r)
    old64, oldr64, new64, newr64 = results[torch.float64]
    size = float(old64.abs().max())
    assert float((new64 - old64).abs().max()) <= 1e-13 * size
    assert torch.allclose(newr64, oldr64, rtol=1e-12, atol=0)
    old32, oldr32, new32, newr32 = results[torch.float32]
    ok, msg = within_criterion(new32, old32, old64, torch.float32)
    assert ok, msg
    ok, msg = within_criterion(newr32, oldr32, oldr64, torch.float32)
    assert ok, msg
    if name in ("ddrm_eb0.5", "ddnm+"):
        *_, cls = window_coefficients(spec.sampler, step_table(spec)[lo:hi],
                                      spec.singulars.expand(shape), 3)
        assert set(cls.unique().tolist()) == {0, 1, 2}


def test_only_ddim_ddrm_ddnm_have_a_kernel_spec(schedule):
    ts = dq.timesteps(schedule, 5)
    assert dq.DDIM(schedule, ts).kernel_spec().sampler == "ddim"
    op = ops.Inpainting(torch.ones(4, 4))
    y = torch.zeros(1, 3, 4, 4)
    assert dq.DDRM(schedule, ts, operator=op, y=y).kernel_spec().sampler == "ddrm"
    assert dq.DDNM(schedule, ts, operator=op, y=y).kernel_spec().sampler == "ddnm"
    from deqir_fast.diffusers_compat import DDPM
    assert DDPM(schedule, ts).kernel_spec() is None

    class MyDDIM(dq.DDIM):          # a subclass may step differently: materialised path
        pass
    assert MyDDIM(schedule, ts).kernel_spec() is None


# -- native against the reference ---------------------------------------------------------
@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", range(len(GRID)))
def test_native_matches_reference(k, dtype):
    sampler, kw = GRID[k]
    case = make_case(sampler, seed=100 + k, **kw)
    if "sigma_y" in kw and kw["sigma_y"] > 0 and sampler != "ddim":
        assert classes_in(case) == {0, 1, 2}           # every class is exercised
    ref64 = call(fused_round_reference, case)
    low = cast(case, dtype)
    ref = call(fused_round_reference, low)
    out = call(fused_round, low, backend="native")
    assert out[0].dtype == dtype and out[0].shape == case["E"].shape
    assert out[1].dtype == torch.float64 and out[1].shape == (case["E"].shape[0],)
    for o, r, r64 in zip(out, ref, ref64):
        ok, msg = within_criterion(o, r, r64, dtype)
        assert ok, f"{sampler} {kw} {dtype}: {msg}"


@needs_native
def test_native_residual_is_nan_and_inf_sticky():
    case = make_case("ddrm", S=6, lo=0, hi=6, B=2, item=(3, 5, 7), seed=5)
    case["E"][2, 1, 0, 1, 1] = float("nan")
    case["E"][4, 0, 2, 3, 3] = float("inf")
    ref = call(fused_round_reference, case)
    out = call(fused_round, case, backend="native")
    assert torch.equal(torch.isnan(out[1]), torch.isnan(ref[1])) and bool(torch.isnan(out[1][2]))
    assert torch.equal(torch.isfinite(out[1]), torch.isfinite(ref[1]))
    assert not bool(torch.isfinite(out[1][4:]).any())


@needs_native
def test_native_threads_agree(monkeypatch):
    """The OpenMP split changes no result (each element's arithmetic is fixed)."""
    case = make_case("ddnm", S=20, lo=0, hi=20, B=3, item=(3, 33, 65), seed=9)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = call(fused_round, case, backend="native")
        torch.set_num_threads(2)
        two = call(fused_round, case, backend="native")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


# -- the launcher -------------------------------------------------------------------------
def test_launcher_names_bad_arguments():
    case = make_case("ddrm", S=6, lo=0, hi=6, B=2, item=(3, 5, 7), seed=1)

    def bad(exc, match, **changes):
        c = dict(case, **changes)
        with pytest.raises(exc, match=match):
            call(fused_round, c, backend="torch")

    bad(ValueError, "sampler must be one of", sampler="ddpm")
    bad(ValueError, "E must be", E=case["E"][0, 0, 0])
    bad(ValueError, "U must have shape", U=case["U"][:, :1])
    bad(ValueError, "x_last must have shape", x_last=case["x_last"][:1])
    bad(ValueError, "table must be", table=case["table"][:, :4])
    bad(ValueError, "scale must have shape", scale=case["scale"][:2])
    bad(ValueError, "s .* is required", s=None)
    bad(ValueError, "s must broadcast", s=torch.rand(2, 5, 7, dtype=torch.float64))
    bad(ValueError, "ybar must have shape", ybar=case["ybar"][:, :1])
    bad(ValueError, "noise must have", noise=case["noise"][:2])
    bad(ValueError, "slopes must be", slopes=torch.rand(6, 2, 2, dtype=torch.float64))
    bad(TypeError, "U must have E's dtype", U=case["U"].float())
    bad(TypeError, "E must be a torch.Tensor", E=case["E"].tolist())
    bad(TypeError, "slopes must be a floating-point", slopes=torch.ones(6, 2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="DDIM reads no"):
        call(fused_round, dict(make_case("ddim", S=4, lo=0, hi=4, B=1, item=(1, 2, 3), seed=0),
                               ybar=torch.rand(1, 1, 2, 3, dtype=torch.float64)), backend="torch")
    with pytest.raises(ValueError, match="backend must be"):
        call(fused_round, case, backend="cuda-magic")


# -- dispatch -----------------------------------------------------------------------------
def test_backend_setting_is_read_once(monkeypatch):
    monkeypatch.setenv("DEQIR_FAST_BACKEND", "reference")       # today's name: an alias
    assert backends.forced() == "torch"
    assert backends.choose(torch.device("cpu")) == ("torch", "forced by DEQIR_FAST_BACKEND")
    monkeypatch.setenv("DEQIR_FAST_BACKEND", "native")
    assert backends.forced() == "torch"                          # not re-read per call
    backends.reset()
    assert backends.forced() == "native"
    monkeypatch.setenv("DEQIR_FAST_BACKEND", "cuda-magic")
    backends.reset()
    with pytest.raises(ValueError, match="DEQIR_FAST_BACKEND must be one of"):
        backends.forced()


def test_forced_but_unavailable_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("DEQIR_FAST_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        backends.choose(torch.device("cpu"))
    monkeypatch.setenv("DEQIR_FAST_BACKEND", "native")
    monkeypatch.setenv("DEQIR_FAST_NATIVE_LIB", "/nonexistent/lib.so")
    backends.reset()
    with pytest.raises(ValueError, match="native, but it is unavailable on cpu: DEQIR_FAST_NATIVE_LIB"):
        backends.choose(torch.device("cpu"))


def test_auto_falls_back_to_torch_and_says_why(monkeypatch):
    monkeypatch.delenv("DEQIR_FAST_BACKEND", raising=False)
    monkeypatch.setenv("DEQIR_FAST_NATIVE_LIB", "/nonexistent/lib.so")
    name, why = backends.choose(torch.device("cpu"))
    assert name == "torch" and "native: DEQIR_FAST_NATIVE_LIB=/nonexistent/lib.so does not exist" in why


@needs_native
def test_a_kernel_that_fails_validation_is_demoted(monkeypatch):
    """auto checks each kernel's first call against the reference; a wrong kernel is
    replaced by the reference (right answer) and reported."""
    monkeypatch.delenv("DEQIR_FAST_BACKEND", raising=False)
    assert backends.choose(torch.device("cpu"))[0] == "native"
    real = native.fused_round_native

    def broken(*args):
        out, res = real(*args)
        return out + 1e-2, res
    monkeypatch.setattr(native, "fused_round_native", broken)
    case = make_case("ddim", S=8, lo=0, hi=8, B=2, item=(3, 5, 7), seed=2, eta=0.5)
    out = call(fused_round, case)
    ref = call(fused_round_reference, case)
    assert torch.equal(out[0], ref[0])
    name, why = backends.choose(torch.device("cpu"))
    assert name == "torch" and "failed validation" in why


@needs_native
def test_a_kernel_wrong_only_across_steps_is_caught_on_the_first_window(monkeypatch):
    """A one-step call (the serial sampler's) never reads step i+1's inputs: validation
    runs again on the first window of several steps, where such a kernel is wrong."""
    monkeypatch.delenv("DEQIR_FAST_BACKEND", raising=False)
    real = native.fused_round_native

    def wrong_after_the_first_step(*args):
        out, res = real(*args)
        out = out.clone()
        out[1:] += 1e-2
        return out, res
    monkeypatch.setattr(native, "fused_round_native", wrong_after_the_first_step)
    one = make_case("ddim", S=8, lo=3, hi=4, B=2, item=(3, 5, 7), seed=2, eta=0.5)
    call(fused_round, one)
    assert backends.choose(torch.device("cpu"))[0] == "native"     # passed: one step
    window = make_case("ddim", S=8, lo=0, hi=8, B=2, item=(3, 5, 7), seed=3, eta=0.5)
    out = call(fused_round, window)
    assert torch.equal(out[0], call(fused_round_reference, window)[0])
    name, why = backends.choose(torch.device("cpu"))
    assert name == "torch" and "failed validation" in why


@needs_native
def test_a_kernel_wrong_only_with_noise_is_caught_on_its_first_noisy_call(monkeypatch):
    """Validation is per combination of optional inputs: a window without noise (eta 0)
    does not vouch for the noise path."""
    monkeypatch.delenv("DEQIR_FAST_BACKEND", raising=False)
    real = native.fused_round_native

    def wrong_with_noise(*args):
        out, res = real(*args)
        noise = args[8]
        return (out + 1e-2, res) if noise is not None else (out, res)
    monkeypatch.setattr(native, "fused_round_native", wrong_with_noise)
    quiet = make_case("ddim", S=8, lo=0, hi=8, B=2, item=(3, 5, 7), seed=2, eta=0.5, noise=False)
    call(fused_round, quiet)
    assert backends.choose(torch.device("cpu"))[0] == "native"
    noisy = make_case("ddim", S=8, lo=0, hi=8, B=2, item=(3, 5, 7), seed=3, eta=0.5)
    out = call(fused_round, noisy)
    assert torch.equal(out[0], call(fused_round_reference, noisy)[0])
    assert backends.choose(torch.device("cpu"))[0] == "torch"


@needs_native
def test_cli_info_lists_backends(monkeypatch):
    from deqir_fast.cli import backend_lines
    monkeypatch.delenv("DEQIR_FAST_BACKEND", raising=False)
    lines = dict(backend_lines())
    assert lines["native library"].startswith("loaded")
    assert lines["fused round on cpu"].startswith("native (auto")
    monkeypatch.setenv("DEQIR_FAST_NATIVE_LIB", "/nonexistent/lib.so")
    backends.reset()
    lines = dict(backend_lines())
    assert "does not exist" in lines["native library"]
    assert lines["fused round on cpu"].startswith("torch (auto: native:")


def test_package_imports_and_falls_back_without_the_library(tmp_path):
    """A failed native build must leave a working package: run a solve in a fresh
    process that cannot find the library."""
    code = ("import torch, deqir_fast as dq\n"
            "from deqir_fast.ops import backends\n"
            "from conftest import make_problem\n"
            "sched = dq.Schedule.linear(1000)\n"
            "model, chain, x_T = make_problem(sched, 'ddrm', 'sr', 8, 1, 0.1)\n"
            "serial = dq.sample_serial(model, chain, x_T, generator=torch.Generator().manual_seed(0))\n"
            "res = dq.solve(model, chain, x_T, generator=torch.Generator().manual_seed(0), tol=1e-10)\n"
            "assert (res.x0 - serial).abs().max() < 1e-10\n"
            "print(backends.choose(torch.device('cpu')))\n")
    env = dict(os.environ, DEQIR_FAST_NATIVE_LIB=str(tmp_path / "missing.so"), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), str(Path(__file__).parents[1])]))
    env.pop("DEQIR_FAST_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "'torch'" in proc.stdout and "does not exist" in proc.stdout


# -- the solver on the native backend -------------------------------------------------------
@needs_native
@pytest.mark.parametrize("kind,op_name,sigma_y", [("ddim_eta", None, 0.0), ("ddrm", "sr", 0.1),
                                                  ("ddnm", "inpainting", 0.1)])
def test_solve_on_native_equals_serial_without_materialising(schedule, monkeypatch, kind, op_name,
                                                             sigma_y):
    monkeypatch.setenv("DEQIR_FAST_BACKEND", "native")
    calls = []
    real = native.fused_round_native
    monkeypatch.setattr(native, "fused_round_native", lambda *a: calls.append(1) or real(*a))
    model, chain, x_T = make_problem(schedule, kind, op_name, 20, 2, sigma_y, seed=11)
    gen = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    serial = dq.sample_serial(model, chain, x_T, generator=gen(), return_states=True)
    n_serial = len(calls)
    res = dq.solve(model, chain, x_T, generator=gen(), tol=1e-10, solver="triangular_anderson")
    # one fused round per round, plus the serial shadow's step (one per round: it never
    # found a frozen state off the serial one here)
    assert res.stats.serial_mismatch is None
    assert n_serial == 20 and len(calls) - n_serial == 2 * res.iterations
    assert res.converged
    assert (res.states - serial).abs().max().item() <= 1e-8 * serial.abs().max().item()
    assert not res.handle.system.coeffs.materialized      # no [S, 1, C, H, W] P, Q, R


@needs_native
def test_native_op_is_a_well_formed_custom_op():
    """Schema, FakeTensor (the registered fake: torch.compile traces the op) and AOT
    dispatch, checked by torch.library.opcheck; then torch.compile(fullgraph=True)."""
    from deqir_fast.ops.fused_round import _normalise
    c = make_case("ddrm", S=6, lo=0, hi=6, B=2, item=(3, 5, 7), seed=1)
    args = _normalise(c["sampler"], c["table"], c["E"], c["U"], c["x_last"], c["scale"], c["s"],
                      c["ybar"], c["noise"], c["slopes"])
    op = torch.ops.deqir_fast.fused_round
    result = torch.library.opcheck(op.default, args, test_utils=("test_schema", "test_faketensor",
                                                                 "test_aot_dispatch_static"))
    assert set(result.values()) == {"SUCCESS"}, result
    compiled = torch.compile(lambda *a: op(*a)[0] * 2, fullgraph=True, backend="eager")
    assert torch.equal(compiled(*args), op(*args)[0] * 2)
