"""The benchmark's runs: on one (chain, S, B) the serial sampler and each peer
configuration of the parallel solve on the same model, chain and noise, in turns, with the
time of one model call; over every configuration of a ``BenchConfig``, the report."""
from __future__ import annotations

import dataclasses
import datetime
import inspect
import math
import statistics
from typing import Callable, List, Optional

import torch

import deqir_fast as dq

from .. import calibration
from ..api import solve
from ..peers import PLANNED, peer
from ..solvers import Planner
from ..telemetry import GPU_FIELDS
from .config import GREY, OURS, RUN_FIELDS, SERIAL, BenchConfig, kind_of, select_chains
from .loops import run_loops
from .models import BenchModel, load_model
from .record import run_meta
from .timing import Timed, load_1m, median_call, take_turns, timed, wait_for_load


def _solve_kwargs(cfg: BenchConfig, name: str, speed_only: bool) -> dict:
    overrides = {}
    if cfg.window is not None:
        # the planner's window stays its own choice, bounded by --window
        overrides["window"] = Planner(max_window=cfg.window) if name == PLANNED else cfg.window
    if name == OURS and cfg.tol is not None:
        overrides["tol"] = cfg.tol
    if speed_only:          # fixed rounds at tol 0: no shadow runs (nothing to check)
        overrides.update(tol=0.0, max_iter=cfg.speed_rounds, serial_shadow=False)
    return peer(name, **overrides)


SETTING_KEYS = ("solver", "linearize", "tol", "init", "window", "max_iter")
OPTION_KEYS = ("freeze_ratio", "serial_shadow")     # from the solve's SolveOptions


def effective_settings(kw: dict) -> dict:
    """``solve``'s settings for these keyword arguments, defaults filled in (the keywords
    of ``SETTING_KEYS`` and the ``SolveOptions`` fields of ``OPTION_KEYS``)."""
    params = inspect.signature(solve).parameters
    options = kw.get("options") or dq.SolveOptions()
    return {**{k: kw.get(k, params[k].default) for k in SETTING_KEYS},
            **{k: getattr(options, k) for k in OPTION_KEYS}}


def _max_residual_per_round(res) -> List[Optional[float]]:
    out = []
    for row in res.residuals:
        finite = row[torch.isfinite(row)]
        out.append(float(finite.max()) if finite.numel() else None)
    return out


def _empty_row(**values) -> dict:
    row = {k: None for k in RUN_FIELDS}
    row.update(values)
    return row


def run_config(bm: BenchModel, cfg: BenchConfig, chain_name: str, chain, S: int, B: int,
               device: torch.device, progress, note) -> List[dict]:
    """Every method on one (chain, S, B): rows of ``RUN_FIELDS``."""
    cal_seed = cfg.seed
    x_T = torch.randn((B, *bm.shape), generator=torch.Generator().manual_seed(100 + cal_seed))
    x_T = x_T.to(device)

    def gen():
        return torch.Generator(device=device).manual_seed(2 + cal_seed)

    watch_gpu = device.type == "cuda"
    kwargs = {p: _solve_kwargs(cfg, p, bm.speed_only) for p in cfg.peers}

    def runner(method):
        if method == SERIAL:
            return lambda m: dq.sample_serial(m, chain, x_T, generator=gen())
        return lambda m: dq.solve(m, chain, x_T, generator=gen(), **kwargs[method])

    methods = [SERIAL] + list(cfg.peers)
    load = load_1m()
    first, runs = take_turns(
        {m: (lambda m=m: timed(runner(m), bm.model, device, watch_gpu)) for m in methods},
        cfg.repeats, progress, f"{kind_of(chain_name)} S={S} B={B}")
    W, call_s, batched_s = call_times(bm, cfg, chain, S, B, device)

    serial_x0 = first[SERIAL].out
    serial_wall = statistics.median(t.seconds for t in runs[SERIAL]) if cfg.repeats else None
    rows = []
    for m in methods:
        row = _empty_row(model=bm.name, chain=kind_of(chain_name), steps=S, batch=B, method=m,
                         speed_only=bm.speed_only, repeats=cfg.repeats, load_1m=load, window=W,
                         call_s=call_s, batched_call_s=batched_s,
                         batch_cost_ratio=batched_s / call_s)
        row.update(_measured(runs[m], serial_wall, B))
        if m == SERIAL:
            row.update(_serial_result(S, call_s, bm.speed_only))
        else:
            row.update(_parallel_result(first[m].out, kwargs[m], call_s, batched_s, serial_x0,
                                        bm.speed_only, W))
        rows.append(row)
    return rows


