"""The README's examples run as written, each code block on its own (a reader copies one
block, not the page), and the quickstart's claim holds."""
import ast
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_has_python_blocks():
    assert len(PYTHON_BLOCKS) >= 2


GREY = 2 / 255


def check_gradient_block(ns):
    """The gradient example: x_T.grad is nonzero and is the derivative of the serial
    sampler's loss (a central difference along d, h = 1e-2: 37.092 against 37.097, and
    37.103 with ATEN_CPU_CAPABILITY=default; 2% allowed, the gradient being the solve's
    at its tolerance and the difference float32's); dq.backward gives the same gradient;
    optimize_init lowers the loss (918 -> 525)."""
    grad = ns["x_T"].grad
    assert grad is not None and grad.abs().max() > 1e-2
    assert ns["slope"] == pytest.approx(ns["finite_difference"], rel=0.02)
    assert abs(ns["slope"]) > 1.0
    assert torch.allclose(ns["g"]["x_T"], grad, rtol=1e-4, atol=1e-6)
    opt, reference = ns["opt"], ns["reference"]
    assert len(opt.losses) == 10
    assert (opt.x0 - reference).pow(2).sum() < 0.9 * opt.losses[0]


def check_block(ns):
    """What each block claims, where the block defines it."""
    if "finite_difference" in ns:
        check_gradient_block(ns)
    if "serial" in ns and "res" in ns:                        # Use: parallel = serial
        assert ns["res"].converged and (ns["res"].x0 - ns["serial"]).abs().max() <= GREY
    if "image" in ns and "ddim" in ns:                        # the diffusers loop, tol=0
        assert (ns["res"].x0 - ns["image"]).abs().max() < 1e-4
    if "euler" in ns:                                         # k-diffusion's Euler loop
        assert ns["res"].converged and (ns["sample"] - ns["euler"]).abs().max() <= GREY
    if "loop" in ns:                                          # k-diffusion's other loops
        assert ns["res"].converged and (ns["sample"] - ns["loop"]).abs().max() <= GREY
        assert ns["res_a"].converged and (ns["sample_a"] - ns["loop_a"]).abs().max() <= GREY
    if ("chain" in ns or "dpm" in ns) and "image" in ns and "sample" in ns:   # σ-space loops
        assert ns["res"].converged and (ns["sample"] - ns["image"]).abs().max() <= GREY
    if "res" in ns and hasattr(ns["res"], "x0"):
        assert ns["res"].x0.shape == (1, 3, 32, 32)


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_python_block_runs_alone(index, tmp_path, monkeypatch, capsys):
    """Each block runs alone, prints something (a reader sees a result, not silence), and
    what it shows holds."""
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    exec(compile(PYTHON_BLOCKS[index], f"README.md python block {index + 1}", "exec"), namespace)
    out = capsys.readouterr().out
    assert out.strip(), f"README python block {index + 1} prints nothing"
    check_block(namespace)
    # what a block prints of a loop over samplers holds for each line, not only the last
    # one the namespace keeps: every "converged" True, every "max|... - loop|" within 2/255
    for line in out.splitlines():
        if "converged " in line:
            assert "converged True" in line, line
        for value in re.findall(r"max\|[^|]*- loop\| ([0-9.e+-]+)", line):
            assert float(value) <= GREY, line


def test_the_gradient_example_is_checked():
    """The checks above reach the gradient example (so a zero gradient cannot pass)."""
    assert sum("finite_difference" in block and "x_T.grad" in block for block in PYTHON_BLOCKS) == 1


