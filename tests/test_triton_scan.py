"""The Triton scan kernel against the reference, through Triton's CPU interpreter."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_triton_scan_matches_reference_in_the_interpreter():
    script = Path(__file__).with_name("triton_interpret_check.py")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_backend_dispatch(monkeypatch):
    import torch

    from deqir_fast.ops import backends, scan_backend
    x = torch.zeros(2, 2)

    def setting(value):
        if value is None:
            monkeypatch.delenv("DEQIR_FAST_BACKEND", raising=False)
        else:
            monkeypatch.setenv("DEQIR_FAST_BACKEND", value)
        backends.reset()                            # the setting is read once per process

    setting(None)
    assert scan_backend(x) == "reference"          # CPU tensors: the reference
    setting("native")
    assert scan_backend(x) == "reference"          # there is no native generic scan
    setting("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA tensors or TRITON_INTERPRET=1"):
        scan_backend(x)                             # CPU without the interpreter: no kernel
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert scan_backend(x) == "triton"
    setting("cuda-magic")
    with pytest.raises(ValueError, match="DEQIR_FAST_BACKEND"):
        scan_backend(x)
    setting(None)
