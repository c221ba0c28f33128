"""Step sharding across processes (issue #14): bytes per round, round time and scaling
with 1, 2 and 4 CPU processes, and idle time per rank with and without rebalancing.

    python bench/sharding.py [--quick] [--out FILE.md]

Starts its ranks as subprocesses (gloo, a free local port; OMP_NUM_THREADS=1 each) and
prints a markdown report (also written to --out). Models whose cost dominates:

- ``sleep``: the Gaussian-mixture denoiser (exact, so the solve converges as on real
  problems) plus a sleep of --sleep-ms per image: the rank waits as it would on its own
  accelerator, so the scaling is not capped by this machine's CPU cores;
- ``unet``: a randomly initialised diffusers UNet2DModel (32x32, ~0.65 M parameters),
  CPU-bound: with more processes than free cores it cannot scale, and the report says
  how many cores there were.

Idle time = the time a rank spends blocked in the round's collectives (waiting for the
slowest block, plus the transfers themselves), from ``res.stats.sharding``.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, args) -> list:
    """Run the job list on ``world`` ranks; returns each rank's list of job results."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        outs = [os.path.join(tmp, f"r{r}.json") for r in range(world)]
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(r), str(world),
                                   str(port), outs[r], json.dumps(vars(args))], env=env, cwd=ROOT)
                 for r in range(world)]
        deadline = time.time() + args.timeout
        for p in procs:
            try:
                p.wait(timeout=max(1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                raise SystemExit(f"world {world}: timed out after {args.timeout} s")
            if p.returncode != 0:
                for q in procs:
                    q.kill()
                raise SystemExit(f"world {world}: a rank exited with {p.returncode}")
        return [json.load(open(o)) for o in outs]


# -- the worker --------------------------------------------------------------------------

def _models(opts):
    import torch
    import deqir_fast as dq

    def sleep_problem(steps):
        model, chain, x_T = dq.testing.readme_problem("DDIM", 0)
        chain = dq.DDIM(chain.schedule, dq.timesteps(chain.schedule, steps), eta=0.5)
        per = opts["sleep_ms"] / 1e3

        def slow(x, t):
            time.sleep(per * x.shape[0])
            return model(x, t)
        return slow, chain, x_T

    def unet_problem(steps):
        from diffusers import UNet2DModel
        torch.manual_seed(0)
        net = UNet2DModel(sample_size=32, in_channels=3, out_channels=3,
                          block_out_channels=(32, 64), layers_per_block=1,
                          down_block_types=("DownBlock2D", "DownBlock2D"),
                          up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8).eval()
        sched = dq.Schedule.linear(1000)
        chain = dq.DDIM(sched, dq.timesteps(sched, steps))
        return net, chain, torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return sleep_problem, unet_problem


def _run(job, world, opts):
    import torch
    import deqir_fast as dq
    from deqir_fast.distributed import ShardConfig
    sleep_problem, unet_problem = _models(opts)
    model, chain, x_T = (sleep_problem if job["model"] == "sleep" else unet_problem)(job["S"])
    kw = dict(solver=job.get("solver", "picard"), window=job.get("window"), init="x_T",
              generator=torch.Generator().manual_seed(1))
    if job.get("fixed_rounds"):
        kw.update(tol=0.0, max_iter=job["fixed_rounds"])
    pg = None if job.get("plain") else ShardConfig(rebalance=job.get("rebalance", True), timeout=300)
    with torch.no_grad():
        t0 = time.perf_counter()
        res = dq.solve(model, chain, x_T, process_group=pg, **kw)
        wall = time.perf_counter() - t0
    out = dict(job=job, world=world, rounds=res.iterations, wall=wall, nfe=res.nfe,
               state_bytes=x_T.numel() * x_T.element_size())
    sh = getattr(res.stats, "sharding", None)
    if sh is not None:
        out.update(compute=sh.compute_seconds, wait=sh.wait_seconds, bytes=sh.bytes_sent,
                   round_bytes=sh.round_bytes, round_wait=sh.round_wait,
                   round_compute=sh.round_compute, gather_bytes=sh.bytes_window_gather,
                   blocks=sh.blocks, rebalances=sh.rebalances, migrated=sh.migrated_steps)
    return out


def jobs_for(world, opts):
    q = opts["quick"]
    S_time = 32 if q else 64
    jobs = [dict(name="round time (sleep)", model="sleep", S=S_time, fixed_rounds=4),
            dict(name="round time (unet)", model="unet", S=16 if q else 32, fixed_rounds=3)]
    if world == 1:
        jobs += [dict(name="round time (sleep)", model="sleep", S=S_time, fixed_rounds=4, plain=True),
                 dict(name="round time (unet)", model="unet", S=16 if q else 32, fixed_rounds=3,
                      plain=True)]
    else:
        for window in (None, 32):
            for reb in (True, False):
                jobs.append(dict(name="idle", model="sleep", S=100, window=window, rebalance=reb))
        jobs.append(dict(name="bytes (triangular)", model="sleep", S=100, window=None,
                         solver="triangular_anderson"))
    return jobs


def _worker(rank, world, port, out, opts):
    import datetime
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    results = []
    for job in jobs_for(world, opts):
        dist.barrier()
        results.append(_run(job, world, opts))
    json.dump(results, open(out, "w"))
    dist.destroy_process_group()


# -- the report ----------------------------------------------------------------------------

def report(by_world, args, seconds) -> str:
    import statistics
    busy = "CONTENDED: other jobs were running" if args.load > 1.5 else "idle"
    lines = ["# Step sharding (bench/sharding.py)", "",
             f"Command: `{args.command}`", "",
             f"Machine: {os.cpu_count()} CPU cores, gloo over loopback, OMP_NUM_THREADS=1 per "
             f"rank; load average at start {args.load:.1f} ({busy}); sleep model "
             f"{args.sleep_ms} ms per image; whole run {seconds:.0f} s.", ""]

    def round_time(r):
        if "round_wait" in r:      # the loop's rounds only (no set-up / final gather)
            return (sum(r["round_wait"]) + sum(r["round_compute"])) / r["rounds"]
        return r["wall"] / r["rounds"]

    for model in ("sleep", "unet"):
        lines += [f"## Round time, {model} model (Picard, fixed rounds, no window)", "",
                  "| processes | S | rounds | s / round (rank max) | speed-up | efficiency |",
                  "|---|---|---|---|---|---|"]
        base = None
        for world in sorted(by_world):
            ranks = by_world[world]
            for plain in ((True, False) if world == 1 else (False,)):
                rs = [next(j for j in rk if j["job"]["name"] == f"round time ({model})"
                           and bool(j["job"].get("plain")) == plain) for rk in ranks]
                t = max(round_time(r) for r in rs)
                if plain:
                    base = t
                label = "1 (plain solve)" if plain else str(world)
                sp = base / t
                lines.append(f"| {label} | {rs[0]['job']['S']} | {rs[0]['rounds']} | {t:.4f} | "
                             f"{sp:.2f} | {sp / world:.0%} |")
        lines.append("")
    lines += ["## Idle time per rank, with and without rebalancing (sleep model, DDIM-100, "
              "default tol, Picard)", "",
              "Idle = time blocked in the round's collectives; loop = the rounds' wall time.", "",
              "| processes | window | rebalance | rounds | loop s | idle s per rank | idle share "
              "| rebalances | steps migrated |",
              "|---|---|---|---|---|---|---|---|---|"]
    for world in sorted(w for w in by_world if w > 1):
        for window in (None, 32):
            for reb in (True, False):
                rs = [next(j for j in rk if j["job"]["name"] == "idle" and j["job"]["window"] == window
                           and j["job"]["rebalance"] == reb) for rk in by_world[world]]
                loop = max(sum(r["round_wait"]) + sum(r["round_compute"]) for r in rs)
                idle = [sum(r["round_wait"]) for r in rs]
                lines.append(f"| {world} | {window or 'all'} | {'yes' if reb else 'no (static split)'} | "
                             f"{rs[0]['rounds']} | {loop:.2f} | {' / '.join(f'{x:.2f}' for x in idle)} | "
                             f"{sum(idle) / (loop * world):.0%} | {rs[0]['rebalances']} | "
                             f"{sum(r['migrated'] for r in rs)} |")
    lines += ["", "## Bytes sent per rank per round (mean over rounds, float32 state "
              "3x32x32, batch 1 = 12 KiB)", "",
              "Sharded: the carry scan (2 states per rank, all-gathered), the halo (1 state), the "
              "residual row and status (S floats), triangular Anderson's [B, m, m] Gram prefix, "
              "and the steps that change rank when rebalancing. Whole window: the rank's block "
              "of states sent to every other rank each round (what replicating X would cost).", "",
              "| processes | job | sharded bytes / rank / round (max rank) | whole-window gather | ratio |",
              "|---|---|---|---|---|"]
    for world in sorted(w for w in by_world if w > 1):
        for name, pick in (("Picard, no window, rebalance", lambda j: j["job"]["name"] == "idle"
                            and j["job"]["window"] is None and j["job"]["rebalance"]),
                           ("Picard, no window, static split", lambda j: j["job"]["name"] == "idle"
                            and j["job"]["window"] is None and not j["job"]["rebalance"]),
                           ("Picard, window 32, rebalance", lambda j: j["job"]["name"] == "idle"
                            and j["job"]["window"] == 32 and j["job"]["rebalance"]),
                           ("triangular Anderson, no window",
                            lambda j: j["job"]["name"] == "bytes (triangular)")):
            rs = [next(j for j in rk if pick(j)) for rk in by_world[world]]
            sharded = max(statistics.mean(r["round_bytes"]) for r in rs)
            gather = max(r["gather_bytes"] / r["rounds"] for r in rs)
            lines.append(f"| {world} | {name} | {sharded / 1024:.1f} KiB | {gather / 1024:.1f} KiB | "
                         f"{gather / sharded:.1f}x |")
    lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller S for the round-time jobs")
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--sleep-ms", type=float, default=4.0)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.command = "python " + " ".join(sys.argv)
    args.load = os.getloadavg()[0]
    t0 = time.perf_counter()
    by_world = {int(w): launch(int(w), args) for w in args.worlds.split(",")}
    text = report(by_world, args, time.perf_counter() - t0)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5],
                json.loads(sys.argv[6]))
    else:
        main()
