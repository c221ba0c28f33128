"""Which backend runs the hot ops (docs/design.md §5).

Backends: ``torch`` (the pure-PyTorch references, always there), ``native`` (the C++/
OpenMP and CUDA C++ kernels of ``kernels/``, see ``native.py``) and ``triton`` (CUDA;
on a CPU only through Triton's interpreter, ``TRITON_INTERPRET=1`` set before triton is
imported, which is for tests).

``DEQIR_FAST_BACKEND=auto|torch|native|triton`` (``reference`` is an alias of ``torch``)
is read once, on first use; ``reset()`` re-reads it. ``auto`` (the default) takes the
fastest backend that is available for the device and has been validated there:

- CPU: native (C++/OpenMP: 6-16x the reference on the fused round, bench/round.py),
  else torch;
- CUDA: native CUDA C++ when the library was built with it, else Triton, else torch.

Validation: for each (device type, sampler, dtype) the first one-step call of a kernel and
its first call on a window of several steps are checked against the reference on the
same inputs (two extra reference rounds per process; a one-step call cannot show a
kernel that indexes the next step's inputs wrongly); a
mismatch demotes that backend to torch for the rest of the process and ``why()`` says
so. A forced backend is never demoted, and an unavailable forced backend is an error.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Dict, List, Optional, Tuple

import torch

ENV = "DEQIR_FAST_BACKEND"
CHOICES = ("auto", "torch", "native", "triton")
ALIASES = {"reference": "torch"}

_forced: Optional[str] = None
_validated: Dict[tuple, bool] = {}          # (backend, device type, sampler, dtype) -> ok
_demoted: Dict[Tuple[str, str], str] = {}   # (backend, device type) -> why
_chosen: Dict[str, Tuple[str, str]] = {}      # device -> (backend, why): choose() per call is a dict hit


def reset() -> None:
    """Forget the cached environment variable and validation results (tests)."""
    global _forced
    _forced = None
    _validated.clear()
    _demoted.clear()
    _chosen.clear()
    from . import native
    native.status.cache_clear()


def forced() -> str:
    """The DEQIR_FAST_BACKEND setting, read once ('auto' when unset)."""
    global _forced
    if _forced is None:
        raw = os.environ.get(ENV, "auto").strip().lower() or "auto"
        name = ALIASES.get(raw, raw)
        if name not in CHOICES:
            raise ValueError(f"{ENV} must be one of {CHOICES + tuple(ALIASES)}, got {raw!r}")
        _forced = name
    return _forced


def triton_available(device: torch.device) -> Tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if device.type == "cuda":
        return True, "triton (compiled for CUDA)"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "triton interpreter (TRITON_INTERPRET=1; tests only, slow)"
    return False, f"needs CUDA tensors or TRITON_INTERPRET=1 (set before triton is imported); " \
                  f"the state is on {device.type}"


def native_available(device: torch.device) -> Tuple[bool, str]:
    from . import native
    st = native.status()
    if not st.ok:
        return False, st.reason
    if device.type == "cuda" and not st.cuda:
        return False, "the native library was built without CUDA (no nvcc or a CPU torch at install)"
    if device.type not in ("cpu", "cuda"):
        return False, f"no native kernel for {device.type}"
    return True, st.info or st.reason


def available(device: torch.device) -> Dict[str, Tuple[bool, str]]:
    return {"torch": (True, "pure PyTorch reference"),
            "native": native_available(device),
            "triton": triton_available(device)}


def choose(device: torch.device) -> Tuple[str, str]:
    """(backend, why) for the fused round on ``device``. Raises ValueError when a forced
    backend is unavailable there."""
    device = torch.device(device)
    key = str(device)
    hit = _chosen.get(key)
    if hit is not None:
        return hit
    hit = _choose(device)
    _chosen[key] = hit
    return hit


def _choose(device: torch.device) -> Tuple[str, str]:
    f = forced()
    if f != "auto":
        if f == "torch":
            return "torch", f"forced by {ENV}"
        ok, why = available(device)[f]
        if not ok:
            raise ValueError(f"{ENV}={f}, but it is unavailable on {device.type}: {why}")
        return f, f"forced by {ENV}"
    order = ["native", "triton"] if device.type == "cuda" else ["native"]
    skipped = []
    for name in order:
        ok, why = available(device)[name]
        demoted = _demoted.get((name, device.type))
        if ok and demoted is None:
            return name, f"auto: fastest validated on {device.type}"
        skipped.append(f"{name}: {demoted or why}")
    return "torch", "auto: " + ("; ".join(skipped) if skipped else "no kernel for this device")


def scan_backend(E: torch.Tensor) -> str:
    """The backend ``scan.affine_scan`` uses for E: 'triton' when DEQIR_FAST_BACKEND=triton
    (CUDA, or the interpreter) and the chain has fewer than 2^31 values (the kernel
    indexes with 32-bit offsets), else 'reference'."""
    if forced() == "triton" and E.numel() < 2 ** 31:
        ok, why = triton_available(E.device)
        if not ok:
            raise ValueError(f"DEQIR_FAST_BACKEND=triton {why}")
        return "triton"
    return "reference"


def needs_validation(backend: str, device: torch.device, sampler: str, dtype) -> bool:
    if backend == "torch" or forced() != "auto":
        return False
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False                      # no host sync while a CUDA graph is captured
    return (backend, device.type, sampler, dtype) not in _validated


def record_validation(backend: str, device: torch.device, sampler: str, dtype, ok: bool,
                      detail: str) -> None:
    _validated[(backend, device.type, sampler, dtype)] = ok
    if not ok:
        _demoted[(backend, device.type)] = f"failed validation against the reference ({detail})"
        _chosen.clear()


def why() -> List[Tuple[str, str]]:
    """(device, 'backend: reason') for every device torch sees; never raises."""
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    lines = []
    for device in devices:
        try:
            name, reason = choose(device)
            lines.append((str(device), f"{name} ({reason})"))
        except ValueError as exc:
            lines.append((str(device), f"error: {exc}"))
    return lines


def info_lines(devices) -> List[Tuple[str, str]]:
    """What ``deqir-fast info`` prints about the kernels: the backends, the setting, the
    native build, and for each device the backend each op gets and why. Never raises."""
    from . import native
    try:
        setting = forced()
    except ValueError as exc:
        return [("DEQIR_FAST_BACKEND", f"error: {exc}")]
    lines = [("scan backends", ", ".join(CHOICES[1:]) + " (reference = torch)"),
             (ENV, os.environ.get(ENV, "unset") + ("" if setting == "auto" else f" -> {setting}")
              if os.environ.get(ENV) else "unset (auto)")]
    st = native.status()
    lines.append(("native library", (f"{st.reason}: {st.info}" if st.ok else st.reason)))
    rec = native.build_record()
    if rec:
        what = "; ".join(rec.get("configure") or []) or rec.get("reason", "")
        lines.append(("native build", f"{'ok' if rec.get('ok') else 'failed'} in {rec.get('seconds')} s"
                                      f" against torch {rec.get('torch', '?')}: {what}"))
    for device in devices:
        device = torch.device(device)
        ok, why_t = triton_available(device)
        lines.append((f"triton on {device}", "available" if ok else f"unavailable ({why_t})"))
        try:
            name, reason = choose(device)
            lines.append((f"fused round on {device}", f"{name} ({reason})"))
        except ValueError as exc:
            lines.append((f"fused round on {device}", f"error: {exc}"))
        try:
            lines.append((f"scan on {device}", scan_backend(torch.zeros(1, device=device))
                           + " (generic scan: adjoint, other chains)"))
        except ValueError as exc:
            lines.append((f"scan on {device}", f"error: {exc}"))
    return lines
