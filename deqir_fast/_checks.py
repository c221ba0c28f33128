"""Input validation shared by the public entry points: every failure names the argument
and what was expected (``ValueError`` for bad values, ``TypeError`` for bad types)."""
from __future__ import annotations

import math
from numbers import Real

import torch


def check_tensor(name: str, value, *, ndim: int | None = None, shape=None,
                 finite: bool = True) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(value.shape)}")
    if finite and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return value


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_unit_interval(name: str, value) -> float:
    value = _real(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def check_nonnegative(name: str, value) -> float:
    value = _real(name, value)
    if not (value >= 0.0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def check_positive_int(name: str, value, *, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The solver state is never below float32, whatever the inputs' precision."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def raise_nonfinite(step: int):
    """The model gave NaN/Inf at an exact step (its input is the serial sampler's)."""
    raise ValueError(f"model output contains NaN or Inf at step {step}")
