"""The fused round's layout, defined once (docs/design.md §5): the sampler ids, the number
of Jacobian classes and the columns of the per-step scalar table (``fused_round.step_table``,
[S, NS] float64) that the reference and every kernel read.

Each backend takes these numbers from here:
- ``fused_round.py`` (``step_table``, the reference, the launcher) imports them;
- ``triton_round.py`` turns them into ``tl.constexpr`` module constants of the kernel;
- the native C++ and CUDA kernels include ``kernels/fused_round_layout.h``, generated
  from this file and checked in:

      python deqir_fast/ops/layout.py --write     # after changing anything here
      python deqir_fast/ops/layout.py --check     # exit 1 when the header is stale

  tests/test_layout.py fails, naming the constant, when the header disagrees with this
  file, and ``native.status()`` refuses a built library whose compiled-in layout differs
  (a stale build: rebuild with ``pip install --no-build-isolation -e .``).

Standard library only, so that it runs as a script without torch or the package.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Dict, List, Optional

SAMPLERS = {"ddim": 0, "ddrm": 1, "ddnm": 2}          # the kernels' `sampler` argument
NUM_CLASSES = {"ddim": 1, "ddrm": 3, "ddnm": 3}       # Jacobian classes per sampler
MAX_CLASSES = max(NUM_CLASSES.values())               # J [W, B, K] has K <= MAX_CLASSES
NS = 16                                                # columns of the per-step scalar table

# Columns of ``step_table``. Every sampler: P0, Q0, Z0 = P, Q, kZ of its "default" class
# (DDIM: every element; DDRM: missing, s = 0 or the tie s·σ' = σ_y; DDNM: null space).
C_P0, C_Q0, C_Z0 = 0, 1, 2
# DDRM: class 2 (noisier than y) P and Q, r·η_b, r·sqrt(1-η²)σ'/σ_y (kY of class 1),
# sqrt(1-η²)σ'/σ_y, r/sqrt(a), r·sqrt(1-a)/sqrt(a), r = sqrt(a'), σ', σ'², σ_y·η_b, σ_y.
C_P2, C_Q2, C_REB, C_KYA, C_KSNSY = 3, 4, 5, 6, 7
C_PA, C_QA, C_R, C_SN, C_SN2, C_SYEB, C_SY = 8, 9, 10, 11, 12, 13, 14
# DDNM reuses C_PA, C_QA, C_R, C_SN (σ' = sqrt(1-a')), C_SN2, and: sqrt(1-η²), η, r·σ_y.
C_KEEP, C_ETA, C_RSY = 3, 4, 13

COLUMNS: Dict[str, int] = {k: v for k, v in dict(globals()).items() if k.startswith("C_")}

# The columns each sampler's step_table fills and its kernels read (one sampler's columns
# must not share a number; DDNM reuses DDRM-only numbers). tests/test_layout.py checks
# both against step_table and element_coefficients.
READS = {
    "ddim": ("C_P0", "C_Q0", "C_Z0"),
    "ddrm": ("C_P0", "C_Q0", "C_Z0", "C_P2", "C_Q2", "C_REB", "C_KYA", "C_KSNSY", "C_PA", "C_QA",
             "C_R", "C_SN", "C_SN2", "C_SYEB", "C_SY"),
    "ddnm": ("C_P0", "C_Q0", "C_Z0", "C_KEEP", "C_ETA", "C_PA", "C_QA", "C_R", "C_SN", "C_SN2",
             "C_RSY"),
}

HEADER = Path(__file__).resolve().parents[2] / "kernels" / "fused_round_layout.h"


def sampler_const(name: str) -> str:
    """The C++ enumerator of a sampler id: 'ddrm' -> 'kDDRM'."""
    return "k" + name.upper()


def constants() -> Dict[str, int]:
    """Every shared number under its C++ name, in the header's order: the sampler ids
    (kDDIM, ...), MAX_CLASSES, NS and the columns C_*."""
    out = {sampler_const(k): v for k, v in SAMPLERS.items()}
    out.update(MAX_CLASSES=MAX_CLASSES, NS=NS)
    out.update(COLUMNS)
    return out


def describe(values: Dict[str, int]) -> str:
    """'name=value' pairs separated by spaces: the form the native library's
    ``deqir_fast::layout()`` op returns (built from the header's X-macro)."""
    return " ".join(f"{k}={v}" for k, v in values.items())


def parse_describe(text: str) -> Dict[str, int]:
    out = {}
    for item in text.split():
        name, _, value = item.partition("=")
        out[name] = int(value)
    return out


_CONST = re.compile(r"^\s*constexpr\s+int\s+(\w+)\s*=\s*(-?\d+)\s*;", re.M)
_ENUM = re.compile(r"enum\s+Sampler\s*:\s*int\s*\{([^}]*)\}")


def parse_header(text: str) -> Dict[str, int]:
    """The constants a C++ header defines (``constexpr int NAME = N;`` and the ``Sampler``
    enum's ``kNAME = N``), by name."""
    out: Dict[str, int] = {}
    for m in _ENUM.finditer(text):
        for item in m.group(1).split(","):
            if "=" in item:
                name, value = item.split("=")
                out[name.strip()] = int(value)
    for name, value in _CONST.findall(text):
        out[name] = int(value)
    return out


def mismatches(found: Dict[str, int], where: str,
               expected: Optional[Dict[str, int]] = None) -> List[str]:
    """One line per constant that ``found`` (read from ``where``) gets wrong or lacks or
    adds, against ``expected`` (default: this file's ``constants()``)."""
    expected = constants() if expected is None else expected
    lines = []
    for name, value in expected.items():
        if name not in found:
            lines.append(f"{name}: missing from {where} (deqir_fast/ops/layout.py has {value})")
        elif found[name] != value:
            lines.append(f"{name}: {where} has {found[name]}, deqir_fast/ops/layout.py has {value}")
    for name in found:
        if name not in expected:
            lines.append(f"{name}: defined in {where} but not in deqir_fast/ops/layout.py")
    return lines


def render_header() -> str:
    """kernels/fused_round_layout.h, generated from this file."""
    enum = ", ".join(f"{sampler_const(k)} = {v}" for k, v in SAMPLERS.items())
    cols = "\n".join(f"constexpr int {k} = {v};" for k, v in COLUMNS.items())
    lines = [[]]                                 # X(name) ..., wrapped under 90 columns
    for k in constants():
        if len(" ".join(lines[-1] + [f"X({k})"])) > 80:
            lines.append([])
        lines[-1].append(f"X({k})")
    names = " \\\n  ".join(" ".join(ln) for ln in lines)
    return f"""\
// GENERATED from deqir_fast/ops/layout.py by `python deqir_fast/ops/layout.py --write`.
// Do not edit: change layout.py and regenerate. tests/test_layout.py fails, naming the
// constant, when this file and layout.py disagree; deqir_fast/ops/native.py refuses a
// library compiled with another layout (the layout() op reports the values below).
#pragma once

namespace deqir {{

// The fused round's `sampler` argument, and the most Jacobian classes of any sampler.
enum Sampler : int {{ {enum} }};
constexpr int MAX_CLASSES = {MAX_CLASSES};

// Columns of the per-step scalar table (step_table: [S, NS] float64); what each holds is
// written in layout.py.
constexpr int NS = {NS};
{cols}

// Every constant above: X(name) for each, in layout.constants()'s order.
#define DEQIR_LAYOUT_CONSTANTS(X) \\\n  {names}

}}  // namespace deqir
"""


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    text = render_header()
    if args == ["--write"]:
        HEADER.write_text(text)
        print(f"wrote {HEADER}")
        return 0
    if args == ["--check"]:
        current = HEADER.read_text() if HEADER.exists() else ""
        if current == text:
            print(f"{HEADER} is up to date")
            return 0
        lines = mismatches(parse_header(current), HEADER.name) or ["the text differs"]
        print(f"{HEADER} is stale (run: python deqir_fast/ops/layout.py --write):\n  "
              + "\n  ".join(lines), file=sys.stderr)
        return 1
    if not args:
        sys.stdout.write(text)
        return 0
    print("usage: python deqir_fast/ops/layout.py [--write | --check]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
