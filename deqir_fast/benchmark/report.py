"""The report of ``deqir-fast bench``: bench.md (how it was measured, then the tables:
measured, projected, GPU telemetry, the diffusers loops, parity failures), bench.json and
the plots, written together."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List

from .. import image_io as io
from ..peers import PLANNED
from .config import OURS, SERIAL
from .plots import plot_planner, plot_residuals, plot_rounds, plot_time

def _num(v, spec=".3g", none="-") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, spec)


def _secs(v) -> str:
    return _num(v, ".3g")


def _mem(r: dict) -> str:
    added = "" if r["mem_added_mb"] is None else f" (+{r['mem_added_mb']:.0f})"
    return _num(r["peak_mem_mb"], ".0f") + added


def settings_text(settings) -> str:
    if not isinstance(settings, dict):
        return str(settings)
    return ", ".join(f"{k} {v}" for k, v in settings.items() if v is not None)


def markdown(report: dict) -> str:
    """The report as markdown: how it was measured, then the tables."""
    meta, runs, loops = report["meta"], report["runs"], report["loops"]
    speed_only = meta["speed_only"]
    lines = (_how_measured(meta, runs) + _measured_table(runs, speed_only)
             + _projected_table(runs, speed_only) + _gpu_table(meta, runs) + _loops_table(loops)
             + _failures(report, speed_only))
    return "\n".join(lines) + "\n"


def _key(r: dict) -> str:
    """The cells that name a run: chain, S, B, method."""
    return f"| {r['chain']} | {r['steps']} | {r['batch']} | {r['method']} | "


def _how_measured(meta: dict, runs: List[dict]) -> List[str]:
    """The title, the command, the machine, how times and parity are taken, the methods."""
    cpu = meta["device"] == "cpu"
    speed_only = meta["speed_only"]
    lines = [f"# deqir-fast bench: {meta['model']}", "",
             f"`{meta['command']}`", "",
             f"Model: {meta['model_description']}. Measured {meta['date']} with deqir-fast "
             f"{meta['deqir_fast']} (git {meta['git'] or 'unknown'}), torch {meta['torch']}, on "
             f"{meta['device']} ({meta['device_name']}, {meta['torch_threads']} torch threads, "
             f"{meta['cpus']} CPUs); 1-minute load average {_num(meta['load_1m_min'], '.2f')} to "
             f"{_num(meta['load_1m_max'], '.2f')} during the run.", "",
             f"Each time is the median of {meta['config']['repeats']} timed runs after one "
             f"warm-up run (whose results give rounds, model evaluations and the error); the "
             f"methods of a configuration take turns, so each ratio comes from one run. "
             f"Parity: the solve converged and max|x0 - serial| <= 2/255 (one 8-bit grey "
             f"level on the [-1, 1] scale).", ""]
    if cpu:
        lines += [f"**{meta['cpu_note']}**", ""]
    if speed_only:
        lines += ["**Speed only**: a randomly initialised network. Each parallel solve runs a "
                  f"fixed {meta['config']['speed_rounds']} rounds (tol 0); no convergence "
                  "numbers come from this model.", ""]
    lines += ["Methods, all on the same model, chain and noise in one process:", "",
              "- serial: `dq.sample_serial`, one model call per step (the reference);"]
    seen = set()
    for r in runs:
        if r["method"] != SERIAL and r["method"] not in seen:
            seen.add(r["method"])
            what = "our default solve" if r["method"] == OURS else "a configuration of our solver"
            lines.append(f"- {r['method']}: {what}, `dq.solve` with {settings_text(r['settings'])};")
    return lines


def _measured_table(runs: List[dict], speed_only: bool) -> List[str]:
    """Measured: wall times, rounds, model evaluations, parity and memory per method."""
    lines = ["", "## Measured: serial vs parallel", ""]
    if speed_only:
        lines += ["| chain | S | B | method | wall s | serial / this | rounds (fixed) | model evals | "
                  "in model calls s | outside model calls s | per round outside s | "
                  "peak mem MB (added) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in runs:
            per_round = (None if r["rounds"] in (None, 0) or r["overhead_s"] is None
                         else r["overhead_s"] / r["rounds"])
            lines.append(_key(r) + f"{_secs(r['wall_s'])} | "
                         f"{_num(r['speedup_vs_serial'], '.2f')} | "
                         f"{_num(r['rounds'], 'd')} | {r['nfe']} | {_secs(r['model_s'])} | "
                         f"{_secs(r['overhead_s'])} | {_secs(per_round)} | "
                         f"{_mem(r)} |")
    else:
        lines += ["| chain | S | B | method | wall s | serial / this | rounds | model evals | "
                  "max abs x0 - serial | converged | parity | outside model calls s | "
                  "peak mem MB (added) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in runs:
            serial = r["method"] == SERIAL
            lines.append(_key(r) + f"{_secs(r['wall_s'])} | "
                         f"{_num(r['speedup_vs_serial'], '.2f')} | "
                         f"{r['steps'] if serial else r['rounds']} | {r['nfe']} | "
                         f"{'-' if serial else _num(r['max_abs_err'], '.1e')} | "
                         f"{'-' if serial else r['converged']} | "
                         f"{'-' if serial else ('ok' if r['parity_ok'] else '**FAIL**')} | "
                         f"{_secs(r['overhead_s'])} | {_mem(r)} |")
    kind = runs[0]["mem_kind"] if runs else ""
    lines += ["", f"serial / this: the serial sampler's median time over this method's (above 1: "
                  f"faster than serial). rounds: sequential solver rounds, one batched model call "
                  f"each (serial: S calls). model evals: step evaluations, each one model call "
                  f"on B images. peak mem: {kind or 'n/a'}, the peak during the run (on a CPU the "
                  f"whole process's resident memory), and in brackets its growth over the memory "
                  f"in use when the run started."]
    return lines


def _projected_table(runs: List[dict], speed_only: bool) -> List[str]:
    """Projected from measured call times, apart from the measurements."""
    lines = ["", "## Projected (computed from measured call times, not measured)", "",
             "| chain | S | B | method | sequential calls | call s (B images) | "
             "batched call s (W x B images) | batched / single | projected s | ideal s | "
             "ideal speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        speedup = None if not r["sequential_calls"] else r["steps"] / r["sequential_calls"]
        if speed_only:
            speedup, r = None, dict(r, ideal_s=None)         # no convergence numbers
        lines.append(_key(r) + f"{r['sequential_calls']} | {_secs(r['call_s'])} | "
                     f"{_secs(r['batched_call_s'])} | {_num(r['batch_cost_ratio'], '.1f')} | "
                     f"{_secs(r['projected_s'])} | {_secs(r['ideal_s'])} | "
                     f"{_num(speedup, '.1f')}{'' if speedup is None else 'x'} |")
    lines += ["", "sequential calls: rounds, plus one call for the jump initial guess (serial: "
                  "S). projected: rounds x the batched call measured on this device, plus the "
                  "jump guess's call (serial: S x the single call); on a GPU this is the "
                  "projected GPU time. ideal: sequential calls x the single call, i.e. if a "
                  "batch of W x B images cost no more than one call on B images (a GPU below "
                  "saturation): an assumption. ideal speed-up: S / sequential calls."]
    return lines


def _gpu_table(meta: dict, runs: List[dict]) -> List[str]:
    """The NVML readings, or why there are none."""
    lines = ["", "## GPU telemetry (nvidia-ml-py)", ""]
    nv = meta["nvml"]
    if nv["available"]:
        lines += [f"{nv['name']}, sampled every 20 ms in a background thread during each timed "
                  f"run; device memory counts every process on the GPU.", "",
                  "| chain | S | B | method | GPU memory used MB | SM util mean % | SM util max % | "
                  "power mean W | energy J | energy per image J | energy source |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in runs:
            lines.append(_key(r) + f"{_num(r['gpu_mem_used_mb'], '.0f')} | "
                         f"{_num(r['sm_util_mean'], '.0f')} | "
                         f"{_num(r['sm_util_max'], '.0f')} | {_num(r['power_mean_w'], '.0f')} | "
                         f"{_num(r['energy_j'], '.3g')} | {_num(r['energy_per_image_j'], '.3g')} | "
                         f"{r['energy_source'] or '-'} |")
    else:
        lines.append(f"No NVML readings: {nv['reason']}.")
    return lines


def _loops_table(loops: List[dict]) -> List[str]:
    """diffusers' DDIMScheduler loop against our serial sampler (none without loop rows)."""
    if not loops:
        return []
    lines = ["", "## Serial loops: diffusers' DDIMScheduler loop vs our serial sampler", "",
             "The same network, scheduler and noise: diffusers' loop "
             "(`for t in scheduler.timesteps: x = scheduler.step(unet(x, t).sample, t, x).prev_sample`)"
             " against `dq.sample_serial` on `dq.chain_from_diffusers(scheduler, S)`, "
             "eta 0, timed in turns; on CUDA both without TF32.", "",
             "| S | B | diffusers loop s | deqir_fast serial s | ours / diffusers | "
             "outside model calls, diffusers s | outside model calls, ours s | "
             "max abs difference |",
             "|---|---|---|---|---|---|---|---|"]
    for r in loops:
        lines.append(f"| {r['steps']} | {r['batch']} | {_secs(r['diffusers_s'])} | "
                     f"{_secs(r['ours_s'])} | {_num(r['ratio'], '.3f')} | "
                     f"{_secs(r['overhead_s_diffusers'])} | {_secs(r['overhead_s_ours'])} | "
                     f"{r['max_abs_diff']:.1e}{'' if r['parity_ok'] else ' **FAIL**'} |")
    return lines


