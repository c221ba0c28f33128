"""The fused-round Triton kernel against the reference, through Triton's interpreter
(a fresh process: TRITON_INTERPRET=1 must be set before triton is imported)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_triton_round_matches_reference_in_the_interpreter():
    here = Path(__file__).resolve().parent
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(here), str(here.parent)]))
    env.pop("DEQIR_FAST_BACKEND", None)
    proc = subprocess.run([sys.executable, str(here / "triton_round_check.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
