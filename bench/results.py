"""Regenerate every CPU table that comes from ``deqir-fast bench`` into bench/results/.

One harness run per table, each in its own process, writing bench/results/NAME/ (bench.md
headed by the command that made it, bench.json, and the plots); bench/results/README.md
lists them.

    OMP_NUM_THREADS=1 python bench/results.py                  # every table (about 45 min, 2 CPU cores)
    OMP_NUM_THREADS=1 python bench/results.py --only bundled,loops
    OMP_NUM_THREADS=1 python bench/results.py --max-load 1.3   # wait for a quiet machine first

Every run waits (up to 15 minutes per configuration) until the 1-minute load average is
below --max-load before timing, and records the load it timed at. bench/RESULTS.md
quotes these files.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# name: (what the table shows, the bench arguments)
TABLES = {
    "bundled": ("Serial vs parallel end to end on the bundled UNet: every chain, the peers side "
                "by side, S = 10, 20, 50, batch 1",
                ["--model", "bundled", "--steps", "10,20,50", "--no-loops"]),
    "loops": ("Our serial sampler against diffusers' DDIMScheduler loop, same UNet and noise",
              ["--model", "bundled", "--chains", "DDIM", "--steps", "10,50,100", "--batch", "1,8",
               "--peers", "none", "--repeats", "5"]),
    "random64": ("Overhead on a randomly initialised UNet at 64x64 (speed only)",
                 ["--model", "random64", "--chains", "DDIM,DDRM", "--steps", "10"]),
    "random256": ("Overhead on a randomly initialised UNet at 256x256 (speed only)",
                  ["--model", "random256", "--chains", "DDIM", "--steps", "10",
                   "--peers", "deqir_fast", "--repeats", "2"]),
    "bundled_long": ("S = 100 on the bundled UNet, every chain, our default solve, one timed run",
                     ["--model", "bundled", "--steps", "100", "--peers", "deqir_fast",
                      "--repeats", "1", "--no-loops"]),
    "bundled_batch": ("Batch sizes 1, 4, 8 on the bundled UNet, DDIM and DDRM at S = 20",
                      ["--model", "bundled", "--chains", "DDIM,DDRM", "--steps", "20",
                       "--batch", "1,4,8", "--peers", "deqir_fast", "--no-loops"]),
    "gmm": ("The exact Gaussian-mixture denoiser (3x32x32): every chain, the peers side by "
            "side, S = 10, 100",
            ["--model", "gmm", "--steps", "10,100", "--no-loops"]),
    "gmm_1000": ("The Gaussian-mixture denoiser at S = 1000, every chain, our default solve "
                 "(the peers need up to 700 rounds on DDRM-1000 here)",
                 ["--model", "gmm", "--steps", "1000", "--peers", "deqir_fast", "--no-loops"]),
    "bundled_1000": ("DDIM-1000 on the bundled UNet, our default solve, one timed run",
                     ["--model", "bundled", "--chains", "DDIM", "--steps", "1000",
                      "--peers", "deqir_fast", "--repeats", "1", "--no-loops"]),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help=f"comma-separated tables: {', '.join(TABLES)}")
    p.add_argument("--max-load", type=float, default=1.3)
    p.add_argument("--max-wait", type=float, default=7200.0,
                   help="the longest wait for --max-load per configuration, seconds")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()
    names = [n for n in args.only.split(",") if n] or list(TABLES)
    unknown = [n for n in names if n not in TABLES]
    if unknown:
        p.error(f"unknown tables {unknown}; known: {', '.join(TABLES)}")
    out = Path(args.out)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    failed = []
    for name in names:
        what, bench_args = TABLES[name]
        folder = out / name
        cmd = [sys.executable, "-m", "deqir_fast", "bench", *bench_args, "--device", "cpu",
               "--max-load", f"{args.max_load:g}", "--max-wait", f"{args.max_wait:g}",
               "--out", str(folder)]
        print(f"== {name}: {what}", flush=True)
        t0 = time.perf_counter()
        code = subprocess.run(cmd, env=env).returncode
        print(f"   exit {code} after {time.perf_counter() - t0:.0f} s -> {folder}/bench.md",
              flush=True)
        if code != 0:
            failed.append(name)
    write_index(out)
    if failed:
        print(f"failed (exit status != 0): {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


def write_index(out: Path) -> None:
    """bench/results/README.md: every table present, what it shows and its command."""
    lines = ["# deqir-fast bench results (CPU)", "",
             "Regenerate every table here with `OMP_NUM_THREADS=1 python bench/results.py` "
             "(one table: `--only NAME`). Each folder holds `bench.md` (the tables, headed by "
             "the exact command, machine and load), `bench.json` (every field) and the plots.", "",
             "| table | what | command |", "|---|---|---|"]
    for name, (what, _) in TABLES.items():
        md = out / name / "bench.md"
        if not md.is_file():
            continue
        command = next((line.strip("`") for line in md.read_text().splitlines()
                        if line.startswith("`") and "deqir-fast bench" in line), "")
        lines.append(f"| [{name}]({name}/bench.md) | {what} | `{command}` |")
    (out / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