def _failures(report: dict, speed_only: bool) -> List[str]:
    """Every parity failure, listed."""
    lines = ["", "## Parity failures", ""]
    if speed_only:
        lines.append("Not checked: speed only.")
    elif report["failures"]:
        lines += [f"- {f}" for f in report["failures"]]
    else:
        lines.append("None: every parallel result converged within 2/255 of the serial sampler's.")
    return lines


def write_report(report: dict, out: Path, plots: bool = True) -> List[Path]:
    """bench.md, bench.json and (``plots``) the figures (time, rounds, residuals, and the
    planner's when it ran), written together."""
    text = markdown(report)
    data = json.dumps({k: v for k, v in report.items() if k != "ours_failed"}, indent=1,
                      allow_nan=False, default=str)
    writers = [(out / "bench.md", lambda tmp: tmp.write_text(text, encoding="utf-8")),
               (out / "bench.json", lambda tmp: tmp.write_text(data, encoding="utf-8"))]
    if plots and report["runs"]:
        writers.append((out / "bench_time.png", lambda tmp: plot_time(report, tmp)))
        parallel = any(r["method"] != SERIAL for r in report["runs"])
        if parallel and not report["meta"]["speed_only"]:
            writers += [(out / "bench_rounds.png", lambda tmp: plot_rounds(report, tmp)),
                        (out / "bench_residuals.png", lambda tmp: plot_residuals(report, tmp))]
        if any(r["method"] == PLANNED and r["plan_windows"] for r in report["runs"]):
            writers.append((out / "bench_planner.png", lambda tmp: plot_planner(report, tmp)))
    io.write_all(writers)
    return [p for p, _ in writers]


def finite(obj):
    """NaN/inf -> None, so the JSON is strict."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj
