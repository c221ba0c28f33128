"""The native kernels (``kernels/`` at the repository top, built by CMake through
``setup.py`` during ``pip install``): one shared library that registers ``deqir_fast::``
ops with PyTorch's dispatcher (TORCH_LIBRARY) — a C++/OpenMP CPU kernel and, when the
build found nvcc and a CUDA torch, a CUDA C++ kernel. Loaded with
``torch.ops.load_library``; nothing here fails when the library is missing: ``status()``
says why, and dispatch falls back to the reference.

``DEQIR_FAST_NATIVE_LIB=/path/to/lib.so`` loads another build (benchmarks, tests).
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

PACKAGE_DIR = Path(__file__).resolve().parents[1]
LIB_GLOB = "_native_kernels*.so"
STATUS_FILE = "_native_build.json"


@dataclass(frozen=True)
class NativeStatus:
    ok: bool                       # the library is loaded and its ops are registered
    reason: str                    # why not, or what was loaded
    path: Optional[str] = None
    cuda: bool = False             # a CUDA kernel is registered
    info: str = ""                 # the library's own build line


def build_record() -> dict:
    """What ``setup.py`` wrote about the last native build ({} when it never ran)."""
    try:
        return json.loads((PACKAGE_DIR / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _library_path() -> Optional[Path]:
    forced = os.environ.get("DEQIR_FAST_NATIVE_LIB")
    if forced:
        return Path(forced)
    found = sorted(PACKAGE_DIR.glob(LIB_GLOB))
    return found[0] if found else None


@functools.lru_cache(maxsize=None)
def status() -> NativeStatus:
    """Load the library once per process; never raises."""
    path = _library_path()
    if path is None or not path.exists():
        if os.environ.get("DEQIR_FAST_NATIVE_LIB"):
            return NativeStatus(False, f"DEQIR_FAST_NATIVE_LIB={path} does not exist")
        rec = build_record()
        if rec and not rec.get("ok"):
            return NativeStatus(False, f"not built: {rec.get('reason')}")
        return NativeStatus(False, "not built (no library in the package; reinstall with "
                                   "`pip install --no-build-isolation -e .` and see its warning)")
    try:
        if not hasattr(torch.ops.deqir_fast, "fused_round"):
            torch.ops.load_library(str(path))
        op = torch.ops.deqir_fast.fused_round
        cuda = torch._C._dispatch_has_kernel_for_dispatch_key(op._qualified_op_name
                                                               if hasattr(op, "_qualified_op_name")
                                                               else "deqir_fast::fused_round", "CUDA")
        info = str(torch.ops.deqir_fast.build_info())
        wrong = _layout_mismatches(path)
    except Exception as exc:      # a stale or foreign build: report it, never crash the import
        return NativeStatus(False, f"failed to load {path.name}: {type(exc).__name__}: {exc}")
    if wrong:
        return NativeStatus(False, f"{path.name} was compiled with another fused-round layout "
                                   f"than deqir_fast/ops/layout.py ({'; '.join(wrong[:3])}): a stale "
                                   "build; rebuild with `pip install --no-build-isolation -e .`",
                            str(path), False, info)
    _register_fake()
    return NativeStatus(True, f"loaded {path.name}", str(path), bool(cuda), info)


def _layout_mismatches(path: Path) -> list:
    """What the library's compiled-in layout (``deqir_fast::layout``, the values of
    kernels/fused_round_layout.h when it was built) gets wrong against ``layout.py``;
    a library without the op predates the check and counts as stale."""
    from . import layout
    if not hasattr(torch.ops.deqir_fast, "layout"):
        return [f"{path.name} has no layout() op"]
    found = layout.parse_describe(str(torch.ops.deqir_fast.layout()))
    return layout.mismatches(found, path.name)


def _register_fake() -> None:
    """Shapes for torch.compile / FakeTensor tracing (the op allocates its outputs)."""
    try:
        @torch.library.register_fake("deqir_fast::fused_round")
        def _fake(sampler, table, E, U, x_last, scale, s, ybar, noise, slopes):
            return torch.empty_like(E), scale.new_empty(scale.shape)

        @torch.library.register_fake("deqir_fast::anderson_gram")
        def _fake_gram(G, p, slots, r0, r1):
            return G.new_empty((r1 - r0, G.shape[2], len(slots)), dtype=torch.float64)

        @torch.library.register_fake("deqir_fast::anderson_mix")
        def _fake_mix(X, G, slots, alpha, r0, r1, damping):
            return X.new_empty((r1 - r0, X.shape[2], X.shape[3]))

        @torch.library.register_fake("deqir_fast::anderson_mix_out")
        def _fake_mix_out(X, G, slots, alpha, r0, r1, damping, out):
            return None
    except RuntimeError:          # already registered (a second load in the same process)
        pass


def fused_round_native(sampler_id: int, table, E, U, x_last, scale, s, ybar, noise, slopes):
    """The registered op on normalised inputs (see ``fused_round.fused_round``)."""
    return torch.ops.deqir_fast.fused_round(sampler_id, table, E, U, x_last, scale, s, ybar,
                                            noise, slopes)
