"""Step sharding across processes (issue #14): gloo on CPU, 2 and 3 ranks.

Each test starts its ranks as subprocesses of this file (``--worker``) on a free port and
waits for them with a hard timeout, so a hang fails the test instead of CI. One launch
runs a whole grid of cases: every rank solves each case sharded and alone, and rank 0
writes the comparison to a JSON file the test reads.
"""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LAUNCH_TIMEOUT = 90            # seconds for a whole launch (they take ~5-15 s)

# (kind, op, S, window, linearize, rebalance[, max_iter]); S = 7 and 11 divide by neither 2 nor 3
CASES = [
    ("ddim_eta", None, 11, None, "secant", True),
    ("ddim", None, 11, 4, "secant", True),
    ("ddrm", "inpainting", 11, None, "secant", True),
    ("ddrm", "inpainting", 7, 5, "secant", False),
    ("ddnm", "sr", 11, None, "secant", False),
    ("ddnm", "sr", 11, 5, "secant", True),
    ("ddrm", "sr", 7, None, "paradigms", True),
    ("ddnm", "inpainting", 7, 3, "none", True),
    ("ddim_eta", None, 7, None, "gaussian", False),
    ("ddrm", "inpainting", 11, 4, "secant", True, 3),      # stopped by max_iter mid-window
]
# heavy_ball and half_damped: user-registered rules (conftest), one with per-step history
# moving between ranks, one duck-typed that reads G (a rank without steps calls it on an
# empty block, G too): they run sharded like the built-in ones (issue #23)
SOLVERS = ("picard", "anderson", "triangular_anderson", "heavy_ball", "half_damped")
# Which cases each world size runs: each covers all three chains, every solver, window
# on and off and both splits; together every case (the file stays within a minute on a
# 2-core machine)
CASES_BY_WORLD = {2: [1, 2, 5, 8], 3: [0, 3, 4, 5, 6, 7, 9]}
GRAD_CASES = [("ddrm", "inpainting", "picard", None), ("ddnm", "sr", "triangular_anderson", 4)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, mode: str, out: str, extra=()):
    """Run ``world`` worker ranks; returns (returncodes, stderrs, seconds)."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + HERE)
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(r), str(world), str(port),
                               mode, out, *extra], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    t0 = time.perf_counter()
    errs, codes = [], []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(1.0, LAUNCH_TIMEOUT - (time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            for q in procs:              # only the processes this test started
                q.kill()
            pytest.fail(f"distributed launch ({mode}, world {world}) hung past {LAUNCH_TIMEOUT} s")
        errs.append(err)
        codes.append(p.returncode)
    return codes, errs, time.perf_counter() - t0


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """One launch per world size (process start-up dominates on a small machine): the
    parity grid, then with 3 ranks the failure scenario (rank 1 raises)."""
    out = {}
    for world, mode in ((2, "parity"), (3, "parity+raise")):
        path = str(tmp_path_factory.mktemp(f"w{world}") / "res.json")
        codes, errs, seconds = launch(world, mode, path)
        out[world] = (codes, errs, seconds, path)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_equals_single_process(world, launches):
    codes, errs, _, out = launches[world]
    assert os.path.exists(out), "\n".join(errs)
    rows = json.load(open(out))
    n = len(CASES_BY_WORLD[world]) * len(SOLVERS)
    assert len(rows) == n + len(GRAD_CASES) + 1
    checks = rows.pop()["checks"]
    assert checks["device"].startswith("ValueError") and "gloo" in checks["device"], checks
    assert checks["check_every"].startswith("ValueError") and "check_every" in checks["check_every"]
    assert checks["group type"].startswith("TypeError"), checks
    # a window of 3 over the chain: the first rounds' windows end before S (last False),
    # the final ones at S (last True), one call per round
    acc = checks["window accept"]
    assert len(acc["last"]) == acc["rounds"] and acc["last"][0] is False and acc["last"][-1] is True, acc
    assert acc["last"] == sorted(acc["last"]), acc       # once at the end, it stays there
    for sh in checks["shadow"]:
        assert sh["mismatch"] is not None and sh["converged"] and sh["rounds"] <= sh["S"], sh
        # bit for bit where the front ran ahead of the shadow (every state it passed was
        # replaced by its serial one); with J = 0 the carry it compared stays within tol
        assert sh["equal"] or sh["linearize"] == "none", sh
        # exactly the frozen states it reached compared, the carry included, up to the
        # restart (a chain this sensitive may take other decisions than the single-process
        # solve: float rounding of the carry correction, so no comparison with it here)
        assert sh["checked"] == sh["frozen_before"] and sh["checked"][-1] == sh["mismatch"], sh
    for row in rows[n:]:
        assert row["x_T_err"] <= 1e-10 and row["param_err"] <= 1e-10, row
        assert row["backward_err"] <= 1e-10 and row["backward_sharded"] == 1, row
    for row in rows[:n]:
        # The sharded loop takes the single-process decisions on residuals equal to ~1e-16
        # relative (asserted below to 1e-6), so equal rounds and nfe follow on any CPU
        # as long as no residual lies within that of a threshold (tol, tol * freeze_ratio)
        assert row["margin"] > 1e-6, ("a residual this close to a threshold can take "
                                      "either side: pick another case", row)
        assert row["iters"] == row["iters_ref"], row
        assert row["nfe"] == row["nfe_ref"], row
        assert row["converged"] == row["converged_ref"], row
        assert row["states_err"] <= 1e-10, row          # every state, not only x0
        assert row["x0_err"] <= 1e-10, row
        assert row["same_on_ranks"], row
        assert row["rounds_marked"] == row["iters"], row
        assert row["bytes_outside_rounds"] >= row["replicate_bytes"], row
        assert row["residuals_equal"], row
    if world == 2:
        assert codes == [0, 0], "\n".join(errs)


def test_error_on_one_rank_reaches_every_rank(launches):
    codes, errs, seconds, _ = launches[3]
    assert codes == [3, 3, 3], "\n".join(errs)
    for err in errs:
        # the parameter VJPs of the backward: rank 1's error reaches every rank
        assert "ADJ ShardError" in err and "rank 1 raised RuntimeError: boom in parameter VJP" in err, err
        assert float(err.split("ADJ after ", 1)[1].split(" s")[0]) < 5, err
        assert "ShardError" in err and "rank 1 raised RuntimeError: boom at step" in err, err
        # promptly: within the round it happened in, not after the 20 s timeout
        assert float(err.rsplit("after ", 1)[1].split(" s")[0]) < 5, err


def test_planned_sharded_solve_takes_the_same_decisions_on_every_rank(tmp_path):
    """window="auto" with a process group: the ranks agree on every window (the slowest
    rank's round time, rank 0's cached state), also when one rank's calls cost more than
    the other's, go serial together where a call's cost grows with its images (every rank
    runs the serial sampler), and end where the serial sampler does."""
    out = str(tmp_path / "planner.json")
    codes, errs, _ = launch(2, "planner", out)
    assert codes == [0, 0], "\n".join(errs)
    with open(out) as f:
        rows = json.load(f)
    assert len(rows) == 12
    for r in rows:
        assert r["same_decisions"], r
        assert r["converged"] and r["iterations"] <= r["S"], r
        assert r["err"] <= 2 / 255, r
    steep = [r for r in rows if r["case"][0] == "steep"]
    flat = [r for r in rows if r["case"][0] == "flat"]
    assert all(r["serial_from"] is not None for r in steep), steep
    assert all(r["serial_from"] is None and max(r["windows"]) > 2 for r in flat), flat


@pytest.mark.parametrize("world", [2, 3])
def test_order_two_chain_sharded_equals_single_process(world, tmp_path):
    """DPM-Solver++(2M), an order-2 chain (docs/design.md §2.8): a block's map carries the
    carry and the previous term (two states, a 2x2 composition across the blocks), each
    block evaluates the step before it, and the state two back travels with the carry.
    Same rounds, decisions and states as the single-process solve (float64), the serial
    result, implicit gradients equal to autograd through the serial sampler, and a
    shadow restart that must put in the state before the bad one too."""
    out = str(tmp_path / "order2.json")
    codes, errs, _ = launch(world, "order2", out)
    assert codes == [0] * world, "\n".join(errs)
    with open(out) as f:
        rows = json.load(f)
    solves = [r for r in rows if r["case"][0] == "solve"]
    assert len(solves) == 12
    for r in solves:
        # equal rounds follow from residuals equal to rounding unless one lies that close to
        # a threshold (as in the parity grid above)
        assert r["margin"] > 1e-6, ("a residual this close to a threshold can take either "
                                    "side: pick another case", r)
        assert r["iters"] == r["iters_ref"] and r["converged"] == r["converged_ref"], r
        assert r["residuals_equal"], r       # every round's residual row, not only the end
        assert r["states_err"] <= 1e-10 and r["serial_err"] <= 1e-9, r
        assert r["same_on_ranks"], r
        # every block from a > 0 evaluates the step before it: more rows than one process
        assert r["nfe"] >= r["nfe_ref"], r
    grad = next(r for r in rows if r["case"][0] == "grad")
    assert grad["x_T_err"] <= 1e-9, grad
    restart = next(r for r in rows if r["case"][0] == "restart")
    assert restart["mismatch"] is not None and restart["converged"], restart
    assert restart["serial_err"] <= 1e-9, restart


def test_ranks_drawing_different_noise_are_refused(tmp_path):
    """x_T agrees but each rank's generator differs: the noise differs, and every rank
    must refuse rather than solve a chain stitched from different draws."""
    codes, errs, _ = launch(2, "noise", str(tmp_path / "noise.json"))
    for err in errs:
        assert "NOISE ValueError" in err and "differ across ranks" in err, err


def test_stuck_rank_times_out(tmp_path):
    """A rank that never reaches the next collective: the others give up after the
    configured timeout with a ShardError instead of hanging."""
    out = str(tmp_path / "stuck.json")
    codes, errs, seconds = launch(2, "stuck", out)
    assert codes[0] == 4, errs[0]
    assert "timed out" in errs[0]
    assert seconds < 60


PLAIN_LAUNCHES = 3       # each ~4 s; bench/sharded_teardown.py measures 30


def test_the_plain_pattern_exits_cleanly(tmp_path):
    """Every rank: ``res = solve(..., process_group=...)``, ``destroy_process_group()``,
    exit with ``res`` alive, no barrier. Nothing of the library may hold the group past
    the user's destroy (its gloo workers then outlive it into interpreter shutdown and
    abort the process in 1 of 4-8 launches on 2 cores); the backward of such a result
    says the group is gone instead of failing inside torch."""
    for launch_no in range(PLAIN_LAUNCHES):
        codes, errs, _ = launch(2, "plain", str(tmp_path / f"plain{launch_no}.json"))
        assert codes == [0, 0], "\n".join(errs)
        for err in errs:
            assert "PLAIN group held after destroy: False" in err, err
            assert "PLAIN backward after destroy: ValueError" in err and "destroyed" in err, err


def test_a_shard_config_is_not_changed_by_a_solve():
    """``resolve`` fills in the default group on a copy: a ShardConfig the user keeps for
    later solves must not come to hold the group (it would outlive destroy_process_group)."""
    import datetime
    import tempfile
    import torch
    import torch.distributed as dist
    import deqir_fast as dq
    from deqir_fast.distributed import ShardConfig
    dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=30))
    try:
        cfg = ShardConfig(timeout=30)
        model, chain, x_T = _problem("ddim", None, 5, None)
        res = dq.solve(model, chain, x_T, process_group=cfg)
        assert cfg.group is None and res.converged
        grad = dq.backward(res, torch.ones_like(res.x0))["x_T"]
        assert grad.shape == x_T.shape and bool(grad.abs().sum() > 0)
    finally:
        dist.destroy_process_group()


def test_the_example_refuses_cuda_without_a_gpu_in_one_line():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")   # no GPU, anywhere
    p = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "sharded_solve.py"),
                        "--device", "cuda"], env=env, capture_output=True, text=True, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1, p.stderr
    assert "--device cuda" in lines[0] and "--device cpu" in lines[0], p.stderr


def test_bad_process_group_arguments():
    import deqir_fast as dq
    from deqir_fast.distributed import ShardConfig, resolve
    with pytest.raises(ValueError, match="not initialised"):
        resolve(object())
    model, chain, x_T = _problem("ddim", None, 5, None)
    with pytest.raises(ValueError, match="not initialised"):
        dq.solve(model, chain, x_T, process_group=ShardConfig())


# -- the worker -----------------------------------------------------------------------------

def _threshold_margin(residuals, tol: float) -> float:
    """The smallest relative distance of a finite residual from a decision threshold of
    the freeze and stop rules (tol and tol * FREEZE_RATIO)."""
    import torch
    from deqir_fast.solvers import FREEZE_RATIO
    r = residuals[torch.isfinite(residuals)]
    return min(float(((r - thr).abs() / thr).min()) if r.numel() else float("inf")
               for thr in (tol, tol * FREEZE_RATIO))


def _problem(kind, op, S, seed):
    import torch
    import deqir_fast as dq
    from conftest import make_problem
    sched = dq.Schedule.linear(1000, beta_start=1e-4, beta_end=0.02)
    return make_problem(sched, kind, op, S, 2, 0.1 if kind == "ddrm" else 0.0,
                        seed=S + (seed or 0))


_KEEP = []          # results a "plain" worker keeps until the interpreter exits


def _worker(rank, world, port, mode, out):
    import datetime
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    import deqir_fast as dq
    from deqir_fast.distributed import ShardConfig, ShardError
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        if mode.startswith("parity"):
            from conftest import register_half_damped, register_heavy_ball
            register_heavy_ball()
            register_half_damped()
            rows = []
            cases = [CASES[i] for i in CASES_BY_WORLD.get(world, range(len(CASES)))]
            for kind, op, S, window, lin, reb, *max_iter in cases:
                for solver in SOLVERS:
                    model, chain, x_T = _problem(kind, op, S, None)
                    kw = dict(solver=solver, linearize=lin, tol=1e-9, window=window,
                              max_iter=max_iter[0] if max_iter else None)
                    ref = dq.solve(model, chain, x_T, generator=torch.Generator().manual_seed(3),
                                   **kw)
                    res = dq.solve(model, chain, x_T, generator=torch.Generator().manual_seed(3),
                                   process_group=ShardConfig(rebalance=reb, timeout=30), **kw)
                    scale = ref.states.abs().max().item()
                    allx = [torch.empty_like(res.states) for _ in range(world)]
                    dist.all_gather(allx, res.states.contiguous())
                    rr, rs = ref.residuals, res.residuals
                    rows.append(dict(
                        case=[kind, op, S, window, lin, reb, solver],
                        iters=res.iterations, iters_ref=ref.iterations, nfe=res.nfe,
                        nfe_ref=ref.nfe, converged=res.converged, converged_ref=ref.converged,
                        states_err=(res.states - ref.states).abs().max().item() / scale,
                        x0_err=(res.x0 - ref.x0).abs().max().item() / scale,
                        same_on_ranks=all(torch.equal(x, res.states) for x in allx),
                        residuals_equal=bool(rr.shape == rs.shape and torch.equal(rr.isnan(), rs.isnan())
                                             and torch.allclose(rr.nan_to_num(), rs.nan_to_num(),
                                                                rtol=1e-6, atol=1e-12)),
                        rebalances=res.stats.sharding.rebalances,
                        # the per-round accounting covers the rounds, not the final gather
                        rounds_marked=len(res.stats.sharding.round_bytes),
                        bytes_outside_rounds=res.stats.sharding.bytes_sent
                        - sum(res.stats.sharding.round_bytes),
                        replicate_bytes=res.states.numel() * 8 * (world - 1) // world,
                        margin=_threshold_margin(torch.cat([rr.flatten(), rs.flatten()]),
                                                 kw["tol"])))
            # the implicit-gradient backward (grad="ift"), sharded the same way
            # dq.backward(res, ...) of a sharded solve shards its adjoint as well
            import deqir_fast.distributed as dd
            real_adjoint, sharded_calls = dd.sharded_param_grads, []

            def counting_adjoint(*a, **k):
                sharded_calls.append(1)
                return real_adjoint(*a, **k)
            dd.sharded_param_grads = counting_adjoint
            for kind, op, solver, window in GRAD_CASES:
                model, chain, x_T = _problem(kind, op, 11, None)
                got = []
                for pg in (None, ShardConfig(timeout=30)):
                    x = x_T.clone().requires_grad_(True)
                    model.means.grad = None
                    res = dq.solve(model, chain, x, generator=torch.Generator().manual_seed(3),
                                   solver=solver, tol=1e-9, window=window,
                                   options=dq.SolveOptions(grad_tol=1e-9),
                                   process_group=pg)
                    w = torch.linspace(-1, 1, res.x0.numel(), dtype=res.x0.dtype).view_as(res.x0)
                    (res.x0 * w).sum().backward()
                    before = len(sharded_calls)
                    bw = dq.backward(res, w)
                    got.append((x.grad.clone(), model.means.grad.clone(), bw["x_T"],
                                len(sharded_calls) - before))
                (gx, gp, bx, _), (sx, sp, sbx, sharded) = got
                rows.append(dict(case=["grad", kind, op, solver, window],
                                 x_T_err=((sx - gx).abs().max() / gx.abs().max()).item(),
                                 param_err=((sp - gp).abs().max() / gp.abs().max()).item(),
                                 backward_err=((sbx - bx).abs().max() / bx.abs().max()).item(),
                                 backward_sharded=sharded))
            dd.sharded_param_grads = real_adjoint
            # bad input: a device the backend cannot move, options a sharded solve lacks
            from deqir_fast.distributed import check_device
            model, chain, x_T = _problem("ddim", None, 5, None)
            checks = {}
            for name, call in (
                    ("device", lambda: check_device(dist.group.WORLD, torch.device("meta"))),
                    ("check_every", lambda: dq.solve(model, chain, x_T,
                                                     options=dq.SolveOptions(check_every=2),
                                                     process_group=dist.group.WORLD)),
                    ("group type", lambda: dq.solve(model, chain, x_T, process_group="gloo"))):
                try:
                    call()
                    checks[name] = "no error"
                except (ValueError, TypeError) as e:
                    checks[name] = f"{type(e).__name__}: {e}"
            # the window acceptance of a sharded solve: steps_to_freeze is told whether the
            # window ends the chain (a non-final window is accepted only at the freeze
            # level); a spy on the function the solver loop calls records what it passes
            import deqir_fast.solvers.loop as L
            real_freeze, seen = L.steps_to_freeze, []

            def spy(r, tol, freeze_ratio, last=True):
                seen.append(last)
                return real_freeze(r, tol, freeze_ratio, last)
            L.steps_to_freeze = spy
            try:
                res = dq.solve(model, chain, x_T, window=3, tol=1e-9, process_group=dist.group.WORLD,
                               generator=torch.Generator().manual_seed(3))
            finally:
                L.steps_to_freeze = real_freeze
            checks["window accept"] = dict(last=seen, rounds=res.iterations, S=chain.num_steps)
            # the serial shadow (docs/design.md §3d), sharded: DDNM with eta 0 on the mixture
            # prior amplifies its frozen residuals; the shadow's restart gives the serial states
            model, chain, x_T = dq.testing.readme_problem("DDNM", 0, eta=0.0)
            serial = dq.sample_serial(model, chain, x_T, return_states=True)
            checks["shadow"] = []
            # (window, linearize, tol): with J = 0 the shadow's step is the window's carry
            # every round (test_solvers.test_the_shadow_checks_the_state_a_sliding_window_carries)
            for window, lin, tol in ((None, "secant", 1e-2), (20, "secant", 1e-2), (7, "none", 1e-3)):
                kw = dict(window=window, linearize=lin, tol=tol)
                res = dq.solve(model, chain, x_T, process_group=ShardConfig(timeout=30), **kw)
                bad = res.stats.serial_mismatch
                checks["shadow"].append(dict(
                    window=window, linearize=lin, mismatch=bad, converged=res.converged,
                    rounds=res.iterations, S=chain.num_steps, equal=torch.equal(res.states, serial),
                    checked=res.stats.shadow_checked,
                    # the steps frozen before the round that reached them (NaN in its row),
                    # up to the restart (as test_solvers checks for the single process)
                    frozen_before=[p for p in range(min(bad + 1, res.iterations))
                                   if bool(torch.isnan(res.residuals[p, p]))]
                    if bad is not None else None))
            rows.append(dict(case=["checks"], checks=checks))
            if rank == 0:
                json.dump(rows, open(out, "w"))
        if mode.endswith("raise"):
            # an error in the parameter-gradient VJPs (after the adjoint solve) on rank 1
            import deqir_fast.gradients as G
            real_vjp = G.AdjointSystem._vjp

            def vjp(self, k0, k1, cot, params=()):
                if rank == 1 and params:
                    raise RuntimeError("boom in parameter VJP")
                return real_vjp(self, k0, k1, cot, params)
            G.AdjointSystem._vjp = vjp
            model, chain, x_T = _problem("ddrm", "inpainting", 7, None)
            assert model.means.requires_grad          # so the backward has parameter VJPs
            res = dq.solve(model, chain, x_T.clone().requires_grad_(True),
                           generator=torch.Generator().manual_seed(3),
                           process_group=ShardConfig(timeout=20))
            t0 = time.perf_counter()
            try:
                res.x0.sum().backward()
                print("ADJ no error", file=sys.stderr)
            except ShardError as e:
                print(f"ADJ ShardError: {e}\nADJ after {time.perf_counter() - t0:.3f} s",
                      file=sys.stderr)
            G.AdjointSystem._vjp = real_vjp
            model, chain, x_T = _problem("ddim", None, 11, None)

            def bad(x, t):
                if rank == 1 and int(t.min()) < 500:
                    raise RuntimeError(f"boom at step t={int(t.min())}")
                return model(x, t)
            t0 = time.perf_counter()
            try:
                dq.solve(bad, chain, x_T, process_group=ShardConfig(timeout=20), tol=1e-9,
                         init="x_T")
            except ShardError as e:
                print(f"ShardError: {e}\nafter {time.perf_counter() - t0:.3f} s", file=sys.stderr)
                sys.stderr.flush()
                os._exit(3)          # skip the teardown of a group whose solve was aborted
        elif mode == "order2":
            from deqir_fast.chains import DPMSolverPP
            from deqir_fast.schedules import schedule_from_sigmas
            sig = torch.cat([torch.linspace(14.0, 0.05, 17, dtype=torch.float64),
                             torch.zeros(1, dtype=torch.float64)])
            sched, ts, final_alpha = schedule_from_sigmas(sig)
            chain = DPMSolverPP(sched, ts, final_alpha=final_alpha)
            model = dq.testing.GaussianMixtureDenoiser(sched, (3, 8, 8), dtype=torch.float64)
            x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1),
                              dtype=torch.float64)
            serial = dq.sample_serial(model, chain, x_T)
            rows = []
            for solver in SOLVERS[:3]:
                # (window 7 without rebalancing leaves a one-step block at the back, whose
                # entering steps start from the state two back: sent by its holder)
                for window, lin, reb in ((None, "secant", True), (5, "secant", True),
                                         (3, "none", False), (7, "secant", False)):
                    kw = dict(solver=solver, linearize=lin, tol=1e-9, window=window)
                    ref = dq.solve(model, chain, x_T, **kw)
                    res = dq.solve(model, chain, x_T, **kw,
                                   process_group=ShardConfig(rebalance=reb, timeout=30))
                    allx = [torch.empty_like(res.states) for _ in range(world)]
                    dist.all_gather(allx, res.states.contiguous())
                    rows.append(dict(
                        case=["solve", solver, window, lin, reb], iters=res.iterations,
                        iters_ref=ref.iterations, nfe=res.nfe, nfe_ref=ref.nfe,
                        converged=res.converged, converged_ref=ref.converged,
                        states_err=(res.states - ref.states).abs().max().item(),
                        serial_err=(res.x0 - serial).abs().max().item(),
                        same_on_ranks=all(torch.equal(x, res.states) for x in allx),
                        margin=_threshold_margin(torch.cat([ref.residuals.flatten(),
                                                            res.residuals.flatten()]), kw["tol"]),
                        residuals_equal=bool(
                            ref.residuals.shape == res.residuals.shape
                            and torch.equal(ref.residuals.isnan(), res.residuals.isnan())
                            and torch.allclose(ref.residuals.nan_to_num(), res.residuals.nan_to_num(),
                                               rtol=1e-6, atol=1e-12))))
            x = x_T.clone().requires_grad_(True)
            res = dq.solve(model, chain, x, tol=1e-9, options=dq.SolveOptions(grad_tol=1e-9),
                           process_group=ShardConfig(timeout=30))
            w = torch.linspace(-1, 1, res.x0.numel(), dtype=res.x0.dtype).view_as(res.x0)
            (res.x0 * w).sum().backward()
            xs = x_T.clone().requires_grad_(True)
            (dq.sample_serial(model, chain, xs) * w).sum().backward()
            rows.append(dict(case=["grad"], x_T_err=((x.grad - xs.grad).abs().max()
                                                     / xs.grad.abs().max()).item()))
            # a planted fault (two freezes a round in the first three rounds) that the
            # shadow finds; before the restart the state before the bad one is moved by
            # 1e-7, as a frozen state within tol but not exact: the restart must put the
            # shadow's own in its place
            import deqir_fast.solvers.loop as L
            from deqir_fast.distributed import ShardedEngine
            real_freeze, calls = L.steps_to_freeze, []
            real_put = ShardedEngine.put_serial

            def early(r, tol, ratio, last=True):
                calls.append(1)
                return max(real_freeze(r, tol, ratio, last), min(2, r.numel()) if len(calls) <= 3 else 0)

            def put_serial(self, loop, p, q=None):
                if p > 0:
                    loop.X[p - 1] += 1e-7
                return real_put(self, loop, p, q)
            L.steps_to_freeze, ShardedEngine.put_serial = early, put_serial
            try:
                res = dq.solve(model, chain, x_T, tol=1e-9, window=5, linearize="none",
                               process_group=ShardConfig(timeout=30))
            finally:
                L.steps_to_freeze, ShardedEngine.put_serial = real_freeze, real_put
            rows.append(dict(case=["restart"], mismatch=res.stats.serial_mismatch,
                             converged=res.converged,
                             serial_err=(res.x0 - serial).abs().max().item()))
            if rank == 0:
                json.dump(rows, open(out, "w"))
        elif mode == "noise":
            # each rank draws its own noise (generator seeded by rank): refused on every rank
            try:
                dq.solve(*_problem("ddim_eta", None, 5, None),
                         generator=torch.Generator().manual_seed(100 + rank),
                         process_group=ShardConfig(timeout=20))
                print("NOISE no error", file=sys.stderr)
            except ValueError as e:
                print(f"NOISE ValueError: {e}", file=sys.stderr)
            sys.stderr.flush()
            os._exit(0)          # skip the group's teardown after an aborted solve
        elif mode == "stuck":
            model, chain, x_T = _problem("ddim", None, 7, None)

            def slow(x, t):
                if rank == 1:
                    time.sleep(3)
                return model(x, t)
            try:
                dq.solve(slow, chain, x_T, process_group=ShardConfig(timeout=1.5), tol=1e-9,
                         init="x_T")
            except ShardError as e:
                print(f"ShardError: {e}", file=sys.stderr)
                if rank == 0:
                    os._exit(4)          # the group is unusable after a timeout
                sys.exit(4)
            if rank == 1:
                os._exit(0)
        elif mode == "planner":
            # window="auto" sharded: every rank must take the same decisions (the round
            # times are the slowest rank's, agreed in the residual gather; the cached curve
            # and advances are rank 0's). Sleeps make the cost curves: a flat one (windows)
            # and a steep one (the serial sampler, run on every rank)
            rows = []
            # "mixed": rank 0 sees a flat curve and rank 1 a steep one; priced at the
            # slowest rank's time both see the same curve (with its own clock each rank
            # would choose differently and the ranks would part ways)
            mixed = (lambda n: 0.03) if rank == 0 else (lambda n: 0.01 * n)
            for name, cost in (("flat", lambda n: 0.03), ("steep", lambda n: 0.01 * n),
                               ("mixed", mixed)):
                for kind, op in (("ddim", None), ("ddrm", "inpainting")):
                    model, chain, x_T = _problem(kind, op, 11, None)

                    def slept(x, t, model=model, cost=cost):
                        time.sleep(cost(x.shape[0]))
                        return model(x, t)
                    serial = dq.sample_serial(model, chain, x_T, return_states=True,
                                              generator=torch.Generator().manual_seed(3))
                    # a rank's own clock may differ (here rank 1's runs 10x fast in
                    # the mixed case): the rounds are priced at the agreed time anyway
                    skew = 10.0 if (name == "mixed" and rank == 1) else 1.0
                    for rep in range(2):       # the second starts from the cached curve
                        planner = dq.Planner(clock=lambda skew=skew: skew * time.perf_counter())
                        res = dq.solve(slept, chain, x_T, window=planner,
                                       generator=torch.Generator().manual_seed(3),
                                       process_group=ShardConfig(timeout=30))
                        plan = res.stats.plan
                        mine = [plan.windows, plan.serial_from, res.iterations]
                        every = [None] * world
                        dist.all_gather_object(every, mine)
                        rows.append(dict(
                            case=[name, kind, rep], windows=plan.windows,
                            serial_from=plan.serial_from, converged=res.converged,
                            iterations=res.iterations, S=chain.num_steps,
                            same_decisions=all(e == every[0] for e in every),
                            err=(res.states - serial).abs().max().item()))
            if rank == 0:
                with open(out, "w") as f:
                    json.dump(rows, f)
        elif mode == "plain":
            # what a user writes: solve, keep the result, destroy the group, exit. A result
            # that held the group kept its gloo workers alive into interpreter shutdown,
            # where one still releasing a collective's tensors aborted the rank (issue #22)
            import gc
            import weakref
            model, chain, x_T = _problem("ddrm", "inpainting", 11, None)
            res = dq.solve(model, chain, x_T, window=5, generator=torch.Generator().manual_seed(3),
                           process_group=ShardConfig(timeout=30))
            _KEEP.append(res)                   # the result outlives the group, as in a script
            gc.disable()                        # what holds the group must not be garbage either
            group = weakref.ref(dist.group.WORLD)
            dist.destroy_process_group()
            held = group() is not None
            gc.enable()
            print(f"PLAIN group held after destroy: {held}", file=sys.stderr)
            try:
                dq.backward(res, torch.ones_like(res.x0))
                print("PLAIN backward after destroy: no error", file=sys.stderr)
            except ValueError as e:
                print(f"PLAIN backward after destroy: ValueError: {e}", file=sys.stderr)
            sys.stderr.flush()
            return                              # a normal exit: interpreter shutdown
    finally:
        if dist.is_initialized() and mode in ("parity", "planner", "order2"):
            dist.destroy_process_group()        # no barrier: solve leaves nothing in flight


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    sys.path.insert(0, HERE)
    _worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6])
