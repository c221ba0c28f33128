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

The package, one concern a module (imports go down this list): ``config`` (what is
measured: ``BenchConfig``, chain kinds, report fields), ``models`` (the models measured),
``timing`` (clocks, turns, load), ``loops`` (diffusers' DDIMScheduler loop against ours),
``record`` (the report's ``meta``), ``runner`` (``run_config``, ``run_benchmark``),
``plots`` and ``report`` (bench.md, bench.json and the plots). The command line's options
are ``deqir_fast.cli.bench``.
"""
from .config import (CHAIN_ALIASES, DEFAULT_BATCHES, DEFAULT_CHAINS, DEFAULT_PEERS,
                     DEFAULT_STEPS, GREY, LOOP_FIELDS, NAMED_MODELS, OURS, RANDOM_CHANNELS,
                     RUN_FIELDS, SERIAL, BenchConfig, kind_of, select_chains)
from .loops import diffusers_scheduler, run_loops
from .models import BenchModel, load_model, random_unet, smooth_images, unknown_model
from .plots import (plot_residuals, plot_rounds, plot_time, residual_takeaway,
                    rounds_takeaway, time_takeaway)
from .record import batch_cost_fraction, cpu_note, run_meta
from .report import finite, markdown, settings_text, write_report
from .runner import (SETTING_KEYS, _gpu_summary, call_times, effective_settings, measure_all,
                     run_benchmark, run_config)
from .timing import ModelClock, Timed, load_1m, median_call, take_turns, timed, wait_for_load

__all__ = [
    "BenchConfig", "BenchModel", "CHAIN_ALIASES", "DEFAULT_BATCHES", "DEFAULT_CHAINS",
    "DEFAULT_PEERS", "DEFAULT_STEPS", "GREY", "LOOP_FIELDS", "ModelClock", "NAMED_MODELS",
    "OURS", "RANDOM_CHANNELS", "RUN_FIELDS", "SERIAL", "SETTING_KEYS", "Timed",
    "batch_cost_fraction", "call_times", "cpu_note", "diffusers_scheduler",
    "effective_settings", "finite", "kind_of", "load_1m", "load_model", "markdown",
    "measure_all", "median_call", "plot_residuals", "plot_rounds", "plot_time",
    "random_unet", "residual_takeaway", "rounds_takeaway", "run_benchmark", "run_config",
    "run_loops", "run_meta", "select_chains", "settings_text", "smooth_images",
    "take_turns", "time_takeaway", "timed", "unknown_model", "wait_for_load", "write_report",
]
