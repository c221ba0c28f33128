"""The README's Python examples run as written."""
import re
from pathlib import Path


def test_readme_python_blocks_run(capsys):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 2
    namespace = {}
    exec(compile("\n".join(blocks), "README.md", "exec"), namespace)
    assert namespace["res"].x0.shape == (1, 3, 32, 32)
    assert namespace["g"]["x_T"].shape == (1, 3, 32, 32)
    assert len(namespace["opt"].losses) == 10
