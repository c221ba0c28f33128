"""Run by tests/test_triton_round.py in a fresh process with TRITON_INTERPRET=1 (set
before triton is imported): the fused-round Triton kernel against the reference on
tests/kernel_cases.py's grid, then a solve on the Triton backend against the serial
sampler. Prints 'ok' or the failures."""
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1"
import torch  # noqa: E402

from deqir_fast.ops.fused_round import fused_round, fused_round_reference  # noqa: E402
from kernel_cases import GRID, call, cast, make_case, within_criterion  # noqa: E402

failures = []
# the kernel's constexprs carry deqir_fast/ops/layout.py's values (one definition)
from deqir_fast.ops import layout, triton_round  # noqa: E402
values = {"NS": layout.NS, **layout.COLUMNS,
          **{k.upper(): v for k, v in layout.SAMPLERS.items()}}
for name, value in values.items():
    got = getattr(getattr(triton_round, name, None), "value", None)
    if got != value:
        failures.append(f"triton_round.{name} is {got}, deqir_fast/ops/layout.py has {value}")
if failures:                                      # every case below would be wrong anyway
    print("\n".join(failures))
    sys.exit(1)
only = os.environ.get("TRITON_CHECK_ONLY")        # a subset, e.g. "0,3" (debugging)
for k, (sampler, kw) in enumerate(GRID):
    if only and str(k) not in only.split(","):
        continue
    case = make_case(sampler, seed=100 + k, **kw)
    ref64 = call(fused_round_reference, case)
    for dtype in (torch.float32, torch.float64):
        low = cast(case, dtype)
        ref = call(fused_round_reference, low)
        # small blocks on odd cases: several programs, a masked tail
        out = call(fused_round, low, backend="triton") if k % 2 else \
            __import__("deqir_fast.ops.triton_round", fromlist=["x"]).fused_round_triton(
                *__import__("deqir_fast.ops.fused_round", fromlist=["x"])._normalise(
                    low["sampler"], low["table"], low["E"], low["U"], low["x_last"], low["scale"],
                    low["s"], low["ybar"], low["noise"], low["slopes"]), block=64)
        states = out[0].view(case["E"].shape)
        if states.dtype != dtype or out[1].dtype != torch.float64:
            failures.append(f"{k} {sampler} {dtype}: wrong dtypes {states.dtype} {out[1].dtype}")
        for what, o, r, r64 in (("states", states, ref[0], ref64[0]), ("residuals", out[1], ref[1], ref64[1])):
            ok, msg = within_criterion(o, r, r64, dtype)
            if not ok:
                failures.append(f"{k} {sampler} {kw} {dtype} {what}: {msg}")

if not only:
    # end to end: the solver and the serial sampler on the Triton backend
    os.environ["DEQIR_FAST_BACKEND"] = "triton"
    import deqir_fast as dq  # noqa: E402
    from deqir_fast import operators as ops  # noqa: E402
    sched = dq.Schedule.linear(1000)
    shape = (3, 8, 8)
    model = dq.testing.GaussianMixtureDenoiser(sched, shape)
    op = ops.SuperResolution(2, shape)
    chain = dq.DDRM(sched, dq.timesteps(sched, 8), operator=op, y=op.A(model.means[:2].detach()),
                    sigma_y=0.05)
    x_T = torch.randn((2, *shape), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    serial = dq.sample_serial(model, chain, x_T, generator=torch.Generator().manual_seed(1))
    res = dq.solve(model, chain, x_T, generator=torch.Generator().manual_seed(1), tol=1e-12)
    if not (res.converged and (res.x0 - serial).abs().max().item() <= 1e-10):
        failures.append("solve on the triton backend differs from the serial sampler")
    # the kernel has no backward: a phantom gradient goes through the reference
    x = x_T.clone().requires_grad_(True)
    out = dq.solve(model, chain, x, generator=torch.Generator().manual_seed(1), grad="phantom")
    if not out.x0.requires_grad:
        failures.append("phantom gradient on the triton backend has no graph")

print("\n".join(failures) or "ok")
sys.exit(1 if failures else 0)