def call_times(bm: BenchModel, cfg: BenchConfig, chain, S: int, B: int, device: torch.device):
    """(W, seconds of one model call on B images, on the W x B images of a full round)."""
    W = min(cfg.window or S, S)
    ts = chain.timesteps.to(device)
    xb = torch.randn((W * B, *bm.shape), generator=torch.Generator().manual_seed(7)).to(device)
    call_s = median_call(bm.model, xb[:B], ts[S // 2].repeat(B), max(cfg.repeats, 1), device)
    batched_s = median_call(bm.model, xb, ts[:W].repeat_interleave(B), max(cfg.repeats, 1), device)
    return W, call_s, batched_s


def _measured(timings: List[Timed], serial_wall: Optional[float], batch: int) -> dict:
    """A method's timed runs: median wall time, time inside and outside model calls, the
    speed-up over serial, peak memory and NVML readings (nothing but the empty list of
    wall times without timed runs)."""
    walls = [t.seconds for t in timings]
    out = dict(wall_s=statistics.median(walls) if walls else None, wall_s_runs=walls)
    if not walls:
        return out
    out.update(model_s=statistics.median(t.model_s for t in timings),
               overhead_s=statistics.median(t.seconds - t.model_s for t in timings),
               speedup_vs_serial=serial_wall / out["wall_s"])
    peaks = [t.memory.peak_mb for t in timings if t.memory.peak_mb is not None]
    added = [t.memory.added_mb for t in timings if t.memory.added_mb is not None]
    out.update(peak_mem_mb=max(peaks) if peaks else None,
               mem_added_mb=max(added) if added else None,
               mem_kind=timings[0].memory.kind)
    out.update(_gpu_summary([t.gpu for t in timings], batch))
    return out


def _serial_result(S: int, call_s: float, speed_only: bool) -> dict:
    """The serial sampler's row: S model calls, the reference of parity."""
    out = dict(settings={"sampler": "sample_serial"}, rounds=None, nfe=S, sequential_calls=S,
               projected_s=S * call_s, ideal_s=S * call_s)
    if not speed_only:
        out.update(max_abs_err=0.0, parity_ok=True, parity="reference")
    return out


def _parallel_result(res, kw: dict, call_s: float, batched_s: float, serial_x0,
                     speed_only: bool, W: int = 1) -> dict:
    """A parallel solve's row from its warm-up result ``res``: rounds, model evaluations,
    the projections, and (unless speed only) the parity verdict against ``serial_x0``."""
    jump = kw.get("init", dq.api.DEFAULT_INIT) in dq.api.INITS_WITH_MODEL_CALL
    plan = res.stats.plan
    if plan is not None:             # planned: the guess only when it did not go serial at once
        jump = jump and plan.serial_from != 0
    calls = res.iterations + (1 if jump else 0)
    projected = res.iterations * batched_s
    if plan is not None:             # each round at its own call size, between the two measured
        slope = (batched_s - call_s) / (W - 1) if W > 1 else 0.0    # (1 and W rows of B)
        projected = sum(call_s + slope * (r - 1) for r in plan.rows)
    out = dict(settings=effective_settings(kw), rounds=res.iterations, nfe=res.nfe,
               sequential_calls=calls, projected_s=projected + (call_s if jump else 0.0),
               ideal_s=calls * call_s)
    if plan is not None:
        out.update(plan_windows=list(plan.windows),
                   plan_curve={str(n): t for n, t in plan.curve.items()})
    if not speed_only:
        err = float((res.x0 - serial_x0).abs().max())
        ok = bool(res.converged) and err <= GREY and math.isfinite(err)
        why = "ok" if ok else "FAIL: " + "; ".join(
            ([] if res.converged else [f"not converged after {res.iterations} rounds"])
            + ([] if err <= GREY else [f"max|x0 - serial| {err:.2e} > 2/255"]))
        out.update(converged=bool(res.converged), max_abs_err=err, parity_ok=ok, parity=why,
                   residuals=_max_residual_per_round(res))
    return out


def _gpu_summary(readings: List[dict], batch: int) -> dict:
    out = {k: None for k in GPU_FIELDS}
    out["energy_per_image_j"] = None
    good = [g for g in readings if g.get("samples")]
    if not good:
        return out
    mean = lambda key: statistics.mean(g[key] for g in good)   # noqa: E731
    energy = statistics.median(g["energy_j"] for g in good)
    out.update(gpu_mem_used_mb=max(g["gpu_mem_used_mb"] for g in good),
               sm_util_mean=mean("sm_util_mean"), sm_util_max=max(g["sm_util_max"] for g in good),
               power_mean_w=mean("power_mean_w"), power_max_w=max(g["power_max_w"] for g in good),
               energy_j=energy, energy_source=good[0]["energy_source"],
               samples=sum(g["samples"] for g in good), energy_per_image_j=energy / batch)
    return out


def _no_progress():
    class Silent:
        def update(self, n=1):
            pass

        def set_postfix_str(self, s):
            pass

        def close(self):
            pass
    return Silent()


def run_benchmark(cfg: BenchConfig, bench_model: Optional[BenchModel] = None, progress=None,
                  note: Callable[[str], None] = lambda text: None) -> dict:
    """Measure every configuration of ``cfg``; returns the report (``meta``, ``runs``
    rows of ``RUN_FIELDS``, ``loops`` rows of ``LOOP_FIELDS``, ``failures``).
    ``bench_model`` replaces the model ``cfg.model`` names (tests plant faulty models
    here); ``progress(total)`` makes a progress bar (tqdm-like), default none."""
    device = torch.device(cfg.device)
    bm = bench_model if bench_model is not None else load_model(cfg)
    if bm.speed_only and PLANNED in cfg.peers:
        note(f"{PLANNED} skipped: a speed-only model runs a fixed number of rounds at tol 0, "
             f"where the planner would only run the serial sampler")
        cfg = dataclasses.replace(cfg, peers=[p for p in cfg.peers if p != PLANNED])
    if isinstance(bm.model, torch.nn.Module):
        bm.model.to(device)
    chain_names = select_chains(cfg.chains)
    T = bm.schedule.num_train_timesteps
    for S in cfg.steps:
        if S > T:
            raise ValueError(f"--steps {S}: the model's schedule has {T} timesteps")
    loops = cfg.loops and "DDIM" in chain_names
    n_methods = 1 + len(cfg.peers)
    total = (len(chain_names) * len(cfg.steps) * len(cfg.batches) * n_methods * (1 + cfg.repeats)
             + (len(cfg.steps) * len(cfg.batches) * 2 * (1 + cfg.repeats) if loops else 0))
    bar = progress(total) if progress is not None else _no_progress()
    started = datetime.datetime.now().astimezone()
    try:
        runs, loop_rows, loads = measure_all(bm, cfg, chain_names, loops, device, bar, note)
    finally:
        bar.close()
    failures = [f"{r['chain']} S={r['steps']} B={r['batch']} {r['method']}: {r['parity']}"
                for r in runs if r["parity_ok"] is False]
    failures += [f"DDIM loops S={r['steps']} B={r['batch']}: our serial sampler differs from "
                 f"diffusers' DDIMScheduler loop by {r['max_abs_diff']:.2e} > 2/255"
                 for r in loop_rows if not r["parity_ok"]]
    ours_failed = any(r["parity_ok"] is False and r["method"] == OURS for r in runs) or any(
        not r["parity_ok"] for r in loop_rows)
    meta = run_meta(cfg, bm, device, started, loads, runs)
    return {"meta": meta, "runs": runs, "loops": loop_rows, "failures": failures,
            "ours_failed": ours_failed}


def measure_all(bm: BenchModel, cfg: BenchConfig, chain_names: List[str], loops: bool,
                device: torch.device, bar, note):
    """Every (S, B, chain), then the diffusers loops per (S, B): (run rows, loop rows, the
    1-minute load average as each timing starts and ends)."""
    loads = []
    runs, loop_rows = [], []
    for S in cfg.steps:
        for B in cfg.batches:
            truth = bm.truth[torch.arange(B) % bm.truth.shape[0]].float()
            built = dict(calibration.chains(bm.schedule, S, truth, seed=cfg.seed))
            for name in chain_names:
                wait_for_load(cfg.max_load, cfg.max_wait, note)
                loads.append(load_1m())
                runs += run_config(bm, cfg, name, built[name], S, B, device, bar, note)
                loads.append(load_1m())
            if loops:
                wait_for_load(cfg.max_load, cfg.max_wait, note)
                loads.append(load_1m())
                loop_rows.append(run_loops(bm, cfg, S, B, device, bar))
                loads.append(load_1m())
    return runs, loop_rows, loads
