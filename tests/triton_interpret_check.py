"""Run by tests/test_triton_scan.py in a fresh process with TRITON_INTERPRET=1 (the
variable must be set before triton is imported): the Triton scan against the reference."""
import itertools
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1"
import torch  # noqa: E402

from deqir_fast.ops.scan import affine_scan_reference  # noqa: E402
from deqir_fast.ops.triton_scan import affine_scan_triton  # noqa: E402

failures = []
gen = torch.Generator().manual_seed(0)


def rand(*shape):
    return torch.randn(shape, generator=gen, dtype=torch.float64)


# S, B and odd image shapes; P/Q per step only or per element; R absent, shared across
# the batch (stride 0: a kernel reading R at the batch stride fails here) or per item;
# J absent, per (step, item) or per element (the linearised scan). Every (R, J) pair
# runs once, on rotating shapes and coefficient layouts, so R shared and per item both
# meet B > 1 (the interpreter costs ~0.3 s a launch; the full product took a minute).
SIZES = [(1, 1, (1, 3, 5)), (7, 3, (3, 5, 7)), (20, 2, (3, 8, 12))]
cases = [(SIZES[k % 3], ("step", "element")[k % 2], r_kind, j_kind)
         for k, (r_kind, j_kind) in enumerate(itertools.product([None, "shared", "item"],
                                                                [None, "step-item", "element"]))]
for k, ((S, B, shape), coef, r_kind, j_kind) in enumerate(cases):
    block = (64, 1024)[k % 2]
    pshape = (S, 1, 1, 1, 1) if coef == "step" else (S, 1, *shape)
    P64, Q64, E64, u064 = rand(*pshape).abs(), rand(*pshape), rand(S, B, *shape), rand(B, *shape)
    R64 = None if r_kind is None else rand(S, 1 if r_kind == "shared" else B, *shape)
    J64 = None if j_kind is None else rand(*((S, B, 1, 1, 1) if j_kind == "step-item" else (S, 1, *shape)))
    U64 = None if j_kind is None else rand(S, B, *shape)
    if U64 is not None:
        U64[0] = u064
    ref64 = affine_scan_reference(P64, Q64, E64, R64, u064, J64, U64)
    for dtype in (torch.float32, torch.float64):
        cast = [None if t is None else t.to(dtype) for t in (P64, Q64, E64, R64, u064, J64, U64)]
        ref = affine_scan_reference(*cast)
        out = affine_scan_triton(*cast, block=block)
        # flash-attention's criterion: within 2x the reference's own error in this dtype
        err = (out.double() - ref64).abs().max().item()
        ref_err = (ref.double() - ref64).abs().max().item()
        atol = 1e-12 if dtype == torch.float64 else 1e-6
        case = (S, B, shape, coef, r_kind, j_kind, block, dtype)
        if out.dtype != dtype or out.shape != E64.shape:
            failures.append(f"{case}: wrong dtype/shape {out.dtype} {tuple(out.shape)}")
        if not err <= 2 * ref_err + atol * max(1.0, ref64.abs().max().item()):
            failures.append(f"{case}: error {err:.2e} > 2 x {ref_err:.2e} + {atol}")

# order 2 (DPM-Solver++(2M), docs/design.md §2.8): the previous step's input and
# linearised model term carried beside the state, with and without R and J; the increment
# form (P holds P - 1: u + (P u + Q e + R), Chain.increment_form) on the last two
for k, (r_kind, j_kind) in enumerate([(None, None), ("item", "element"), ("shared", "step-item")]):
    increment = k > 0
    S, B, shape = SIZES[(k + 1) % 3]
    P64, Q64, E64, u064 = rand(S, 1, *shape).abs(), rand(S, 1, *shape), rand(S, B, *shape), rand(B, *shape)
    C64, D64 = rand(S, 1, 1, 1, 1), rand(S, 1, *shape)
    up64, ep64 = rand(B, *shape), rand(B, *shape)
    R64 = None if r_kind is None else rand(S, 1 if r_kind == "shared" else B, *shape)
    J64 = None if j_kind is None else rand(*((S, B, 1, 1, 1) if j_kind == "step-item" else (S, 1, *shape)))
    U64 = None if j_kind is None else rand(S, B, *shape)
    ref64 = affine_scan_reference(P64, Q64, E64, R64, u064, J64, U64, (C64, D64, up64, ep64),
                                  increment)
    first = affine_scan_reference(P64, Q64, E64, R64, u064, J64, U64)
    if (ref64 - first).abs().max() < 1e-3:
        failures.append(f"order 2 case {k}: the previous term changed nothing (the case tests nothing)")
    for dtype in (torch.float32, torch.float64):
        cast = [None if t is None else t.to(dtype) for t in (P64, Q64, E64, R64, u064, J64, U64)]
        prev = tuple(t.to(dtype) for t in (C64, D64, up64, ep64))
        ref = affine_scan_reference(*cast, prev, increment)
        out = affine_scan_triton(*cast, prev, block=64, increment=increment)
        err = (out.double() - ref64).abs().max().item()
        ref_err = (ref.double() - ref64).abs().max().item()
        atol = 1e-12 if dtype == torch.float64 else 1e-6
        if not err <= 2 * ref_err + atol * max(1.0, ref64.abs().max().item()):
            failures.append(f"order 2 case {k} {dtype}: error {err:.2e} > 2 x {ref_err:.2e} + {atol}")

