"""Fingerprints of solves: rounds, nfe and a hash of every state's bits, to show that a
refactor moves no result (issue #23: "results do not move ... bit for bit").

    OMP_NUM_THREADS=1 python bench/fingerprint.py --out before.json          # on the old tree
    OMP_NUM_THREADS=1 python bench/fingerprint.py --out after.json
    python bench/fingerprint.py --compare before.json after.json             # the table

    DEQIR_FAST_BACKEND=torch ... / DEQIR_FAST_BACKEND=native ...             # per backend
    PYTHONPATH=/path/to/old/checkout python bench/fingerprint.py ...          # another tree

The grid: every calibration chain at S = 100 on the bundled model with the default solve
(what ``bench/bundled_rounds.py --steps 100`` runs), the three solvers, windows,
``check_every``, the four linearisations, the serial shadow's restart on the README's
DDNM η = 0 problem, and a 2-rank sharded launch (gloo) of a few of them. A case is the
same solve on both sides when its rounds, nfe, converged flag, shadow mismatch and the
SHA-256 of its states' bytes agree. It runs on the old API (expert options as keywords
of ``solve``) and the new one (``options=dq.SolveOptions(...)``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import time

import torch

EXPERT = ("check_every", "serial_shadow", "freeze_ratio", "floor", "history",
          "anderson_reg", "anderson_damping", "history_dtype", "cuda_graph", "allow_tf32")


def call_solve(dq, model, chain, x_T, **kw):
    """dq.solve with expert options as keywords (old API) or in SolveOptions (new)."""
    expert = {k: kw.pop(k) for k in list(kw) if k in EXPERT}
    if expert and hasattr(dq, "SolveOptions"):
        kw["options"] = dq.SolveOptions(**expert)
    else:
        kw.update(expert)
    return dq.solve(model, chain, x_T, **kw)


def digest(res) -> dict:
    states = res.states.detach().contiguous().cpu()
    return dict(rounds=res.iterations, nfe=res.nfe, converged=bool(res.converged),
                mismatch=res.stats.serial_mismatch,
                states_sha=hashlib.sha256(states.numpy().tobytes()).hexdigest()[:16])


def bundled_cases():
    """(name, model, chain, x_T, solve kwargs) on the bundled model, S = 100."""
    from deqir_fast.calibration import chains, load
    model, schedule, images = load("bundled")
    truth = images[:1].float()
    x_T = torch.randn(truth.shape, generator=torch.Generator().manual_seed(100))
    by_name = dict(chains(schedule, 100, truth))
    for name, chain in by_name.items():                     # bundled_rounds --steps 100
        yield f"bundled {name} default", model, chain, x_T, {}
    extra = [("DDIM-eta0.5", dict(solver="anderson")),
             ("DDRM-inp", dict(solver="triangular_anderson")),
             ("DDNM-sr2", dict(solver="anderson", history=3)),
             ("DDIM", dict(window=20)),
             ("DDRM-inp", dict(window=20, solver="anderson")),
             ("DDNM-inp", dict(check_every=3)),
             ("DDPM", dict(check_every=4, window=25)),
             ("DDRM-sr2", dict(linearize="none")),
             ("DDNM+-sr2", dict(linearize="gaussian")),
             ("DDRM-deblur", dict(linearize="paradigms")),
             ("DDIM", dict(serial_shadow=False, freeze_ratio=0.1)),
             ("DDRM-inp", dict(history_dtype=torch.bfloat16, solver="anderson"))]
    for name, kw in extra:
        label = ",".join(f"{k}={v}" for k, v in kw.items())
        yield f"bundled {name} {label}", model, by_name[name], x_T, kw


def readme_cases():
    import deqir_fast as dq
    for kind, seed, kw in (("DDNM", 0, dict(eta=0.0)), ("DDNM", 1, dict(eta=0.0)),
                           ("DDRM", 2, {}), ("DDIM", 3, {})):
        model, chain, x_T = dq.testing.readme_problem(kind, seed, **kw)
        for solve_kw in ({}, dict(check_every=3), dict(window=20), dict(check_every=4, window=10),
                         dict(linearize="none", tol=1e-3, window=7)):
            label = ",".join(f"{k}={v}" for k, v in solve_kw.items()) or "default"
            yield f"readme {kind} seed {seed} {label}", model, chain, x_T, solve_kw


SHARDED = [("DDRM", 2, {}), ("DDNM", 0, dict(eta=0.0)), ("DDIM", 3, {})]
SHARDED_KW = [dict(), dict(solver="anderson"), dict(solver="triangular_anderson", window=20),
              dict(window=20)]


def sharded_rank(rank: int, port: int, out: str):
    import datetime
    import torch.distributed as dist
    import deqir_fast as dq
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=datetime.timedelta(seconds=120))
    rows = {}
    for kind, seed, kw in SHARDED:
        model, chain, x_T = dq.testing.readme_problem(kind, seed, **kw)
        for solve_kw in SHARDED_KW:
            label = ",".join(f"{k}={v}" for k, v in solve_kw.items()) or "default"
            res = call_solve(dq, model, chain, x_T, process_group=dist.group.WORLD, **solve_kw)
            rows[f"sharded2 {kind} seed {seed} {label}"] = digest(res)
    if rank == 0:
        json.dump(rows, open(out, "w"))
    dist.destroy_process_group()


def run_sharded() -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = f"/tmp/fingerprint_sharded_{os.getpid()}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--rank", str(r),
                               "--port", str(port), "--out", out], env=env) for r in range(2)]
    codes = [p.wait(timeout=1800) for p in procs]
    if any(codes):
        raise SystemExit(f"sharded ranks failed: {codes}")
    return json.load(open(out))


def run(args) -> dict:
    import deqir_fast as dq
    rows = {}
    groups = [g for g in args.groups.split(",") if g]
    sources = {"bundled": bundled_cases, "readme": readme_cases}
    for group in groups:
        if group == "sharded":
            rows.update(run_sharded())
            continue
        for name, model, chain, x_T, kw in sources[group]():
            t0 = time.perf_counter()
            res = call_solve(dq, model, chain, x_T, generator=torch.Generator().manual_seed(0), **kw)
            rows[name] = digest(res)
            print(f"{name}: {rows[name]} ({time.perf_counter() - t0:.1f} s)", flush=True)
    rows["_meta"] = dict(backend=os.environ.get("DEQIR_FAST_BACKEND", "auto"),
                         deqir_fast=os.path.dirname(dq.__file__), torch=torch.__version__)
    return rows


def compare(a_path: str, b_path: str) -> int:
    a, b = json.load(open(a_path)), json.load(open(b_path))
    print(f"| case | rounds | nfe | converged | mismatch | states (sha256) |\n|---|---|---|---|---|---|")
    moved = 0
    for name in [k for k in a if not k.startswith("_")]:
        x, y = a[name], b.get(name)
        if y is None:
            print(f"| {name} | missing in {b_path} |||||")
            moved += 1
            continue
        same = x == y
        moved += not same
        cell = lambda k: str(x[k]) if x[k] == y[k] else f"**{x[k]} → {y[k]}**"  # noqa: E731
        print(f"| {name} | {cell('rounds')} | {cell('nfe')} | {cell('converged')} | "
              f"{cell('mismatch')} | {'same' if x['states_sha'] == y['states_sha'] else '**differ**'} |")
    print(f"\n{len([k for k in a if not k.startswith('_')]) - moved} of "
          f"{len([k for k in a if not k.startswith('_')])} cases identical "
          f"({a.get('_meta', {}).get('backend')} vs {b.get('_meta', {}).get('backend')})")
    return 1 if moved else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="write the fingerprints to this JSON file")
    ap.add_argument("--groups", default="bundled,readme,sharded")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"))
    ap.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.compare:
        return compare(*args.compare)
    torch.set_num_threads(1)
    if args.rank is not None:
        sharded_rank(args.rank, args.port, args.out)
        return 0
    rows = run(args)
    if args.out:
        json.dump(rows, open(args.out, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
