"""Calibrate the stopping rule: record, round by round, every step's residual and the
error of x0 against the serial sampler, on three models; then replay candidate rules
(tol, floor) on the recorded traces.

    OMP_NUM_THREADS=1 python bench/calibrate.py record --models bundled,photo16,gmm --steps 20,100 --out /tmp/cal.json
    OMP_NUM_THREADS=1 python bench/calibrate.py record --models bundled --steps 1000 --chains DDIM,DDRM-inp,DDNM-sr2 --out /tmp/cal1000.json
    python bench/calibrate.py replay /tmp/cal.json /tmp/cal1000.json

The recording solves with tol = RECORD_TOL (far below any candidate), so one run gives
the whole trajectory; a candidate rule stops at the first round where every step has
residual <= tol * max(σ_i, floor), and returns that round's x0. Freezing follows the
recording tol, so the replay is the real solver up to frozen steps that moved by less
than RECORD_TOL * FREEZE_RATIO noise units. Models: the bundled UNet (digits, linear
betas), photo16 (photo patches, cosine betas; bench/models/), and the exact
Gaussian-mixture denoiser of the README (a sharp multimodal prior).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import deqir_fast as dq
from deqir_fast.api import _prepare, initial_states
# the catalogue (models, chains) lives in the package: `deqir-fast bench` needs it installed
from deqir_fast.calibration import GREY, chains, load_folder
from deqir_fast.calibration import load as load_bundled
from deqir_fast.solvers import SolveOptions, fixed_point_solve

RECORD_TOL = 1e-4
HERE = Path(__file__).resolve().parent
PHOTO16 = HERE / "models" / "photo16"


def load(model_name):
    """(model, schedule, clean images [N, C, H, W]): the package's bundled model, or
    photo16 from this folder's models/ (the source repository's; not installed)."""
    if model_name == "photo16":
        return load_folder(PHOTO16)
    return load_bundled(model_name)


def record(model, chain, x_T, max_iter=None, **solve_kw):
    """One recorded solve from the default initial guess: per round, the residuals the
    stopping rule reads, max|F(X)_i - X_i| per step before the tol · max(σ_i, floor)
    scaling (DDNM's derived range elements weighted, docs/design.md §3b; NaN when frozen;
    stored under "raw"), and max|x0 - serial|."""
    gen = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    with torch.no_grad():
        serial = dq.sample_serial(model, chain, x_T, generator=gen())
        system, _ = _prepare(model, chain, x_T, None, gen())
        X, init_nfe = initial_states(system)
        sigma = chain.noise_levels
        floor = 0.1
        scale = 1.0 / sigma.clamp_min(floor)
        rounds = []

        def callback(info):
            x0 = chain.from_basis(info["state"][-1])
            raw = (info["residuals"] / scale).tolist()
            rounds.append({"raw": [None if math.isnan(v) else v for v in raw],
                           "err": (x0 - serial).abs().max().item()})

        t0 = time.perf_counter()
        # without the serial shadow (docs/design.md §3d): at RECORD_TOL a restart would
        # put its exact-freezing rounds into the traces the replay reads as a plain solve
        _, stats = fixed_point_solve(system, X, tol=RECORD_TOL, max_iter=max_iter,
                                     callback=callback, initial_nfe=init_nfe,
                                     options=SolveOptions(floor=floor, serial_shadow=False),
                                     **solve_kw)
    return {"sigma": sigma.tolist(), "rounds": rounds, "seconds": time.perf_counter() - t0,
            "converged": stats.converged}


def cmd_record(args):
    out = []
    models = args.models.split(",")
    keep = args.chains.split(",") if args.chains else None
    for name in models:
        if name == "gmm":
            for kind in ("DDRM", "DDNM", "DDIM"):
                for seed in range(args.seeds):
                    model, chain, x_T = dq.testing.readme_problem(kind, seed)
                    rec = record(model, chain, x_T, max_iter=args.max_iter)
                    rec.update(model="gmm", chain=f"readme-{kind}", steps=100, seed=seed)
                    out.append(rec)
                print(f"gmm readme-{kind}: {args.seeds} seeds", flush=True)
            continue
        model, schedule, images = load(name)
        for steps in [int(s) for s in args.steps.split(",")]:
            for image in range(args.images):
                truth = images[image:image + 1].float()
                x_T = torch.randn(truth.shape, generator=torch.Generator().manual_seed(100 + image))
                for cname, chain in chains(schedule, steps, truth, seed=image):
                    if keep and cname not in keep:
                        continue
                    rec = record(model, chain, x_T, max_iter=args.max_iter, window=args.window)
                    rec.update(model=name, chain=cname, steps=steps, seed=image)
                    out.append(rec)
                    hind = next((k + 1 for k, r in enumerate(rec["rounds"]) if r["err"] < GREY), None)
                    print(f"{name} {cname} S={steps} image {image}: {len(rec['rounds'])} rounds "
                          f"recorded, within 2/255 from round {hind}, {rec['seconds']:.0f} s", flush=True)
    Path(args.out).write_text(json.dumps(out))


def stop_round(rec, tol, floor):
    """(rounds, error at stop) of the rule residual_i <= tol * max(σ_i, floor) ∀i."""
    lim = [tol * max(s, floor) for s in rec["sigma"]]
    for k, rnd in enumerate(rec["rounds"]):
        if all(v is None or v <= l for v, l in zip(rnd["raw"], lim)):
            return k + 1, rnd["err"]
    return len(rec["rounds"]), rec["rounds"][-1]["err"]


def cmd_replay(args):
    recs = [r for f in args.files for r in json.loads(Path(f).read_text())]
    tols = [float(t) for t in args.tols.split(",")]
    floors = [float(f) for f in args.floors.split(",")]
    print("| floor | tol | problems | over 2/255 | worst error | mean rounds | max rounds over hindsight |")
    print("|---|---|---|---|---|---|---|")
    for floor in floors:
        for tol in tols:
            res = [stop_round(r, tol, floor) for r in recs]
            hind = [next((k + 1 for k, x in enumerate(r["rounds"]) if x["err"] < GREY), len(r["rounds"]))
                    for r in recs]
            over = sum(e >= GREY for _, e in res)
            print(f"| {floor:g} | {tol:g} | {len(res)} | {over} | {max(e for _, e in res):.1e} | "
                  f"{sum(k for k, _ in res) / len(res):.1f} | "
                  f"{max(k - h for (k, _), h in zip(res, hind))} |")
    if args.detail:
        tol, floor = (float(v) for v in args.detail.split(","))
        print(f"\nAt tol {tol:g}, floor {floor:g}:")
        print("| model | chain | S | seeds | rounds (mean / max) | within 2/255 from (hindsight, mean) | worst error |")
        print("|---|---|---|---|---|---|---|")
        groups = {}
        for r in recs:
            groups.setdefault((r["model"], r["chain"], r["steps"]), []).append(r)
        for (m, c, S), rs in groups.items():
            res = [stop_round(r, tol, floor) for r in rs]
            hind = [next((k + 1 for k, x in enumerate(r["rounds"]) if x["err"] < GREY), math.nan)
                    for r in rs]
            print(f"| {m} | {c} | {S} | {len(rs)} | {sum(k for k, _ in res) / len(res):.1f} / "
                  f"{max(k for k, _ in res)} | {sum(hind) / len(hind):.1f} | "
                  f"{max(e for _, e in res):.1e} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("--models", default="bundled,photo16,gmm")
    r.add_argument("--steps", default="20,100")
    r.add_argument("--chains", default="")
    r.add_argument("--images", type=int, default=1)
    r.add_argument("--seeds", type=int, default=50, help="seeds per README problem (gmm)")
    r.add_argument("--max-iter", type=int, default=None)
    r.add_argument("--window", type=int, default=None)
    r.add_argument("--out", required=True)
    q = sub.add_parser("replay")
    q.add_argument("files", nargs="+")
    q.add_argument("--tols", default="0.001,0.003,0.01,0.02,0.03,0.05,0.1")
    q.add_argument("--floors", default="0.03,0.1,0.3")
    q.add_argument("--detail", default="", help="TOL,FLOOR: a per-chain table")
    args = p.parse_args()
    torch.set_num_threads(1)
    cmd_record(args) if args.cmd == "record" else cmd_replay(args)


if __name__ == "__main__":
    main()
