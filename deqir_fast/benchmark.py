"""``deqir-fast bench``: serial against parallel sampling, end to end, with every number
traceable to the command that printed it.

For each chain kind (DDIM, DDPM = DDIM with eta 1, DDRM inpainting, DDNM super-resolution:
the calibration chains of ``deqir_fast.calibration``), each number of steps S and each batch
size B, one process runs, on the same model, chain and noise:

- the serial sampler (``sample_serial``), the reference;
- the parallel solve in each peer configuration of ``deqir_fast.peers`` (our default
  ``deqir_fast``, ParaDiGMS, DeqIR, ParaTAA);
- for DDIM, the loop users already run: diffusers' ``DDIMScheduler`` stepping the same
  network, against our serial sampler on the same scheduler's chain.

Each method runs once untimed (the warm-up; its result gives rounds, model evaluations,
the residual trace and max|x0 - serial|), then ``repeats`` timed runs, the methods taking
turns so that drift in the machine's speed hits them alike; times are medians (CUDA is
synchronised before each clock read). Every timed run also records the time spent inside
model calls, the peak memory (``telemetry.PeakMemory``) and, on an NVIDIA GPU, NVML
readings (``telemetry.GpuMonitor``).

A parallel result passes parity when its solve converged and max|x0 - serial| <= 2/255
(one 8-bit grey level on the [-1, 1] scale, the calibration target of docs/design.md §3);
every failure is listed in the report, and a failure of our own solver (``deqir_fast``)
makes the command exit with status 1.

Projections are kept apart from measurements: ``projected_s`` = rounds x the measured
time of one batched call on W x B images (W the window, S by default) plus the jump
guess's call; ``ideal_s`` = sequential calls x the measured time of one call on B images,
i.e. what the solve would take if the batch cost no more than one serial call (a GPU
below saturation) - an assumption, not a measurement.

A randomly initialised ``UNet2DModel`` (``--model random64`` / ``random256``) gives a model
of chosen cost for overhead measurements: its rows are speed only (fixed rounds, tol 0),
with no convergence numbers.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

import deqir_fast as dq

from . import calibration
from .peers import PEERS, peer
from .telemetry import GPU_FIELDS, GpuMonitor, PeakMemory, nvml_status

GREY = calibration.GREY
# Chain kinds: the names of the calibration chains (any of them is accepted too).
CHAIN_ALIASES = {"DDIM": "DDIM", "DDPM": "DDPM", "DDRM": "DDRM-inp", "DDNM": "DDNM-sr2"}
DEFAULT_CHAINS = ("DDIM", "DDPM", "DDRM", "DDNM")
DEFAULT_STEPS = (10, 20)
DEFAULT_BATCHES = (1,)
DEFAULT_PEERS = tuple(PEERS)
NAMED_MODELS = ("bundled", "gmm", "random64", "random256")
RANDOM_CHANNELS = (32, 64, 128, 128)
OURS = "deqir_fast"
SERIAL = "serial"

RUN_FIELDS = (
    "model", "chain", "steps", "batch", "method", "settings", "speed_only", "repeats",
    "wall_s", "wall_s_runs", "speedup_vs_serial", "model_s", "overhead_s",
    "rounds", "nfe", "sequential_calls", "converged", "max_abs_err", "parity_ok", "parity",
    "residuals", "window", "call_s", "batched_call_s", "batch_cost_ratio", "projected_s", "ideal_s",
    "peak_mem_mb", "mem_added_mb", "mem_kind", "load_1m",
) + GPU_FIELDS + ("energy_per_image_j",)
LOOP_FIELDS = (
    "model", "steps", "batch", "repeats", "diffusers_s", "ours_s", "ratio", "diffusers_runs",
    "ours_runs", "model_s_diffusers", "model_s_ours", "overhead_s_diffusers", "overhead_s_ours",
    "max_abs_diff", "parity_ok", "load_1m",
)


def batch_cost_fraction(runs: List[dict]) -> Optional[float]:
    """Median over the configurations of (time of one call on the W x B images of a round)
    / (W x the time of one call on B images): about 1 where batching saves nothing (a CPU),
    about 1/W where a batch costs one call (a GPU below saturation)."""
    fr = [r["batch_cost_ratio"] / r["window"] for r in runs
          if r["method"] == SERIAL and r["batch_cost_ratio"] and r["window"] and r["window"] > 1]
    return statistics.median(fr) if fr else None


def cpu_note(fraction: Optional[float]) -> str:
    """What the CPU numbers say, from the measured batch cost ``fraction``."""
    tail = (" The figure that carries over to a GPU is rounds against S; the projected columns "
            "are computed from measured call times, not measured.")
    if fraction is None:
        return "On a CPU a batch of S images costs about S serial calls." + tail
    cost = (f"one model call on the W x B images of a round costs {fraction:.0%} of W separate "
            f"calls on B images (measured, median over the configurations)")
    if fraction >= 0.5:
        return (f"On this CPU the parallel solver cannot win wall time: {cost}, so a round costs "
                f"about as much as W serial steps, and a solve that needs more model evaluations "
                f"than the serial sampler takes longer." + tail)
    return (f"On this CPU {cost}: the model is cheap enough that per-call overhead dominates, "
            f"so these wall times say little about a GPU either." + tail)


@dataclass
class BenchConfig:
    """What ``run_benchmark`` measures (the command line's options)."""
    model: str = "bundled"
    chains: Sequence[str] = DEFAULT_CHAINS
    steps: Sequence[int] = DEFAULT_STEPS
    batches: Sequence[int] = DEFAULT_BATCHES
    peers: Sequence[str] = DEFAULT_PEERS
    repeats: int = 3
    tol: Optional[float] = None          # our solver's tol (default: solve's)
    window: Optional[int] = None         # every parallel method's window
    loops: bool = True                   # the diffusers DDIMScheduler loop (DDIM only)
    speed_rounds: int = 2                # rounds of each timed solve on a speed-only model
    gmm_size: int = 32
    random_channels: Sequence[int] = RANDOM_CHANNELS
    device: str = "cpu"
    seed: int = 0
    max_load: Optional[float] = None     # wait for the 1-min load average to drop below
    max_wait: float = 900.0
    out: Optional[str] = None            # where the command line writes (for the record)

    def command(self) -> str:
        """The command line that reruns this configuration."""
        parts = ["deqir-fast", "bench", "--model", str(self.model),
                 "--chains", ",".join(self.chains), "--steps", ",".join(map(str, self.steps)),
                 "--batch", ",".join(map(str, self.batches)),
                 "--peers", ",".join(self.peers) or "none",
                 "--repeats", str(self.repeats)]
        if self.tol is not None:
            parts += ["--tol", f"{self.tol:g}"]
        if self.window is not None:
            parts += ["--window", str(self.window)]
        if not self.loops:
            parts.append("--no-loops")
        if str(self.model).startswith("random"):
            parts += ["--speed-rounds", str(self.speed_rounds),
                      "--random-channels", ",".join(map(str, self.random_channels))]
        if self.model == "gmm":
            parts += ["--gmm-size", str(self.gmm_size)]
        if self.max_load is not None:
            parts += ["--max-load", f"{self.max_load:g}", "--max-wait", f"{self.max_wait:g}"]
        parts += ["--seed", str(self.seed), "--device", str(self.device)]
        if self.out is not None:
            parts += ["--out", str(self.out)]
        threads = os.environ.get("OMP_NUM_THREADS")
        env = f"OMP_NUM_THREADS={threads} " if threads else ""
        return env + " ".join(shlex.quote(p) for p in parts)


@dataclass
class BenchModel:
    """A model to benchmark: ``model(x, t) -> eps``, its schedule, clean images for the
    restoration chains' measurements ([N, C, H, W] in [-1, 1], on the CPU), and what a
    user's own loop would call (``network(x, t)``, a diffusers output or a tensor) with
    its scheduler config (None: diffusers' DDIMScheduler defaults, linear betas)."""
    name: str
    model: Callable
    schedule: dq.Schedule
    truth: torch.Tensor
    network: Optional[Callable] = None
    scheduler_config: Optional[dict] = None
    speed_only: bool = False
    description: str = ""

    @property
    def shape(self):
        return tuple(self.truth.shape[1:])


# -- models ---------------------------------------------------------------------------------
def smooth_images(n: int, shape, seed: int) -> torch.Tensor:
    """n smooth random images in [-1, 1] (low-resolution noise, upsampled): stand-in
    ground truth for a model that brings no images."""
    C, H, W = shape
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand((n, C, max(H // 4, 1), max(W // 4, 1)), generator=gen) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(H, W), mode="bilinear", align_corners=False)


def random_unet(size: int, channels: Sequence[int], seed: int):
    """A randomly initialised diffusers UNet2DModel at size x size (attention at the
    lowest resolution only): a model of chosen cost, for speed only."""
    from diffusers import UNet2DModel
    n = len(channels)
    torch.manual_seed(seed)
    net = UNet2DModel(sample_size=size, in_channels=3, out_channels=3, layers_per_block=1,
                      block_out_channels=tuple(channels),
                      down_block_types=("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",),
                      up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
                      norm_num_groups=min(32, min(channels)))
    return net.eval().requires_grad_(False)


def _parameters(model) -> int:
    params = getattr(model, "parameters", None)
    return sum(p.numel() for p in params()) if params else 0


def load_model(cfg: BenchConfig) -> BenchModel:
    """The ``BenchModel`` that ``cfg.model`` names: bundled, gmm, random64, random256, or
    a diffusers UNet2DModel folder (the source repository's ``bench/models/photo16`` is
    one)."""
    from .models import EpsModel, load_unet
    name = str(cfg.model)
    if name == "bundled":
        model, schedule, images = calibration.load(name)
        return BenchModel(name, model, schedule, images.float(), network=model.network,
                          scheduler_config=model.scheduler_config,
                          description="the bundled 1.1M-parameter UNet (coloured digits, "
                                      "3x32x32), held-out digits")
    if name == "gmm":
        size = cfg.gmm_size
        schedule = dq.Schedule.linear(1000)
        model = dq.testing.GaussianMixtureDenoiser(schedule, (3, size, size), components=8,
                                                   std=0.15, dtype=torch.float32)
        return BenchModel(name, model, schedule, model.means.detach().clone(), network=model,
                          description=f"the exact Gaussian-mixture denoiser (8 components, std "
                                      f"0.15, 3x{size}x{size}); its means as ground truth")
    if name.startswith("random"):
        size = int(name[len("random"):] or 0)
        if size < 8:
            raise ValueError(f"--model {name}: say the size, e.g. random64 or random256")
        net = random_unet(size, cfg.random_channels, cfg.seed)
        model = EpsModel(net)
        return BenchModel(name, model, dq.Schedule.linear(1000),
                          smooth_images(8, (3, size, size), cfg.seed), network=net,
                          speed_only=True,
                          description=f"a randomly initialised UNet2DModel, channels "
                                      f"{tuple(cfg.random_channels)}, 3x{size}x{size}, "
                                      f"{_parameters(net) / 1e6:.2g}M parameters: speed only")
    folder = Path(name)
    if not folder.is_dir():
        raise ValueError(_unknown_model(name))
    model = load_unet(folder)
    schedule = model.schedule or dq.Schedule.linear(1000)
    shape = _unet_shape(model.network)
    heldout = folder / "heldout.npz"
    if heldout.is_file():
        import numpy as np
        truth = torch.from_numpy(np.load(heldout)["images"]).float()
        source = "its heldout.npz"
    else:
        truth = smooth_images(8, shape, cfg.seed)
        source = "smooth random images as ground truth"
    sched = "its scheduler config" if model.schedule is not None else "linear betas (no config)"
    return BenchModel(folder.name, model, schedule, truth, network=model.network,
                      scheduler_config=model.scheduler_config,
                      description=f"{folder} ({_parameters(model.network) / 1e6:.2f}M parameters, "
                                  f"{sched}, {source})")


def _unknown_model(name: str) -> str:
    text = f"--model {name}: not one of {', '.join(NAMED_MODELS)} and not a folder"
    if Path(name).name == "photo16":
        text += ("; photo16 is not installed with the package: pass its folder in the source "
                 "repository, --model path/to/bench/models/photo16")
    return text


def _unet_shape(net):
    config = net.config
    size = config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (config.in_channels, *size)


def select_chains(names: Sequence[str]) -> List[str]:
    """Chain kinds (DDIM, DDPM, DDRM, DDNM or a calibration chain name) -> calibration
    chain names, checked."""
    known = calibration.CHAIN_NAMES
    out = []
    for n in names:
        full = CHAIN_ALIASES.get(n, n)
        if full not in known:
            raise ValueError(f"unknown chain {n!r}; use {', '.join(CHAIN_ALIASES)} or one of "
                             f"{', '.join(known)}")
        out.append(full)
    return out


def kind_of(chain_name: str) -> str:
    """The chain kind a calibration chain name stands for (DDRM-inp -> DDRM)."""
    for kind, full in CHAIN_ALIASES.items():
        if chain_name == full:
            return kind
    return chain_name


# -- timing -----------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ModelClock:
    """``model`` with the time spent inside its calls added up (synchronised on CUDA)."""

    def __init__(self, model, device: torch.device):
        self.model, self.device, self.seconds = model, device, 0.0

    def __call__(self, x, t):
        _sync(self.device)
        t0 = time.perf_counter()
        out = self.model(x, t)
        _sync(self.device)
        self.seconds += time.perf_counter() - t0
        return out


@dataclass
class Timed:
    """One run: its result, wall seconds, seconds inside model calls, memory, NVML."""
    out: object
    seconds: float
    model_s: float
    memory: PeakMemory
    gpu: Dict[str, object]


def timed(fn: Callable[[Callable], object], model, device: torch.device,
          watch_gpu: bool) -> Timed:
    """Run ``fn(clocked_model)`` once, timed, with peak memory and (``watch_gpu``) NVML."""
    clock = ModelClock(model, device)
    monitor = GpuMonitor(device) if watch_gpu else None
    _sync(device)
    with torch.no_grad(), PeakMemory(device) as memory, (monitor or nullcontext()):
        t0 = time.perf_counter()
        out = fn(clock)
        _sync(device)
        seconds = time.perf_counter() - t0
    gpu = monitor.summary() if monitor else {k: None for k in GPU_FIELDS}
    return Timed(out, seconds, clock.seconds, memory, gpu)


def median_call(model, x, t, repeats: int, device: torch.device) -> float:
    """Median seconds of ``model(x, t)`` over ``repeats`` calls after one warm-up call."""
    times = []
    with torch.no_grad():
        for k in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            model(x, t)
            _sync(device)
            if k:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def load_1m() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def wait_for_load(max_load: Optional[float], max_wait: float, note: Callable[[str], None]) -> None:
    """Sleep until the 1-minute load average is below ``max_load`` (at most ``max_wait`` s)."""
    if max_load is None or load_1m() is None:
        return
    waited = 0.0
    while load_1m() >= max_load and waited < max_wait:
        if waited == 0:
            note(f"1-minute load {load_1m():.2f} >= {max_load:g}: waiting (at most {max_wait:.0f} s)")
        time.sleep(10)
        waited += 10
    if load_1m() >= max_load:
        note(f"1-minute load still {load_1m():.2f} after {waited:.0f} s; timing anyway "
             f"(recorded in load_1m)")


# -- the benchmark --------------------------------------------------------------------------------
def _solve_kwargs(cfg: BenchConfig, name: str, speed_only: bool) -> dict:
    kw = peer(name)
    if cfg.window is not None:
        kw["window"] = cfg.window
    if name == OURS and cfg.tol is not None:
        kw["tol"] = cfg.tol
    if speed_only:          # fixed rounds at tol 0: no shadow runs (nothing to check)
        kw.update(tol=0.0, max_iter=cfg.speed_rounds, serial_shadow=False)
    return kw


SETTING_KEYS = ("solver", "linearize", "tol", "init", "window", "max_iter", "freeze_ratio",
                "serial_shadow")


def effective_settings(kw: dict) -> dict:
    """``solve``'s settings for these keyword arguments, defaults filled in."""
    import inspect
    from .api import solve
    params = inspect.signature(solve).parameters
    return {k: kw.get(k, params[k].default) for k in SETTING_KEYS}


def settings_text(settings) -> str:
    if not isinstance(settings, dict):
        return str(settings)
    return ", ".join(f"{k} {v}" for k, v in settings.items() if v is not None)


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
    first: Dict[str, Timed] = {}
    for m in methods:                                  # warm-up: the results of record
        progress.set_postfix_str(f"{kind_of(chain_name)} S={S} B={B} {m} (warm-up)")
        first[m] = timed(runner(m), bm.model, device, watch_gpu)
        progress.update(1)
    runs: Dict[str, List[Timed]] = {m: [] for m in methods}
    for r in range(cfg.repeats):                       # timed: methods take turns
        order = methods[r % len(methods):] + methods[:r % len(methods)]
        for m in order:
            progress.set_postfix_str(f"{kind_of(chain_name)} S={S} B={B} {m} ({r + 1}/{cfg.repeats})")
            runs[m].append(timed(runner(m), bm.model, device, watch_gpu))
            progress.update(1)

    # Call times: one model call on B images, and on the W x B images of a full round.
    W = min(cfg.window or S, S)
    ts = chain.timesteps.to(device)
    xb = torch.randn((W * B, *bm.shape), generator=torch.Generator().manual_seed(7)).to(device)
    call_s = median_call(bm.model, xb[:B], ts[S // 2].repeat(B), max(cfg.repeats, 1), device)
    batched_s = median_call(bm.model, xb, ts[:W].repeat_interleave(B), max(cfg.repeats, 1), device)

    serial_x0 = first[SERIAL].out
    serial_wall = statistics.median(t.seconds for t in runs[SERIAL]) if cfg.repeats else None
    rows = []
    for m in methods:
        timings = runs[m]
        walls = [t.seconds for t in timings]
        wall = statistics.median(walls) if walls else None
        row = _empty_row(model=bm.name, chain=kind_of(chain_name), steps=S, batch=B, method=m,
                         speed_only=bm.speed_only, repeats=cfg.repeats, wall_s=wall,
                         wall_s_runs=walls, load_1m=load, window=W, call_s=call_s,
                         batched_call_s=batched_s, batch_cost_ratio=batched_s / call_s)
        if walls:
            row.update(model_s=statistics.median(t.model_s for t in timings),
                       overhead_s=statistics.median(t.seconds - t.model_s for t in timings),
                       speedup_vs_serial=serial_wall / wall)
            peaks = [t.memory.peak_mb for t in timings if t.memory.peak_mb is not None]
            added = [t.memory.added_mb for t in timings if t.memory.added_mb is not None]
            row.update(peak_mem_mb=max(peaks) if peaks else None,
                       mem_added_mb=max(added) if added else None,
                       mem_kind=timings[0].memory.kind)
            row.update(_gpu_summary([t.gpu for t in timings], B))
        if m == SERIAL:
            row.update(settings={"sampler": "sample_serial"}, rounds=None, nfe=S, sequential_calls=S,
                       projected_s=S * call_s, ideal_s=S * call_s)
            if not bm.speed_only:
                row.update(max_abs_err=0.0, parity_ok=True, parity="reference")
            rows.append(row)
            continue
        res = first[m].out
        kw = kwargs[m]
        jump = kw.get("init", dq.api.DEFAULT_INIT) in dq.api.INITS_WITH_MODEL_CALL
        calls = res.iterations + (1 if jump else 0)
        row.update(settings=effective_settings(kw), rounds=res.iterations, nfe=res.nfe,
                   sequential_calls=calls,
                   projected_s=res.iterations * batched_s + (call_s if jump else 0.0),
                   ideal_s=calls * call_s)
        if not bm.speed_only:
            err = float((res.x0 - serial_x0).abs().max())
            ok = bool(res.converged) and err <= GREY and math.isfinite(err)
            why = "ok" if ok else "FAIL: " + "; ".join(
                ([] if res.converged else [f"not converged after {res.iterations} rounds"])
                + ([] if err <= GREY else [f"max|x0 - serial| {err:.2e} > 2/255"]))
            row.update(converged=bool(res.converged), max_abs_err=err, parity_ok=ok, parity=why,
                       residuals=_max_residual_per_round(res))
        rows.append(row)
    return rows


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


def diffusers_scheduler(bm: BenchModel):
    """A DDIMScheduler for the model: its own config (clip_sample and thresholding off,
    as the affine chain requires), else diffusers' defaults (linear betas)."""
    from diffusers import DDIMScheduler
    config = dict(bm.scheduler_config or {})
    for key in ("_class_name", "_diffusers_version"):
        config.pop(key, None)
    config.update(clip_sample=False, thresholding=False)
    return DDIMScheduler.from_config(config)


def run_loops(bm: BenchModel, cfg: BenchConfig, S: int, B: int, device: torch.device,
              progress) -> dict:
    """diffusers' DDIMScheduler loop against our serial sampler on the chain that steps as
    the scheduler does (``DDIM.from_diffusers``), same network, same noise, both in IEEE
    float32 on CUDA."""
    from .diffusers_compat import draw_noise
    from .system import ieee_float32
    scheduler = diffusers_scheduler(bm)
    chain = dq.DDIM.from_diffusers(scheduler, S, eta=0.0)
    x_T, noise = draw_noise(chain, (B, *bm.shape), torch.Generator().manual_seed(cfg.seed + 3))
    x_T, noise = x_T.to(device), noise.to(device)
    network = bm.network if bm.network is not None else bm.model

    def diffusers_loop(net):
        scheduler.set_timesteps(S)
        image = x_T.clone()
        for t in scheduler.timesteps:
            # the same float32 arithmetic as ours (no TF32 on CUDA: system.ieee_float32)
            with ieee_float32(device):
                out = net(image, t.to(device))
            eps = out.sample if hasattr(out, "sample") and not isinstance(out, torch.Tensor) else out
            image = scheduler.step(eps, t, image, eta=0.0).prev_sample
        return image

    def ours(model):
        return dq.sample_serial(model, chain, x_T, noise=noise)

    methods = {"diffusers": (diffusers_loop, network), "ours": (ours, bm.model)}
    load = load_1m()
    first = {}
    for name, (fn, target) in methods.items():
        progress.set_postfix_str(f"DDIM loops S={S} B={B} {name} (warm-up)")
        first[name] = timed(fn, target, device, False).out
        progress.update(1)
    runs = {name: [] for name in methods}
    names = list(methods)
    for r in range(cfg.repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            fn, target = methods[name]
            progress.set_postfix_str(f"DDIM loops S={S} B={B} {name} ({r + 1}/{cfg.repeats})")
            runs[name].append(timed(fn, target, device, False))
            progress.update(1)
    diff = float((first["ours"] - first["diffusers"]).abs().max())
    med = {n: statistics.median(t.seconds for t in runs[n]) if runs[n] else None for n in names}
    model_s = {n: statistics.median(t.model_s for t in runs[n]) if runs[n] else None for n in names}
    over = {n: statistics.median(t.seconds - t.model_s for t in runs[n]) if runs[n] else None
            for n in names}
    return {"model": bm.name, "steps": S, "batch": B, "repeats": cfg.repeats,
            "diffusers_s": med["diffusers"], "ours_s": med["ours"],
            "ratio": (med["ours"] / med["diffusers"]) if runs["ours"] else None,
            "diffusers_runs": [t.seconds for t in runs["diffusers"]],
            "ours_runs": [t.seconds for t in runs["ours"]],
            "model_s_diffusers": model_s["diffusers"], "model_s_ours": model_s["ours"],
            "overhead_s_diffusers": over["diffusers"], "overhead_s_ours": over["ours"],
            "max_abs_diff": diff, "parity_ok": bool(diff <= GREY), "load_1m": load}


def _git_commit() -> Optional[str]:
    """The commit of a source checkout the package runs from (an editable install);
    None for an installed copy, which may sit inside some other repository."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


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
    loads = []                           # the 1-minute load average as each timing starts and ends
    started = datetime.datetime.now().astimezone()
    runs, loop_rows = [], []
    try:
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
    finally:
        bar.close()
    fraction = batch_cost_fraction(runs)
    loads = [v for v in loads if v is not None]
    failures = [f"{r['chain']} S={r['steps']} B={r['batch']} {r['method']}: {r['parity']}"
                for r in runs if r["parity_ok"] is False]
    failures += [f"DDIM loops S={r['steps']} B={r['batch']}: our serial sampler differs from "
                 f"diffusers' DDIMScheduler loop by {r['max_abs_diff']:.2e} > 2/255"
                 for r in loop_rows if not r["parity_ok"]]
    ours_failed = any(r["parity_ok"] is False and r["method"] == OURS for r in runs) or any(
        not r["parity_ok"] for r in loop_rows)
    meta = {
        "command": cfg.command(), "date": started.isoformat(timespec="seconds"),
        "deqir_fast": dq.__version__, "git": _git_commit(), "torch": torch.__version__,
        "python": platform.python_version(), "device": str(device),
        "device_name": _device_name(device), "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "load_1m_min": min(loads) if loads else None,
        "load_1m_max": max(loads) if loads else None, "model": bm.name,
        "model_description": bm.description, "speed_only": bm.speed_only,
        "shape": list(bm.shape), "nvml": nvml_status(device), "parity_threshold": GREY,
        "batch_cost_fraction": fraction,
        "cpu_note": cpu_note(fraction) if device.type == "cpu" else None,
        "config": {f.name: _jsonable(getattr(cfg, f.name)) for f in fields(cfg)},
    }
    return {"meta": meta, "runs": runs, "loops": loop_rows, "failures": failures,
            "ours_failed": ours_failed}


def _jsonable(v):
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v if isinstance(v, (int, float, str, bool, type(None))) else str(v)


# -- the report -------------------------------------------------------------------------------------
def _num(v, spec=".3g", none="-") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, spec)


def _secs(v) -> str:
    return _num(v, ".3g")


def _mem(r: dict) -> str:
    added = "" if r["mem_added_mb"] is None else f" (+{r['mem_added_mb']:.0f})"
    return _num(r["peak_mem_mb"], ".0f") + added


def markdown(report: dict) -> str:
    """The report as markdown: how it was measured, then the tables."""
    meta, runs, loops = report["meta"], report["runs"], report["loops"]
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
    lines += ["", "## Measured: serial vs parallel", ""]
    if speed_only:
        lines += ["| chain | S | B | method | wall s | serial / this | rounds (fixed) | model evals | "
                  "in model calls s | outside model calls s | per round outside s | "
                  "peak mem MB (added) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in runs:
            per_round = (None if r["rounds"] in (None, 0) or r["overhead_s"] is None
                         else r["overhead_s"] / r["rounds"])
            lines.append(f"| {r['chain']} | {r['steps']} | {r['batch']} | {r['method']} | "
                         f"{_secs(r['wall_s'])} | {_num(r['speedup_vs_serial'], '.2f')} | "
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
            lines.append(f"| {r['chain']} | {r['steps']} | {r['batch']} | {r['method']} | "
                         f"{_secs(r['wall_s'])} | {_num(r['speedup_vs_serial'], '.2f')} | "
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
    lines += ["", "## Projected (computed from measured call times, not measured)", "",
              "| chain | S | B | method | sequential calls | call s (B images) | "
              "batched call s (W x B images) | batched / single | projected s | ideal s | "
              "ideal speed-up |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        speedup = None if not r["sequential_calls"] else r["steps"] / r["sequential_calls"]
        if speed_only:
            speedup, r = None, dict(r, ideal_s=None)         # no convergence numbers
        lines.append(f"| {r['chain']} | {r['steps']} | {r['batch']} | {r['method']} | "
                     f"{r['sequential_calls']} | {_secs(r['call_s'])} | "
                     f"{_secs(r['batched_call_s'])} | {_num(r['batch_cost_ratio'], '.1f')} | "
                     f"{_secs(r['projected_s'])} | {_secs(r['ideal_s'])} | "
                     f"{_num(speedup, '.1f')}{'' if speedup is None else 'x'} |")
    lines += ["", "sequential calls: rounds, plus one call for the jump initial guess (serial: "
                  "S). projected: rounds x the batched call measured on this device, plus the "
                  "jump guess's call (serial: S x the single call); on a GPU this is the "
                  "projected GPU time. ideal: sequential calls x the single call, i.e. if a "
                  "batch of W x B images cost no more than one call on B images (a GPU below "
                  "saturation): an assumption. ideal speed-up: S / sequential calls."]
    lines += ["", "## GPU telemetry (nvidia-ml-py)", ""]
    nv = meta["nvml"]
    if nv["available"]:
        lines += [f"{nv['name']}, sampled every 20 ms in a background thread during each timed "
                  f"run; device memory counts every process on the GPU.", "",
                  "| chain | S | B | method | GPU memory used MB | SM util mean % | SM util max % | "
                  "power mean W | energy J | energy per image J | energy source |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in runs:
            lines.append(f"| {r['chain']} | {r['steps']} | {r['batch']} | {r['method']} | "
                         f"{_num(r['gpu_mem_used_mb'], '.0f')} | {_num(r['sm_util_mean'], '.0f')} | "
                         f"{_num(r['sm_util_max'], '.0f')} | {_num(r['power_mean_w'], '.0f')} | "
                         f"{_num(r['energy_j'], '.3g')} | {_num(r['energy_per_image_j'], '.3g')} | "
                         f"{r['energy_source'] or '-'} |")
    else:
        lines.append(f"No NVML readings: {nv['reason']}.")
    if loops:
        lines += ["", "## Serial loops: diffusers' DDIMScheduler loop vs our serial sampler", "",
                  "The same network, scheduler and noise: diffusers' loop "
                  "(`for t in scheduler.timesteps: x = scheduler.step(unet(x, t).sample, t, x).prev_sample`)"
                  " against `dq.sample_serial` on `dq.DDIM.from_diffusers(scheduler, S)`, "
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
    lines += ["", "## Parity failures", ""]
    if speed_only:
        lines.append("Not checked: speed only.")
    elif report["failures"]:
        lines += [f"- {f}" for f in report["failures"]]
    else:
        lines.append("None: every parallel result converged within 2/255 of the serial sampler's.")
    return "\n".join(lines) + "\n"


# -- plots ----------------------------------------------------------------------------------------
_COLORS = {SERIAL: "black", OURS: "tab:blue", "ParaDiGMS": "tab:orange", "DeqIR": "tab:green",
           "ParaTAA": "tab:red"}
_MARKERS = {SERIAL: "o", OURS: "s", "ParaDiGMS": "^", "DeqIR": "v", "ParaTAA": "D"}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _panels(plt, n: int):
    cols = 2 if n > 1 else 1
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 3.7 * rows + 1.9), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _finish(fig, plt, path: Path, title: str, caption: str) -> None:
    """A takeaway title, one legend for every panel under it, a caption at the bottom."""
    import textwrap
    handles, labels = {}, []
    for ax in fig.axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    width, height = fig.get_figwidth(), fig.get_figheight()
    title_lines = [w for line in title.split("\n") for w in textwrap.wrap(line, int(width * 9.5))]
    lines = textwrap.wrap(caption, int(width * 12.5))
    ncol = min(len(labels), 3) or 1
    top = 0.2 + 0.22 * len(title_lines) + (0.1 + 0.19 * math.ceil(len(labels) / ncol)
                                             if labels else 0)        # inches
    bottom = 0.15 + 0.15 * len(lines)
    # Lay the panels out first: tight_layout would otherwise make room for the title twice.
    fig.tight_layout(rect=(0, bottom / height, 1, 1 - top / height))
    fig.suptitle("\n".join(title_lines), fontsize=11.5, y=1 - 0.08 / height, va="top")
    if labels:
        fig.legend([handles[lab] for lab in labels], labels, loc="upper center", fontsize=8.5,
                   ncol=ncol, frameon=False,
                   bbox_to_anchor=(0.5, 1 - (0.14 + 0.22 * len(title_lines)) / height))
    fig.text(0.5, 0.008, "\n".join(lines), ha="center", va="bottom", fontsize=8, color="0.25")
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def _steps_axis(ax, steps, log_y: bool = True) -> None:
    """Log axes labelled in plain numbers: x ticks at the measured S."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(sorted(steps)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(plain)
    if log_y:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="major", alpha=0.3)


def _by_chain(runs: List[dict], batch: int):
    out: Dict[str, List[dict]] = {}
    for r in runs:
        if r["batch"] == batch:
            out.setdefault(r["chain"], []).append(r)
    return out


def _series(rows: List[dict], method: str, key: str):
    pts = sorted((r["steps"], r[key], i) for i, r in enumerate(rows)
                 if r["method"] == method and r[key] is not None)
    return [p[0] for p in pts], [p[1] for p in pts], [rows[p[2]] for p in pts]


def _methods(report: dict) -> List[str]:
    return [SERIAL] + list(report["meta"]["config"]["peers"])


def time_takeaway(report: dict, batch: int) -> str:
    runs = [r for r in report["runs"] if r["batch"] == batch and r["wall_s"] is not None]
    par = [r for r in runs if r["method"] != SERIAL]
    ratios = [r["ratio"] for r in report["loops"] if r["ratio"]]
    loops = ""
    if ratios:
        span = f"{min(ratios):.2f}" if len(ratios) == 1 else f"{min(ratios):.2f}-{max(ratios):.2f}"
        verdict = "no slower than" if max(ratios) <= 1 else "not always faster than"
        loops = (f"our serial sampler is {verdict} diffusers' DDIMScheduler loop "
                 f"(time ratio {span} over every S and B)")
    if not par:
        return ("Measured: " + loops) if loops else "Wall time per solve against the number of steps S"
    meta = report["meta"]
    where = "on this CPU" if meta["device"] == "cpu" else f"on {meta['device_name']}"
    wins = [r for r in par if r["speedup_vs_serial"] and r["speedup_vs_serial"] > 1]
    ours = [r for r in par if r["method"] == OURS and r["speedup_vs_serial"]]
    if not wins:
        slow = [1 / r["speedup_vs_serial"] for r in ours]
        head = f"Measured {where}, serial is faster than every parallel solve at every S"
        if slow:
            head += f" (deqir_fast {min(slow):.1f}-{max(slow):.1f}x slower)"
    elif len(wins) == len(par):
        head = f"Measured {where}, every parallel solve is faster than serial at every S"
    else:
        best = max(wins, key=lambda r: r["speedup_vs_serial"])
        head = (f"Measured {where}, parallel is faster than serial in {len(wins)} of {len(par)} "
                f"runs (best {best['speedup_vs_serial']:.1f}x: {best['method']}, {best['chain']}, "
                f"S={best['steps']})")
    fraction = meta.get("batch_cost_fraction")
    tail = []
    if fraction is not None:
        tail.append(f"a round's batched call costs {fraction:.0%} of its calls made one by one")
    ideal = [r["steps"] / r["sequential_calls"] for r in ours if r["sequential_calls"]]
    if ideal and not meta["speed_only"]:
        tail.append(f"if a batch cost one call (dotted, an assumption) deqir_fast would be "
                    f"{min(ideal):.1f}-{max(ideal):.1f}x faster than serial")
    if loops:
        tail.append(loops)
    return head + ("\n" + "; ".join(tail) if tail else "")


def plot_time(report: dict, path: Path) -> None:
    plt = _pyplot()
    batch = min(r["batch"] for r in report["runs"])
    chains = _by_chain(report["runs"], batch)
    fig, axes = _panels(plt, len(chains))
    for ax, (chain, rows) in zip(axes, chains.items()):
        for m in _methods(report):
            xs, ys, _ = _series(rows, m, "wall_s")
            if xs:
                label = "serial sampler, measured" if m == SERIAL else f"{m}, measured"
                ax.plot(xs, ys, color=_COLORS.get(m), marker=_MARKERS.get(m, "o"),
                        linewidth=2.4 if m in (SERIAL, OURS) else 1.1, label=label)
        loop = sorted((r["steps"], r["diffusers_s"]) for r in report["loops"]
                      if r["batch"] == batch and r["diffusers_s"] is not None)
        if chain == "DDIM" and loop:
            ax.plot(*zip(*loop), color="tab:purple", marker="x", linestyle="-.", linewidth=1.6,
                    label="diffusers' DDIMScheduler loop, measured")
        xs, ys, _ = _series(rows, OURS, "projected_s")
        if xs:
            ax.plot(xs, ys, color=_COLORS[OURS], linestyle="--", linewidth=1.3,
                    label=f"{OURS}, projected: rounds x measured batched call")
        xs, ys, _ = _series(rows, OURS, "ideal_s")
        if xs and not report["meta"]["speed_only"]:
            ax.plot(xs, ys, color=_COLORS[OURS], linestyle=":", linewidth=2.2,
                    label=f"{OURS}, ideal: rounds x one B-image call (assumption)")
        _steps_axis(ax, {r["steps"] for r in rows})
        ax.set_xlabel("sampling steps S")
        ax.set_ylabel("wall time per solve (s, log scale)")
        ax.set_title(f"{chain}, batch {batch}", fontsize=10)
    meta = report["meta"]
    parts = ["Solid: measured wall time of one solve, the median of the timed runs after a "
             f"warm-up run, on {meta['device']} ({meta['device_name']}, {meta['torch_threads']} "
             "torch threads)."]
    if report["loops"]:
        parts.append("Dash-dot (DDIM): diffusers' DDIMScheduler loop on the same network and "
                     "noise, measured in turns with our serial sampler.")
    if any(r["method"] == OURS for r in report["runs"]):
        parts.append("Dashed: projected, rounds x the measured time of one model call on the "
                     "W x B images of a round (+ the jump guess's call).")
        if not meta["speed_only"]:
            parts.append("Dotted: projected as if that batch cost no more than one call on B "
                         "images, as on a GPU below saturation: an assumption, not a measurement.")
    _finish(fig, plt, path, time_takeaway(report, batch), " ".join(parts))


def rounds_takeaway(report: dict, batch: int) -> str:
    rows = [r for r in report["runs"] if r["batch"] == batch and r["method"] == OURS
            and r["rounds"]]
    if not rows:
        return "Sequential rounds against the number of steps S"
    S = max(r["steps"] for r in rows)
    at = [r for r in rows if r["steps"] == S]
    parts = ", ".join(f"{r['rounds']} ({r['chain']})" for r in at)
    frac = [r["rounds"] / r["steps"] for r in rows]
    span = f"{min(frac):.0%}" if round(min(frac), 2) == round(max(frac), 2) else \
        f"{min(frac):.0%}-{max(frac):.0%}"
    return (f"Sequential model calls: at S={S} deqir_fast needs {parts} rounds where serial "
            f"needs {S};\nover every S measured it needs {span} of S")


def plot_rounds(report: dict, path: Path) -> None:
    plt = _pyplot()
    batch = min(r["batch"] for r in report["runs"])
    chains = _by_chain(report["runs"], batch)
    fig, axes = _panels(plt, len(chains))
    peers = list(report["meta"]["config"]["peers"])
    n = len(peers)
    for ax, (chain, rows) in zip(axes, chains.items()):
        steps = sorted({r["steps"] for r in rows})
        ax.plot(steps, steps, color="0.65", linewidth=6, alpha=0.5, solid_capstyle="butt",
                label="serial sampler: S model calls")
        for k, m in enumerate(peers):
            xs, ys, rs = _series(rows, m, "rounds")
            if not xs:
                continue
            nudge = [x * (1 + 0.025 * (k - (n - 1) / 2)) for x in xs]   # keep markers apart
            ax.plot(nudge, ys, color=_COLORS.get(m), linewidth=2.4 if m == OURS else 1.1,
                    marker=_MARKERS.get(m, "o"), markersize=6, label=m)
            bad = [(x, y) for x, y, r in zip(nudge, ys, rs) if not r["parity_ok"]]
            if bad:
                ax.scatter(*zip(*bad), facecolors="white", edgecolors=_COLORS.get(m),
                           marker=_MARKERS.get(m, "o"), s=60, linewidths=1.6, zorder=3)
        ax.scatter([], [], facecolors="white", edgecolors="0.3", marker="o", s=60,
                   label="hollow marker: that run failed parity (not converged, or > 2/255 off)")
        _steps_axis(ax, steps)
        ax.set_xlabel("sampling steps S")
        ax.set_ylabel("sequential rounds (log scale)")
        ax.set_title(f"{chain}, batch {batch}", fontsize=10)
    _finish(fig, plt, path, rounds_takeaway(report, batch),
            "Rounds of each parallel solve (one batched model call each: the sequential depth of "
            "the solve) against the serial sampler's S model calls (grey diagonal). Below the "
            "diagonal a GPU, where a batch costs about one call, can finish sooner than serial; "
            "on the diagonal the parallel solve only adds work. Markers are nudged sideways to "
            "stay apart.")


def plot_residuals(report: dict, path: Path) -> None:
    plt = _pyplot()
    batch = min(r["batch"] for r in report["runs"])
    S = max(r["steps"] for r in report["runs"])
    rows = [r for r in report["runs"] if r["batch"] == batch and r["steps"] == S
            and r["method"] != SERIAL]
    chains = _by_chain(rows, batch)
    fig, axes = _panels(plt, len(chains))
    summary: Dict[str, list] = {}
    for ax, (chain, rs) in zip(axes, chains.items()):
        tols: Dict[float, List[str]] = {}
        for r in rs:
            trace = [float("nan") if v is None else max(v, 1e-12) for v in r["residuals"] or []]
            if not trace:
                continue
            m = r["method"]
            ax.semilogy(range(1, len(trace) + 1), trace, color=_COLORS.get(m),
                        marker=_MARKERS.get(m, "o"), markersize=3.5,
                        linewidth=2.4 if m == OURS else 1.1, label=m)
            end = "" if r["parity_ok"] else ", failed parity"
            ax.annotate(f"{r['rounds']}{end}", (len(trace), trace[-1]), fontsize=7,
                        color=_COLORS.get(m), xytext=(3, 0), textcoords="offset points",
                        va="center")
            tols.setdefault(_tol_of(r), []).append(m)
            summary.setdefault(m, []).append((chain, r["rounds"], r["parity_ok"]))
        for tol, ms in tols.items():
            ax.axhline(tol, color="0.35", linestyle="--", linewidth=0.8)
            ax.annotate(f"tol {tol:g}: {', '.join(ms)}", (0.01, tol),
                        xycoords=("axes fraction", "data"), ha="left", va="bottom", fontsize=7,
                        color="0.35")
        ax.axvline(S, color="0.6", linestyle=":", linewidth=1.2)
        ax.set_xlim(0.5, S * 1.08 + 1)
        ax.set_xlabel(f"solver round (dotted: S = {S}, the serial sampler's calls)")
        ax.set_ylabel("largest residual, active steps (log)")
        ax.set_title(f"{chain}, S={S}, batch {batch}", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
    _finish(fig, plt, path, residual_takeaway(summary, S),
            "After each round of the parallel solve: the largest per-step residual "
            "max|F(X)_i - X_i| / max(noise level_i, 0.1) among the steps not yet frozen; the "
            "number at the end of a line is the solve's rounds. A solve stops once every step "
            "is under its tolerance (dashed; each configuration has its own); a line that ends "
            "above it ran S rounds (every step frozen, so exact) or hit its round budget.")


def _tol_of(row: dict) -> float:
    settings = row["settings"] if isinstance(row["settings"], dict) else {}
    return float(settings.get("tol", dq.api.DEFAULT_TOL))


def residual_takeaway(summary: Dict[str, list], S: int) -> str:
    if not summary:
        return f"Residual per round at S={S}"
    chains = sorted({c for items in summary.values() for c, _, _ in items})
    fewest = {}
    for m, items in summary.items():
        for chain, rounds, ok in items:
            if ok and (chain not in fewest or rounds < fewest[chain][1]):
                fewest[chain] = (m, rounds)
    wins = [m for m, _ in fewest.values()]
    if wins:
        best = max(dict.fromkeys(wins), key=wins.count)
        head = (f"Residual per round at S={S}: {best} reaches parity in the fewest rounds on "
                f"{wins.count(best)} of {len(chains)} chains")
    else:
        head = f"Residual per round at S={S}: no run reached parity"
    failed = {m: sum(not ok for _, _, ok in items) for m, items in summary.items()}
    tail = "; ".join(f"{m} failed parity on {n} of {len(summary[m])}"
                     for m, n in failed.items() if n) or "every run reached parity"
    return f"{head}\n{tail}"


# -- command line ---------------------------------------------------------------------------------
def _int_list(text: str) -> List[int]:
    import argparse
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"must be comma-separated integers >= 1, got {text!r}")
    return values


def _names(text: str) -> List[str]:
    import argparse
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError("needs at least one name")
    return values


DESCRIPTION = """\
Benchmark serial against parallel sampling end to end: for each chain (DDIM, DDPM, DDRM,
DDNM), number of steps S and batch size B, the serial sampler, the parallel solve in each
peer configuration (deqir_fast = our default; ParaDiGMS, DeqIR, ParaTAA as configurations
of our solver) and, for DDIM, diffusers' DDIMScheduler loop on the same network. Reports
median wall times, rounds, model evaluations, peak memory, max|x0 - serial| with a parity
verdict, projected times (labelled as such) and, on an NVIDIA GPU, NVML readings. Writes
bench.md, bench.json and three plots into --out. Exit status 1 when our own solver misses
parity (not converged, or more than 2/255 from serial)."""

EXAMPLES = """\
examples:
  OMP_NUM_THREADS=1 deqir-fast bench                           # bundled model, a few minutes
  deqir-fast bench --model gmm --steps 10,100,1000 --peers deqir_fast
  deqir-fast bench --model path/to/unet_folder --chains DDIM --steps 50 --batch 1,8
  deqir-fast bench --model random256 --chains DDIM --steps 10   # overhead, speed only
  deqir-fast bench --device cuda --steps 10,100,1000 --batch 1,8"""


def add_bench_arguments(p) -> None:
    """The ``bench`` subcommand's own options (the command line adds --seed, --device,
    --quiet, --verbose)."""
    g = p.add_argument_group("what to measure")
    g.add_argument("--model", default="bundled", metavar="NAME|FOLDER",
                   help=f"{', '.join(NAMED_MODELS)} (random64/random256: a randomly initialised "
                        f"UNet, speed only), or a diffusers UNet2DModel folder (its scheduler "
                        f"config sets the schedule)")
    g.add_argument("--chains", type=_names, default=",".join(DEFAULT_CHAINS), metavar="LIST",
                   help="chain kinds: DDIM, DDPM (eta 1), DDRM (inpainting, 70%% missing, "
                        "sigma_y 0.05), DDNM (SR x2), or calibration chain names: "
                        + ", ".join(calibration.CHAIN_NAMES))
    g.add_argument("--steps", type=_int_list, default=",".join(map(str, DEFAULT_STEPS)), metavar="LIST",
                   help="numbers of sampling steps S, e.g. 10,100,1000")
    g.add_argument("--batch", type=_int_list, default=",".join(map(str, DEFAULT_BATCHES)), metavar="LIST",
                   help="batch sizes B, e.g. 1,4,8")
    g.add_argument("--peers", type=_names, default=",".join(DEFAULT_PEERS), metavar="LIST",
                   help=f"parallel configurations (deqir_fast.peers): {', '.join(PEERS)}; "
                        f"none: the serial sampler (and loops) only")
    g.add_argument("--repeats", type=int, default=3, metavar="N",
                   help="timed runs per method after the warm-up run (medians)")
    g.add_argument("--tol", type=float, default=None,
                   help="deqir_fast's tolerance (default: solve's default); peers keep theirs")
    g.add_argument("--window", type=int, default=None, metavar="W",
                   help="steps per round for every parallel method (default: all S)")
    g.add_argument("--no-loops", action="store_true",
                   help="skip diffusers' DDIMScheduler loop (run with DDIM)")
    g.add_argument("--speed-rounds", type=int, default=2, metavar="N",
                   help="speed-only models: rounds per timed parallel solve")
    g.add_argument("--gmm-size", type=int, default=32, metavar="N",
                   help="image size of the Gaussian-mixture model")
    g.add_argument("--random-channels", type=_int_list, default=",".join(map(str, RANDOM_CHANNELS)),
                   metavar="LIST", help="block_out_channels of the random UNet (its cost)")
    g.add_argument("--max-load", type=float, default=None, metavar="L",
                   help="before each configuration, wait (up to --max-wait) until the "
                        "1-minute load average is below L; the load is recorded either way")
    g.add_argument("--max-wait", type=float, default=900.0, metavar="SECONDS",
                   help="the longest wait for --max-load, per configuration")
    g.add_argument("--out", default="bench_out", metavar="FOLDER",
                   help="folder for bench.md, bench.json, bench_time.png, bench_rounds.png, "
                        "bench_residuals.png")
    g.add_argument("--no-plots", action="store_true", help="write no plots")


def config_from_args(args) -> BenchConfig:
    for flag, value, low in (("--repeats", args.repeats, 0), ("--speed-rounds", args.speed_rounds, 1),
                             ("--gmm-size", args.gmm_size, 4)):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if args.window is not None and args.window < 1:
        raise ValueError(f"--window must be >= 1, got {args.window}")
    if args.tol is not None and not (math.isfinite(args.tol) and args.tol >= 0):
        raise ValueError(f"--tol must be a number >= 0, got {args.tol}")
    if args.peers == ["none"]:
        args.peers = []
    for name in args.peers:
        if name not in PEERS:
            raise ValueError(f"--peers: unknown peer {name!r}; known: {', '.join(PEERS)}")
    select_chains(args.chains)
    model = args.model
    if model not in NAMED_MODELS and not Path(model).is_dir():
        raise ValueError(_unknown_model(model))
    return BenchConfig(model=model, chains=list(args.chains), steps=list(args.steps),
                       batches=list(args.batch), peers=list(args.peers), repeats=args.repeats,
                       tol=args.tol, window=args.window, loops=not args.no_loops,
                       speed_rounds=args.speed_rounds, gmm_size=args.gmm_size,
                       random_channels=list(args.random_channels), device=str(args.device),
                       seed=args.seed, max_load=args.max_load, max_wait=args.max_wait,
                       out=args.out)


def write_report(report: dict, out: Path, plots: bool = True) -> List[Path]:
    """bench.md, bench.json and (``plots``) the three figures, written together."""
    from . import image_io as io
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
    io.write_all(writers)
    return [p for p, _ in writers]


def _finite(obj):
    """NaN/inf -> None, so the JSON is strict."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def run_cli(args) -> int:
    """``deqir-fast bench``."""
    from . import image_io as io
    cfg = config_from_args(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out} is a file, not a folder")
    io.check_folder_writable(out, f"--out {args.out}")

    def note(text: str) -> None:
        if not args.quiet:
            print(f"note: {text}", file=sys.stderr, flush=True)

    def progress(total: int):
        from tqdm.auto import tqdm
        return tqdm(total=total, desc="bench", unit="run", disable=args.quiet, file=sys.stderr)

    report = _finite(run_benchmark(cfg, progress=progress, note=note))
    written = write_report(report, out, plots=not args.no_plots)
    print(markdown(report))
    print("wrote " + ", ".join(str(p) for p in written))
    if report["failures"]:
        print(f"deqir-fast bench: {len(report['failures'])} parity failure(s):", file=sys.stderr)
        for f in report["failures"]:
            print(f"  {f}", file=sys.stderr)
    if report["ours_failed"]:
        print("deqir-fast bench: our solver missed parity (see above); exit status 1",
              file=sys.stderr)
        return 1
    return 0