# bad input is refused with a clear error
for bad, exc in [(lambda: affine_scan_triton(rand(3, 1, 2), rand(3, 1, 2), rand(3, 2, 2), None, rand(3, 2)), ValueError),
                 (lambda: affine_scan_triton(rand(3, 1, 2).float(), rand(3, 1, 2), rand(3, 2, 2), None, rand(2, 2)), TypeError),
                 (lambda: affine_scan_triton(rand(3, 1, 2), rand(3, 1, 2), rand(3, 2, 2), None, rand(2, 2), rand(3, 1, 2)), ValueError)]:
    try:
        bad()
        failures.append(f"no {exc.__name__} raised")
    except exc:
        pass

# end to end: the solver on the Triton backend equals the serial sampler
os.environ["DEQIR_FAST_BACKEND"] = "triton"
import deqir_fast as dq  # noqa: E402
from deqir_fast.ops import backends  # noqa: E402

backends.reset()                      # the setting is read once: re-read it
from deqir_fast import operators as ops  # noqa: E402

sched = dq.Schedule.linear(1000)
shape = (3, 8, 8)
model = dq.testing.GaussianMixtureDenoiser(sched, shape)
op = ops.SuperResolution(2, shape)
chain = dq.DDRM(sched, dq.timesteps(sched, 10), operator=op, y=op.A(model.means[:2].detach()),
                sigma_y=0.05)
x_T = rand(2, *shape)
serial = dq.sample_serial(model, chain, x_T, generator=torch.Generator().manual_seed(1))
res = dq.solve(model, chain, x_T, generator=torch.Generator().manual_seed(1), tol=1e-12)
if not (res.x0 - serial).abs().max().item() <= 1e-10:
    failures.append("solve on the triton backend differs from the serial sampler")
# an order-2 chain (DPM-Solver++(2M)) in windows of 4: its scan runs the ORDER2 kernel
from deqir_fast.chains import DPMSolverPP  # noqa: E402
from deqir_fast.schedules import schedule_from_sigmas  # noqa: E402

sched2, ts2, final2 = schedule_from_sigmas(torch.cat([torch.linspace(14.0, 0.05, 12), torch.zeros(1)]))
dpm = DPMSolverPP(sched2, ts2, final_alpha=final2)
model2 = dq.testing.GaussianMixtureDenoiser(sched2, shape)
serial = dq.sample_serial(model2, dpm, x_T)
res = dq.solve(model2, dpm, x_T, tol=1e-12, window=4)
if not (res.converged and (res.x0 - serial).abs().max().item() <= 1e-10):
    failures.append("an order-2 solve on the triton backend differs from the serial sampler")

# the kernel has no backward: autograd (a phantom gradient) goes through the reference
x = x_T.clone().requires_grad_(True)
res = dq.solve(model, chain, x, generator=torch.Generator().manual_seed(1), grad="phantom")
if not res.x0.requires_grad:
    failures.append("phantom gradient on the triton backend has no graph")
else:
    res.x0.sum().backward()
    os.environ["DEQIR_FAST_BACKEND"] = "reference"
    backends.reset()
    x_ref = x_T.clone().requires_grad_(True)
    dq.solve(model, chain, x_ref, generator=torch.Generator().manual_seed(1), grad="phantom").x0.sum().backward()
    if not torch.allclose(x.grad, x_ref.grad, rtol=1e-9, atol=1e-12):
        failures.append("phantom gradient on the triton backend differs from the reference's")

print("\n".join(failures) or "ok")
sys.exit(1 if failures else 0)
