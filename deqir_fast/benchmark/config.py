"""What ``deqir-fast bench`` measures: its configuration (``BenchConfig``, and the command
line that reruns it), the chain kinds, the methods, the parity threshold and the fields of
the report's rows."""
from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from typing import List, Optional, Sequence

from .. import calibration
from ..peers import PEERS
from ..telemetry import GPU_FIELDS

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
    "residuals", "window", "plan_windows", "plan_curve", "call_s", "batched_call_s",
    "batch_cost_ratio", "projected_s", "ideal_s",
    "peak_mem_mb", "mem_added_mb", "mem_kind", "load_1m",
) + GPU_FIELDS + ("energy_per_image_j",)
LOOP_FIELDS = (
    "model", "steps", "batch", "repeats", "diffusers_s", "ours_s", "ratio", "diffusers_runs",
    "ours_runs", "model_s_diffusers", "model_s_ours", "overhead_s_diffusers", "overhead_s_ours",
    "max_abs_diff", "parity_ok", "load_1m",
)


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
