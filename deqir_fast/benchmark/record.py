"""What a report records besides its rows, so that every number traces to how it was made:
the command that reruns it, the date, versions and commit, the machine and its load, the
model, and what the measured batch cost says about a CPU's numbers."""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
from dataclasses import fields
from pathlib import Path
from typing import List, Optional

import torch

import deqir_fast as dq

from ..telemetry import nvml_status
from .config import GREY, SERIAL, BenchConfig
from .models import BenchModel

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


def _git_commit() -> Optional[str]:
    """The commit of a source checkout the package runs from (an editable install);
    None for an installed copy, which may sit inside some other repository."""
    root = Path(__file__).resolve().parents[2]
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


def _jsonable(v):
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v if isinstance(v, (int, float, str, bool, type(None))) else str(v)


def run_meta(cfg: BenchConfig, bm: BenchModel, device: torch.device,
             started: datetime.datetime, loads: List[Optional[float]], runs: List[dict]) -> dict:
    """The report's ``meta``: how, where and on what it was measured."""
    fraction = batch_cost_fraction(runs)
    loads = [v for v in loads if v is not None]
    return {
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
