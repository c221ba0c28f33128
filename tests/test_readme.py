"""The README's examples run as written, each code block on its own (a reader copies one
block, not the page), and the quickstart's claim holds."""
import re
import runpy
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_has_python_blocks():
    assert len(PYTHON_BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_python_block_runs_alone(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    exec(compile(PYTHON_BLOCKS[index], f"README.md python block {index + 1}", "exec"), namespace)
    # what the blocks promise, where a block defines it
    if "res" in namespace and hasattr(namespace["res"], "x0"):
        assert namespace["res"].x0.shape == (1, 3, 32, 32)
    if isinstance(namespace.get("g"), dict):
        assert namespace["g"]["x_T"].shape == (1, 3, 32, 32)
    if "opt" in namespace:
        assert len(namespace["opt"].losses) == 10


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
            args += ["--steps", "2", "--images", "1", "--tasks", "sr2", "--out", "demo_out"]
        assert cli.main(args) == 0, command


def test_quickstart_beats_the_baseline(capsys):
    """The README quotes the quickstart's margin over the pseudo-inverse (at 100 steps:
    6.5 dB); 20 steps keep the test fast and give the same margin to 0.2 dB."""
    quickstart = runpy.run_path(str(ROOT / "examples" / "quickstart.py"))
    result = quickstart["main"](steps=20)
    assert result["gain_db"] > 5.0
    assert "dB better" in capsys.readouterr().out