def command_line_block() -> str:
    section = README.split("## Command line", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def test_readme_command_line_block_runs(tmp_path, monkeypatch, capsys):
    """Every command of the "Command line" block, in order, in-process, with few steps
    (and the demo on one task and image) to stay fast."""
    from deqir_fast import cli
    monkeypatch.chdir(tmp_path)
    commands = [line.split("  #")[0].strip() for line in command_line_block().splitlines()]
    commands = [c for c in commands if c and not c.startswith("#")]
    assert any(c.startswith("deqir-fast restore") for c in commands)
    for command in commands:
        words = shlex.split(command)
        if words[:2] == ["python", "-c"]:
            exec(words[2], {})
            continue
        assert words[0] == "deqir-fast", command
        args = words[1:]
        if args[0] == "restore":
            args += ["--steps", "2"]
        elif args[0] == "demo":
            args += ["--steps", "2", "--images", "1", "--out", "demo_out"]
        assert cli.main(args) == 0, command


def test_the_command_line_block_restores_digits_not_photos():
    """The bundled model is a 32x32 digits model: the README's command examples restore
    the held-out digits, and it says what the model is for (issue #22: photo examples
    restored no better than the baseline)."""
    block = command_line_block()
    assert "heldout_images" in block and "astronaut" not in block
    assert "What the bundled model is for" in README


def test_quickstart_beats_the_baseline(capsys):
    """The README quotes the quickstart's margin over the pseudo-inverse (at 100 steps:
    6.5 dB); 20 steps keep the test fast and give the same margin to 0.2 dB."""
    quickstart = runpy.run_path(str(ROOT / "examples" / "quickstart.py"))
    result = quickstart["main"](steps=20)
    assert result["gain_db"] > 5.0
    assert "dB better" in capsys.readouterr().out


def test_the_build_imports_torch_without_the_numpy_warning():
    """The README's installs build with --no-build-isolation before pip installs numpy, so
    torch, imported by setup.py, warns "Failed to initialize NumPy", which pip prints as a
    BuildBackendWarning through -q. setup.py's ``_import_torch`` silences that one warning
    (the build uses no numpy); a plain import, the control, still shows it."""
    text = (ROOT / "setup.py").read_text(encoding="utf-8")
    tree = ast.parse(text)
    fn = next(node for node in tree.body
              if isinstance(node, ast.FunctionDef) and node.name == "_import_torch")
    head = ("import sys, warnings\nwarnings.simplefilter('default')\n"
            "sys.modules['numpy'] = None\n")          # numpy not installed yet

    def stderr(code):
        proc = subprocess.run([sys.executable, "-c", head + code], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stderr

    assert "Failed to initialize NumPy" in stderr("import torch")
    # another warning raised during the same import (by a finder that warns when
    # torch.utils.cpp_extension is looked up) must still show: only that one is filtered
    other = ("class Warn:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name == 'torch.utils.cpp_extension':\n"
             "            warnings.warn('another warning during the import')\n"
             "sys.meta_path.insert(0, Warn())\n")
    quiet = stderr(other + ast.get_source_segment(text, fn) + "\ntorch, ce = _import_torch()\n")
    assert "Failed to initialize NumPy" not in quiet
    assert "another warning during the import" in quiet
    # and the build imports torch through it, nowhere else
    inside = set(map(id, ast.walk(fn)))
    imports = [alias.name for node in ast.walk(tree)
               if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in inside
               for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])]
    assert not any(name == "torch" or name.startswith("torch.") for name in imports), imports
    build_vars = next(node for node in tree.body
                      if isinstance(node, ast.FunctionDef) and node.name == "_torch_build_vars")
    assert "_import_torch" in {n.func.id for n in ast.walk(build_vars)
                               if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}


def test_the_editable_install_notice_alone_is_quiet():
    """setuptools' "Editable installation." notice (pip prints it as a BuildBackendWarning
    through the README's `pip install -q -e .`) is silenced by setup.py; its other
    notices and warnings are not."""
    pytest.importorskip("setuptools.warnings")
    text = (ROOT / "setup.py").read_text(encoding="utf-8")
    fn = next(node for node in ast.parse(text).body
              if isinstance(node, ast.FunctionDef) and node.name == "_quiet_editable_notice")
    code = ("import warnings\nwarnings.simplefilter('default')\n"
            + ast.get_source_segment(text, fn) + "\n_quiet_editable_notice()\n"
            "from setuptools.warnings import InformationOnly\n"
            "InformationOnly.emit('Editable installation.', 'folders with the same name')\n"
            "InformationOnly.emit('Another notice.', 'still shown')\n"
            "warnings.warn('Editable installation of something else')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "folders with the same name" not in proc.stderr
    assert "Another notice." in proc.stderr
    assert "Editable installation of something else" in proc.stderr
    # setup.py calls it before setup() runs the build
    calls = [node.value.func.id for node in ast.parse(text).body
             if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
             and isinstance(node.value.func, ast.Name)]
    assert "_quiet_editable_notice" in calls and "setup" in calls
    assert calls.index("_quiet_editable_notice") < calls.index("setup")
