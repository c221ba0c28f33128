"""The fused round's layout (sampler ids, NS, the step_table columns) is defined once, in
deqir_fast/ops/layout.py, and every backend takes it from there (issue #23):

- the C++/CUDA header kernels/fused_round_layout.h is generated from it and checked in:
  it must equal the generated text, and any constant it gets wrong is named;
- no other kernel source or Python module defines a column, NS or a sampler id by hand;
- the Triton kernel's constexprs carry layout.py's values under the same names (the
  values are compared again under the interpreter in tests/triton_round_check.py);
- the layout itself is sound: one sampler's columns are distinct and inside the table,
  and step_table / element_coefficients touch only the columns layout.READS lists;
- the built native library reports the layout it was compiled with, and a library
  compiled with another one is refused (a stale build after a layout change).
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deqir_fast.ops import layout, native
from deqir_fast.ops.fused_round import KernelSpec, element_coefficients, step_table

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "kernels" / "fused_round_layout.h"
TRITON = ROOT / "deqir_fast" / "ops" / "triton_round.py"


def test_the_checked_in_header_is_generated_from_layout_py():
    text = HEADER.read_text()
    wrong = layout.mismatches(layout.parse_header(text), "kernels/fused_round_layout.h")
    assert not wrong, "\n".join(wrong)
    assert text == layout.render_header(), (
        "kernels/fused_round_layout.h is not the generated text: run "
        "`python deqir_fast/ops/layout.py --write` (never edit it by hand)")


def test_the_checker_names_a_swapped_column():
    """Two column numbers swapped in a header: both names are reported."""
    a, b = layout.C_SN, layout.C_SN2
    text = layout.render_header()
    text = text.replace(f"constexpr int C_SN = {a};", f"constexpr int C_SN = {b};")
    text = text.replace(f"constexpr int C_SN2 = {b};", f"constexpr int C_SN2 = {a};")
    wrong = layout.mismatches(layout.parse_header(text), "h")
    assert [w.split(":")[0] for w in wrong] == ["C_SN", "C_SN2"], wrong
    assert f"C_SN: h has {b}, deqir_fast/ops/layout.py has {a}" in wrong
    # a constant dropped from, or added to, the header is named too
    gone = layout.parse_header(re.sub(r"\bkDDIM = \d+, ", "", text))
    assert any(w.startswith("kDDIM: missing") for w in layout.mismatches(gone, "h"))
    extra = dict(layout.constants(), C_NEW=15)
    assert layout.mismatches(extra, "h") == [
        "C_NEW: defined in h but not in deqir_fast/ops/layout.py"]


def test_layout_py_runs_as_a_script_without_torch():
    """What a build or a developer runs (`--check`, `--write`): the standard library only."""
    code = ("import runpy, sys; sys.argv = ['layout.py', '--check']\n"
            "try:\n    runpy.run_path('deqir_fast/ops/layout.py', run_name='__main__')\n"
            "except SystemExit as e:\n    rc = e.code\n"
            "assert 'torch' not in sys.modules, 'layout.py imported torch'\nsys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"(//|#(?!define|include|pragma|if|else|endif|undef)).*", "", text)


def test_no_kernel_source_defines_the_layout_by_hand():
    """Only the generated header defines the constants: every other file in kernels/
    includes it (a second definition would be a hand mirror that can drift)."""
    names = r"NS|MAX_CLASSES|C_[A-Z0-9]+"
    by_hand = re.compile(rf"\b(?:{names})\s*=\s*-?\d|enum\s+Sampler\b|\bkDD\w+\s*=\s*\d|"
                         rf"#define\s+(?:{names})\b")
    sources = [p for p in sorted((ROOT / "kernels").iterdir())
               if p.suffix in (".h", ".cpp", ".cu", ".cuh") and p != HEADER]
    assert sources
    for path in sources:
        for no, line in enumerate(_strip_comments(path.read_text()).splitlines(), 1):
            assert not by_hand.search(line), f"{path.name}:{no} defines the layout by hand: {line.strip()}"


def test_no_python_module_defines_the_layout_by_hand():
    """Outside layout.py, the modules that use the fused round import a column, NS or a
    sampler id, never write it as a number (the Triton kernel reads the table only
    through named columns)."""
    assign = re.compile(r"^\s*(?:C_[A-Z0-9]+|NS|MAX_CLASSES)(?:\s*,\s*C_[A-Z0-9]+)*\s*=\s*[-\d(]")
    samplers = re.compile(r"""["']ddim["']\s*:\s*\d""")
    for path in sorted((ROOT / "deqir_fast").rglob("*.py")):
        text = path.read_text()
        if path.name == "layout.py" or not re.search(r"fused_round|step_table|ops\.layout", text):
            continue                                 # only the modules that use the table
        for no, line in enumerate(text.splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{no}"
            assert assign.search(line) is None, f"{where} assigns a layout constant a number: {line}"
            assert samplers.search(line) is None, f"{where} writes the sampler ids by hand: {line}"
    literal = re.compile(r"\b(?:row|TABLE)\s*\+\s*(?:i\s*\*\s*)?\d|\bSAMPLER\s*[!=]=\s*\d")
    for no, line in enumerate(TRITON.read_text().splitlines(), 1):
        assert literal.search(line) is None, \
            f"triton_round.py:{no} indexes the table or the sampler with a number: {line.strip()}"


def test_the_triton_kernel_takes_each_constant_from_layout_py_under_its_own_name():
    """Read from the source (importing triton here would fix the interpreter setting for
    the whole process); triton_round_check.py compares the imported values too."""
    found = {}
    for name, arg in re.findall(r"^(\w+)\s*=\s*tl\.constexpr\((.*)\)\s*$", TRITON.read_text(), re.M):
        found[name] = arg.strip()
    expected = {"NS": "L.NS", **{k: f"L.{k}" for k in layout.COLUMNS},
                **{k.upper(): f'L.SAMPLERS["{k}"]' for k in layout.SAMPLERS}}
    wrong = [f"{k}: triton_round.py has tl.constexpr({found.get(k, '<none>')}), expected "
             f"tl.constexpr({v})" for k, v in expected.items() if found.get(k) != v]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("sampler", sorted(layout.SAMPLERS))
def test_a_samplers_columns_are_distinct_and_inside_the_table(sampler):
    cols = {name: layout.COLUMNS[name] for name in layout.READS[sampler]}
    seen = {}
    for name, c in cols.items():
        assert 0 <= c < layout.NS, f"{name} = {c} is outside the [S, {layout.NS}] table"
        assert c not in seen, f"{sampler}: {name} and {seen[c]} share column {c}"
        seen[c] = name
    assert set(layout.READS) == set(layout.SAMPLERS) == set(layout.NUM_CLASSES)
    assert set().union(*layout.READS.values()) == set(layout.COLUMNS)   # no unused column
    assert max(layout.NUM_CLASSES.values()) == layout.MAX_CLASSES
    assert sorted(layout.SAMPLERS.values()) == list(range(len(layout.SAMPLERS)))


@pytest.mark.parametrize("sampler", sorted(layout.SAMPLERS))
def test_step_table_and_the_reference_use_only_the_columns_layout_lists(sampler):
    """step_table fills, and element_coefficients reads, only layout.READS[sampler]: the
    kernels transcribe element_coefficients, so the list is what they read too."""
    S = 7
    alpha = torch.linspace(0.05, 0.9, S, dtype=torch.float64)
    alpha_next = torch.cat([alpha[1:], torch.ones(1, dtype=torch.float64)])
    spec = KernelSpec(sampler, alpha, alpha_next, eta=0.4, eta_b=0.5, sigma_y=0.1)
    T = step_table(spec)
    assert T.shape == (S, layout.NS)
    allowed = {layout.COLUMNS[n] for n in layout.READS[sampler]}
    filled = {c for c in range(layout.NS) if bool((T[:, c] != 0).any())}
    assert filled <= allowed, f"step_table fills columns {sorted(filled - allowed)} not in READS"
    read = set()

    def col(c):
        read.add(c)
        return T[:, c].reshape(S, 1)

    s = None if sampler == "ddim" else torch.tensor([[0.0, 0.02, 0.5, 3.0]], dtype=torch.float64)
    element_coefficients(sampler, col, s)
    assert read <= allowed, f"element_coefficients reads columns {sorted(read - allowed)} not in READS"


NATIVE = native.status()


def test_the_built_library_was_compiled_with_layout_py_s_layout():
    """A library refused for its layout fails here (the native tests only skip)."""
    st = native.status()
    if not st.ok and "fused-round layout" not in st.reason:
        pytest.skip(f"native kernels unavailable: {st.reason}")
    assert st.ok, st.reason
    found = layout.parse_describe(str(torch.ops.deqir_fast.layout()))
    wrong = layout.mismatches(found, "the built library")
    assert not wrong, "\n".join(wrong)


@pytest.mark.skipif(not NATIVE.ok, reason=f"native kernels unavailable: {NATIVE.reason}")
def test_a_library_compiled_with_another_layout_is_refused(monkeypatch):
    monkeypatch.setitem(layout.COLUMNS, "C_SN", 12)          # as if layout.py changed since
    native.status.cache_clear()
    try:
        st = native.status()
    finally:
        monkeypatch.undo()
        native.status.cache_clear()
    assert not st.ok
    assert "another fused-round layout" in st.reason and "C_SN:" in st.reason
    assert "pip install --no-build-isolation -e ." in st.reason
    assert native.status().ok
