"""The ``deqir-fast`` command line (also ``python -m deqir_fast``).

Every argument, input image and output location is checked before a model loads, and
outputs are written all at once at the end (``image_io.write_all``), so an error costs
seconds and leaves nothing behind. Errors are one line on stderr with exit code 2
(``--verbose`` adds the traceback). The maths never prints: progress reaches the commands
through the solvers' callbacks.

One module a command: ``restore`` (with ``restore_files``), ``demo``, ``info`` and
``bench`` each hold their options (``add_arguments``) and their run, import torch at
module level, and are imported only when their command is chosen; ``common`` holds what
restore and demo share. This module, ``parser``, ``options``, ``extras`` and
``reporting`` import only the standard library, so that ``deqir-fast --version`` and
``--help`` do not wait seconds for torch. The names of the commands' modules are
available here too (``deqir_fast.cli.quality``, ``backend_lines``, ...), loaded on first
use (PEP 562).
"""
from __future__ import annotations

import importlib
import sys
import traceback
from typing import Optional

from ..figures import plural     # figures imports matplotlib, numpy and torch only when drawing
from .extras import (EXTRA_MODULES, check_modules, extra_for, missing_extras_message,
                     required_modules)
from .options import (MAX_SEED, SAMPLERS, SOLVER_OPTIONS, add_chain_options, add_run_options,
                      add_solver_options, device_arg, finite_float, non_negative_float,
                      non_negative_int, positive_float, positive_int, seed_int, solve_options,
                      task_arg, task_list)
from .parser import DESCRIPTION, EXAMPLES, build_parser, check_args, given_options
from .reporting import Reporter, RoundProgress, StepProgress

# The names of the command modules, which import torch: loaded when first asked for.
_LAZY = {
    "common": ("MEASUREMENT_SEED", "X_T_SEED", "CHAIN_NOISE_SEED", "default_schedule",
               "model_schedule", "make_chain", "degrade", "measure", "baseline",
               "baseline_name", "degraded_view", "quality", "degraded_caption", "initial_noise",
               "chain_generator", "fmt_db", "serial_with_progress", "parallel_with_progress"),
    "restore_files": ("ModelSpec", "BUNDLED_MODEL", "read_model_spec", "gather_inputs",
                      "plan_outputs", "prepare_pixels", "output_depths"),
    "restore": ("MODES", "resolve_mode", "run_restore", "load_model", "run_chain",
                "simulate_report"),
    "demo": ("DEMO_TASKS", "run_demo", "generation_row", "print_table"),
    "info": ("devices", "device_lines", "backend_lines", "environment_lines", "run_info"),
    "bench": ("run_bench",),
}
_LAZY_NAMES = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name):
    module = _LAZY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def _command(module: str, function: str):
    """The command ``function`` of deqir_fast/cli/MODULE.py, imported when it runs."""
    def run(args) -> int:
        return getattr(importlib.import_module(f".{module}", __name__), function)(args)
    run.__name__ = run.__qualname__ = function
    return run


COMMANDS = {"restore": _command("restore", "run_restore"), "demo": _command("demo", "run_demo"),
            "info": _command("info", "run_info"), "bench": _command("bench", "run_bench")}


def main(argv: Optional[list] = None) -> int:
    parser = build_parser(lazy=True)
    args = parser.parse_args(argv)
    check_args(parser, args)
    reporter = Reporter(getattr(args, "quiet", False))
    for text in getattr(args, "_notes", None) or []:
        reporter.note(text)
    try:
        check_modules(args)
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("deqir-fast: interrupted; nothing was written", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        # An optional dependency: name the extra that installs it.
        top = (exc.name or "").split(".")[0]
        if top in EXTRA_MODULES and "pip install" not in str(exc):
            exc = ModuleNotFoundError(missing_extras_message(args.command, [top]), name=top)
        return _fail(exc, args, 2, hint="")
    except (ValueError, TypeError, OSError, ImportError) as exc:
        # Mistakes in what was asked for: a one-line message says what to change.
        return _fail(exc, args, 2, hint="")
    except Exception as exc:  # noqa: BLE001 - anything else is a bug or a device failure
        return _fail(exc, args, 1, hint=" (--verbose shows the traceback)")


def _fail(exc: BaseException, args, code: int, hint: str) -> int:
    if getattr(args, "verbose", False):
        traceback.print_exc()
    message = " ".join(str(exc).split()) or type(exc).__name__
    if code != 2:
        message = f"{type(exc).__name__}: {message}"
    print(f"deqir-fast: error: {message}{'' if getattr(args, 'verbose', False) else hint}",
          file=sys.stderr)
    return code
