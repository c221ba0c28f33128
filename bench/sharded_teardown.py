"""Launch the plain sharded pattern many times and count the ranks that abort at exit.

    OMP_NUM_THREADS=1 python bench/sharded_teardown.py --launches 30
    OMP_NUM_THREADS=1 python bench/sharded_teardown.py --launches 30 --source /tmp/old-checkout

Every rank does what a user writes, with no barrier: ``res = dq.solve(...,
process_group=...)`` (six solves: each solver, whole chain and a window),
``torch.distributed.destroy_process_group()``, then exits with the results still alive;
rank 0 does a little more work first, as a script's rank 0 does. The ranks are separate
python processes, as torchrun starts them (``--launcher spawn``:
``torch.multiprocessing.start_processes``). Before issue #22's
fix a result held its process group, whose gloo workers outlived the destroy into
interpreter shutdown and aborted a rank there ("terminate called without an active
exception", exit -6). The abort is a race: it needs a worker that is still releasing a
collective's tensors when the interpreter shuts down, so its rate depends on the load of
the machine (bench/RESULTS.md has the numbers). ``--source`` runs another checkout's
package (e.g. one before the fix) for a before/after comparison in one session.
"""
import argparse
import datetime
import os
import socket
import sys
import subprocess
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_KEEP = []          # the results, alive until the interpreter exits (as a script's would be)


def problem(steps: int, size: int):
    """DDRM inpainting (40% of the pixels missing, σ_y 0.1) of a batch of 2 on the
    Gaussian-mixture denoiser, float64 (the test suite's problem): small images make
    fast rounds, so many collectives a second."""
    import deqir_fast as dq
    from deqir_fast import operators as ops
    gen = torch.Generator().manual_seed(0)
    sched = dq.Schedule.linear(1000, beta_start=1e-4, beta_end=0.02)
    shape = (3, size, size)
    model = dq.testing.GaussianMixtureDenoiser(sched, shape, dtype=torch.float64)
    op = ops.Inpainting((torch.rand(shape[1:], generator=gen) > 0.4).double())
    truth = model.means[:1].detach() + 0.1 * torch.randn((2, *shape), generator=gen, dtype=torch.float64)
    y = op.A(truth) + 0.1 * torch.randn(op.A(truth).shape, generator=gen, dtype=torch.float64)
    chain = dq.DDRM(sched, dq.timesteps(sched, steps), operator=op, y=y, sigma_y=0.1, eta=0.85,
                    eta_b=1.0)
    return model, chain, torch.randn((2, *shape), generator=gen, dtype=torch.float64)


def rank_main(rank: int, world: int, port: int, steps: int, size: int, window,
              rank0_seconds: float, tol: float):
    torch.set_num_threads(1)
    import deqir_fast as dq
    from deqir_fast.distributed import ShardConfig
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    model, chain, x_T = problem(steps, size)
    noise = torch.randn((chain.num_steps, *x_T.shape), generator=torch.Generator().manual_seed(1),
                        dtype=x_T.dtype)
    for solver in ("picard", "anderson", "triangular_anderson"):
        for w in (None, window):
            res = dq.solve(model, chain, x_T, noise=noise, window=w, solver=solver, tol=tol,
                           process_group=ShardConfig(timeout=60))
            _KEEP.append(res)
    if rank == 0:
        time.sleep(rank0_seconds)       # rank 0 has more to do (say, write the results)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--launches", type=int, default=30)
    ap.add_argument("--world", type=int, default=2, help="ranks per launch")
    ap.add_argument("--steps", type=int, default=11)
    ap.add_argument("--size", type=int, default=8, help="image height and width")
    ap.add_argument("--window", type=int, default=5, help="each solver runs whole-chain and with it")
    ap.add_argument("--rank0-seconds", type=float, default=0.3,
                    help="rank 0 works this long after its solves, before its destroy")
    ap.add_argument("--tol", type=float, default=1e-9,
                    help="the solves' tol (1e-9, as the tests: every round runs)")
    ap.add_argument("--launcher", choices=("subprocess", "spawn"), default="subprocess",
                    help="ranks as separate python processes (as torchrun starts them) or "
                         "torch.multiprocessing.start_processes(start_method='spawn')")
    ap.add_argument("--source", default=None,
                    help="a checkout whose deqir_fast to run instead of the installed one")
    ap.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)   # internal
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    rank_args = (args.world, args.port, args.steps, args.size, args.window, args.rank0_seconds,
                 args.tol)
    if args.rank is not None:                 # one rank, started by the launcher below
        rank_main(args.rank, *rank_args)
        return 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    if args.source:
        # the ranks start fresh interpreters: PYTHONPATH reaches them, sys.path does not
        env["PYTHONPATH"] = os.path.abspath(args.source) + os.pathsep + env.get("PYTHONPATH", "")
        os.environ["PYTHONPATH"] = env["PYTHONPATH"]
    aborted, failed = 0, 0
    t0 = time.perf_counter()
    for i in range(args.launches):
        port = free_port()
        if args.launcher == "spawn":
            ctx = mp.start_processes(rank_main, args=(args.world, port, *rank_args[2:]),
                                     nprocs=args.world, join=False, start_method="spawn")
            for p in ctx.processes:
                p.join()
            codes = [p.exitcode for p in ctx.processes]
        else:
            cmd = [sys.executable, os.path.abspath(__file__), "--port", str(port),
                   "--world", str(args.world), "--steps", str(args.steps), "--size", str(args.size),
                   "--window", str(args.window), "--rank0-seconds", str(args.rank0_seconds),
                   "--tol", str(args.tol)]
            procs = [subprocess.Popen(cmd + ["--rank", str(r)], env=env, stderr=subprocess.PIPE,
                                      text=True) for r in range(args.world)]
            errs = [p.communicate(timeout=600)[1] for p in procs]
            codes = [p.returncode for p in procs]
            for r, err in enumerate(errs):
                if codes[r] != 0:
                    print(f"  rank {r}: {err.strip().splitlines()[0] if err.strip() else ''}")
        if any(c == -6 for c in codes):
            aborted += 1
        elif any(codes):
            failed += 1
        print(f"launch {i + 1:3d}: exit codes {codes}", flush=True)
    which = args.source or "installed deqir_fast"
    print(f"{which}: {aborted} of {args.launches} launches aborted (SIGABRT), {failed} failed "
          f"otherwise; {args.world} ranks ({args.launcher}), S = {args.steps}, "
          f"{args.size}x{args.size}, 6 solves (3 solvers, window None and {args.window}, tol "
          f"{args.tol:g}), "
          f"rank 0 {args.rank0_seconds:g} s later, {time.perf_counter() - t0:.0f} s")
    return 1 if aborted or failed else 0


if __name__ == "__main__":
    sys.exit(main())
