"""The options the commands share and the types that check one option's value: every
number finite, counts and the seed in range, devices and tasks known, so that a mistake
is a usage error before any model loads.

Only the standard library at module level: these types run while the command line is
parsed. The few that need the package (a device, a task, the solver defaults) import it
when called, which happens only once a subcommand is chosen."""
from __future__ import annotations

import argparse
import math
from typing import List

SAMPLERS = ("ddrm", "ddnm")
# torch.Generator.manual_seed takes integers up to 2**64 - 1; the draws add small offsets
# to --seed (common.py's MEASUREMENT_SEED, X_T_SEED, CHAIN_NOISE_SEED, and 10 per batch
# of inputs), so 2**63 - 1 leaves them room.
MAX_SEED = 2 ** 63 - 1
# Options of the parallel solve, which a serial run does not use.
SOLVER_OPTIONS = (("solver", "--solver"), ("linearize", "--linearize"), ("tol", "--tol"),
                  ("window", "--window"))


def _checked(convert, test, requirement: str):
    """An argparse type: ``convert`` the text, then require ``test``."""
    def parse(text: str):
        try:
            value = convert(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value
    return parse


positive_int = _checked(int, lambda v: v >= 1, "an integer >= 1")
non_negative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
seed_int = _checked(int, lambda v: 0 <= v <= MAX_SEED,
                    f"an integer from 0 to 2**63 - 1 = {MAX_SEED}")
# float() accepts "inf" and "nan", which no option of this program means: every float
# option must be finite (a NaN tolerance would never stop, an infinite one stop at once).
finite_float = _checked(float, math.isfinite, "a finite number")
non_negative_float = _checked(float, lambda v: math.isfinite(v) and v >= 0,
                              "a finite number >= 0")
positive_float = _checked(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def _finite_floats(parser: argparse.ArgumentParser) -> None:
    """Give every option typed as a plain ``float`` (e.g. bench's) the finite check."""
    for action in parser._actions:
        if action.type is float:
            action.type = finite_float


def device_arg(text: str):
    """cpu, cuda, cuda:N, mps or auto (the first CUDA device when there is one)."""
    import torch
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda, cuda:N or "
                                         f"auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text} was asked for, but torch sees no CUDA "
                                             f"device (`deqir-fast info` lists the devices)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: torch sees {torch.cuda.device_count()} "
                                             f"CUDA device(s)")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise argparse.ArgumentTypeError(f"{text} was asked for, but MPS is not available")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"unsupported device {text!r}; use cpu, cuda, cuda:N "
                                         f"or auto")
    return device


def task_arg(text: str) -> str:
    from ..tasks import TASKS
    if text not in TASKS:
        raise argparse.ArgumentTypeError(f"unknown task {text!r}; known tasks: "
                                         f"{', '.join(sorted(TASKS))}")
    return text


def task_list(text: str) -> List[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("needs at least one task name")
    return [task_arg(n) for n in names]


def int_list(text: str) -> List[int]:
    """Comma-separated integers >= 1 (bench's --steps, --batch, --random-channels)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"must be comma-separated integers >= 1, got {text!r}")
    return values


def name_list(text: str) -> List[str]:
    """Comma-separated names, at least one (bench's --chains, --peers)."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError("needs at least one name")
    return values


def add_chain_options(p, steps: int) -> None:
    g = p.add_argument_group("sampler")
    g.add_argument("--sampler", choices=SAMPLERS, default="ddrm",
                   help="DDRM (Kawar et al. 2022) or DDNM (Wang et al. 2023)")
    g.add_argument("--steps", type=positive_int, default=steps, metavar="S",
                   help="sampling steps (model evaluations of the serial sampler)")


def add_solver_options(p) -> None:
    from ..api import DEFAULT_LINEARIZE, DEFAULT_SOLVER, DEFAULT_TOL
    from ..linearize import LINEARIZATIONS
    from ..solvers import SOLVERS
    g = p.add_argument_group("parallel solve")
    g.add_argument("--solver", choices=tuple(SOLVERS), default=DEFAULT_SOLVER,
                   help="fixed-point solver of the parallel mode")
    g.add_argument("--linearize", choices=LINEARIZATIONS, default=DEFAULT_LINEARIZE,
                   help="Jacobian guess folded into each round's scan (docs/design.md §3a); "
                        "none: the plain map")
    g.add_argument("--tol", type=non_negative_float, default=DEFAULT_TOL,
                   help="stopping tolerance per step, in noise units (0: iterate to the exact "
                        "serial result)")
    g.add_argument("--window", type=positive_int, default=None, metavar="W",
                   help="steps evaluated per round (sliding window; bounds memory to W x batch "
                        "images per model call; default: all S steps)")


def solve_options(args, planned: bool = False) -> dict:
    """The keyword arguments of dq.solve that the parallel-solve options set; ``planned``:
    the throughput planner picks the window (``--window`` then bounds it)."""
    window = args.window
    if planned:
        from ..solvers import Planner
        window = Planner(max_window=args.window)
    return dict(solver=args.solver, linearize=args.linearize, tol=args.tol, window=window)


def add_run_options(p) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=seed_int, default=0,
                   help="seed of every random draw, 0 to 2**63 - 1")
    g.add_argument("--device", type=device_arg, default="auto",
                   help="cpu, cuda, cuda:N, mps, or auto (CUDA when torch sees a GPU)")
    g.add_argument("--quiet", action="store_true", help="no progress bars or notes")
    g.add_argument("--verbose", action="store_true", help="show the traceback of an error")
