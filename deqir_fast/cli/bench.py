"""``deqir-fast bench``: its options, checked into a ``benchmark.BenchConfig``, and the run:
measure (``benchmark.run_benchmark``), write bench.md, bench.json and the plots, print the
report, and exit with status 1 when our own solver misses parity. The harness itself is
the package ``deqir_fast.benchmark``."""
from __future__ import annotations

import math
import sys
from pathlib import Path

from .. import benchmark
from .. import image_io as io
from ..benchmark import (DEFAULT_BATCHES, DEFAULT_CHAINS, DEFAULT_PEERS, DEFAULT_STEPS,
                         NAMED_MODELS, RANDOM_CHANNELS, BenchConfig, select_chains,
                         unknown_model)
from ..calibration import CHAIN_NAMES
from ..peers import PEERS
from .options import add_run_options, int_list, name_list
from .reporting import Reporter

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
    g.add_argument("--chains", type=name_list, default=",".join(DEFAULT_CHAINS), metavar="LIST",
                   help="chain kinds: DDIM, DDPM (eta 1), DDRM (inpainting, 70%% missing, "
                        "sigma_y 0.05), DDNM (SR x2), or calibration chain names: "
                        + ", ".join(CHAIN_NAMES))
    g.add_argument("--steps", type=int_list, default=",".join(map(str, DEFAULT_STEPS)), metavar="LIST",
                   help="numbers of sampling steps S, e.g. 10,100,1000")
    g.add_argument("--batch", type=int_list, default=",".join(map(str, DEFAULT_BATCHES)), metavar="LIST",
                   help="batch sizes B, e.g. 1,4,8")
    g.add_argument("--peers", type=name_list, default=",".join(DEFAULT_PEERS), metavar="LIST",
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
    g.add_argument("--random-channels", type=int_list, default=",".join(map(str, RANDOM_CHANNELS)),
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


def add_arguments(b) -> None:
    """bench's options: what to measure, and the run options every command has."""
    b.description, b.epilog = DESCRIPTION, EXAMPLES
    add_bench_arguments(b)
    add_run_options(b)


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
        raise ValueError(unknown_model(model))
    return BenchConfig(model=model, chains=list(args.chains), steps=list(args.steps),
                       batches=list(args.batch), peers=list(args.peers), repeats=args.repeats,
                       tol=args.tol, window=args.window, loops=not args.no_loops,
                       speed_rounds=args.speed_rounds, gmm_size=args.gmm_size,
                       random_channels=list(args.random_channels), device=str(args.device),
                       seed=args.seed, max_load=args.max_load, max_wait=args.max_wait,
                       out=args.out)


def run_bench(args) -> int:
    """``deqir-fast bench``."""
    cfg = config_from_args(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out} is a file, not a folder")
    io.check_folder_writable(out, f"--out {args.out}")

    def progress(total: int):
        from tqdm.auto import tqdm
        return tqdm(total=total, desc="bench", unit="run", disable=args.quiet, file=sys.stderr)

    report = benchmark.finite(benchmark.run_benchmark(cfg, progress=progress,
                                                     note=Reporter(args.quiet).note))
    written = benchmark.write_report(report, out, plots=not args.no_plots)
    print(benchmark.markdown(report))
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
