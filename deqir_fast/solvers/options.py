"""The expert knobs of a solve, with their one set of defaults (``solve(...,
options=SolveOptions(...))``; the everyday ones are keywords of ``solve`` itself)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Optional

import torch

# Default stopping rule: stop when every step has max|F(X)_i - X_i| <= TOL * max(σ_i, FLOOR).
# Calibrated by `bench/calibrate.py` (bench/RESULTS.md §8, "The stopping rule") on 372 recorded
# solves: the bundled UNet and photo16 (9 chains, S = 20 and 100) and 300 seeds of the
# README's Gaussian-mixture problems. At TOL = 0.01 none ends over one grey level
# (2/255; worst 8.4e-4); the first failures (mode selection on the mixture prior, 1.7
# off) appear at 0.03, so 0.01 keeps a 3x margin. 3e-3 costs 0.4 more rounds on average.
DEFAULT_TOL = 1e-2

# Leading steps freeze once the steps before them meet FREEZE_RATIO * tol. Freezing at
# tol itself locks in errors that the chain then carries to x0: on the bundled model,
# DDIM-100 with the Gaussian J stopped 2.3e-2 off serial (over 2/255) at tol 3e-3.
# (bench/RESULTS.md §8, "The stopping rule").
FREEZE_RATIO = 0.01

# Adjoint stopping rule, relative to max|dL/dx0|. Measured on DDIM-100 with the bundled
# model (bench/HISTORY.md §4): 1e-3 stops after 12 adjoint rounds, 1e-8 runs all 100,
# and both leave the same 1.8e-4 relative error against autograd through the serial
# chain: the forward solve's tolerance dominates.
DEFAULT_GRAD_TOL = 1e-3


@dataclass(frozen=True)
class SolveOptions:
    """Expert options of ``solve`` (and of the solver loop): what most solves never set.

    Stopping and freezing:
        floor: the residual of a nearly noise-free state is measured against
            max(σ_i, floor), so the last states need not be exact to the last bit.
        freeze_ratio: leading steps are frozen (and leave a sliding window) once every
            step before them has a residual <= tol * freeze_ratio; a window with steps
            after it is accepted whole only there. 1 freezes at tol itself, as ParaDiGMS
            does; that locks in errors the chain then amplifies (bench/RESULTS.md), hence
            0.01.
        serial_shadow: run the serial sampler alongside, one step per round inside the
            round's model call (one more step evaluation per round, counted in ``nfe``),
            and compare it with every frozen state it reaches (docs/design.md §3d). A
            frozen state more than ``tol`` noise units off means the chain amplifies what
            the freeze rule accepts past what ``converged`` may promise (DDNM with η = 0
            on a sharp mixture prior: up to 0.13 off serial without it): the solve
            restarts after the shadow's step and freezes exact states only
            (``stats.serial_mismatch``; ``stats.shadow_checked`` lists the steps it
            compared), within S rounds in all. Off, or with ``tol * freeze_ratio == 0``
            (every frozen state is exact already): no shadow.
    The update rule (``solver``):
        history, anderson_reg, anderson_damping: the Anderson rules' history size,
            regularisation (relative to the largest residual norm) and damping.
        history_dtype: keep Anderson's history in this dtype (e.g. ``torch.bfloat16``) as
            differences between rounds, which shrink with the residual, so rounding them
            does not stop the solve from reaching the serial answer: history 4 then holds
            3.5 stacked float32 states instead of 8 (bench/RESULTS.md §13). None keeps it
            in the state dtype. Not with ``process_group``.
        rule_options: keyword arguments of a user-registered rule's constructor
            (``register_solver``); a rule gets only the options it declares.
    Host reads and CUDA:
        check_every: read the residuals back (the solver's one host synchronisation)
            once every k rounds; between reads the window and the freeze rule stay on the
            device. k > 1 re-evaluates frozen steps until the next read (counted in
            ``nfe``); S rounds still reach the serial answer. 1 with ``process_group``.
        cuda_graph: on CUDA with ``check_every`` > 1 and the Picard rule, replay the
            rounds between two reads from a captured CUDA graph (falls back to eager
            rounds when the model cannot be captured; ``stats.graph_rounds``).
        allow_tf32: let the model's float32 matmuls and convolutions use TF32 on CUDA.
            Off: TF32 makes the model's output depend on the batch it runs in, and the
            chain amplifies that past one grey level (H200, DDIM-100: 1.2e-2 from serial
            with TF32, 2.9e-4 without; bench/RESULTS.md §11). The flags are set only
            inside the model calls and restored after.
    Gradients (``grad`` of ``solve``):
        grad_tol: the adjoint solve's tolerance, relative to max|dL/dx0|.
        phantom_steps, phantom_damping: ``grad="phantom"`` backpropagates through this
            many damped rounds X <- (1-τ)X + τF(X) from the solution, τ =
            ``phantom_damping`` (cheap, approximate).
    """
    floor: float = 0.1
    freeze_ratio: float = FREEZE_RATIO
    serial_shadow: bool = True
    history: int = 4
    anderson_reg: float = 1e-4
    anderson_damping: float = 1.0
    history_dtype: Optional[torch.dtype] = None
    rule_options: Dict[str, Any] = field(default_factory=dict)
    check_every: int = 1
    cuda_graph: bool = False
    allow_tf32: bool = False
    grad_tol: float = DEFAULT_GRAD_TOL
    phantom_steps: int = 5
    phantom_damping: float = 0.5

    def __post_init__(self):
        _number("floor", self.floor, lo=0.0, lo_open=True)
        _number("freeze_ratio", self.freeze_ratio, lo=0.0, hi=1.0)
        _flag("serial_shadow", self.serial_shadow)
        _count("history", self.history)
        _number("anderson_reg", self.anderson_reg, lo=0.0)
        _number("anderson_damping", self.anderson_damping, lo=0.0, lo_open=True)
        if self.history_dtype is not None and not (isinstance(self.history_dtype, torch.dtype)
                                                   and self.history_dtype.is_floating_point):
            raise TypeError(f"history_dtype must be None or a floating torch.dtype (e.g. "
                            f"torch.bfloat16), got {self.history_dtype!r}")
        if not isinstance(self.rule_options, dict):
            raise TypeError(f"rule_options must be a dict of keyword arguments, got "
                            f"{type(self.rule_options).__name__}")
        _count("check_every", self.check_every)
        _flag("cuda_graph", self.cuda_graph)
        _flag("allow_tf32", self.allow_tf32)
        _number("grad_tol", self.grad_tol, lo=0.0)
        _count("phantom_steps", self.phantom_steps)
        _number("phantom_damping", self.phantom_damping, lo=0.0, hi=1.0, lo_open=True)

    def changed(self) -> Dict[str, Any]:
        """The options set to something other than their default."""
        default = SolveOptions()
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) != getattr(default, f.name)}


FIELDS = tuple(f.name for f in fields(SolveOptions))


def _number(name: str, value, lo: float, hi: float = math.inf, lo_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        low = f"> {lo:g}" if lo_open else f">= {lo:g}"
        rng = low if hi == math.inf else f"{low} and <= {hi:g}"
        raise ValueError(f"{name} must be a finite number {rng}, got {value!r}")


def _count(name: str, value) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
