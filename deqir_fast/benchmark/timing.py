"""How ``deqir-fast bench`` times: one run with the time inside model calls, peak memory
and NVML readings (``timed``), methods taking turns after a warm-up run (``take_turns``),
the median time of one model call, and the machine's load."""
from __future__ import annotations

import os
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..telemetry import GPU_FIELDS, GpuMonitor, PeakMemory


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


def take_turns(methods: Dict[str, Callable[[], Timed]], repeats: int, progress,
               label: str) -> Tuple[Dict[str, Timed], Dict[str, List[Timed]]]:
    """Each method once untimed (the warm-up: the results of record), then ``repeats``
    timed runs, the methods taking turns (each round starts one later) so that drift in
    the machine's speed hits them alike. Returns (warm-up run, timed runs) per method;
    ``progress`` (tqdm-like) advances by one a run, its postfix ``label`` and the run."""
    first: Dict[str, Timed] = {}
    for m, run in methods.items():                     # warm-up: the results of record
        progress.set_postfix_str(f"{label} {m} (warm-up)")
        first[m] = run()
        progress.update(1)
    names = list(methods)
    runs: Dict[str, List[Timed]] = {m: [] for m in names}
    for r in range(repeats):                           # timed: methods take turns
        order = names[r % len(names):] + names[:r % len(names)]
        for m in order:
            progress.set_postfix_str(f"{label} {m} ({r + 1}/{repeats})")
            runs[m].append(methods[m]())
            progress.update(1)
    return first, runs


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
