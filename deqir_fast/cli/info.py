"""``deqir-fast info``: the versions of deqir-fast and its dependencies, the devices torch
sees, and the kernel backends each device would use (and why the others cannot)."""
from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import List, Tuple

import torch

from .. import __version__
from ..figures import plural
from ..ops import backends


def add_arguments(i) -> None:
    """info's one option."""
    i.add_argument("--verbose", action="store_true", help="show the traceback of an error")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def devices() -> list:
    found = [torch.device("cpu")]
    if torch.cuda.is_available():
        found += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append(torch.device("mps"))
    return found


def device_lines() -> List[Tuple[str, str]]:
    lines = [("cpu", f"{plural(torch.get_num_threads(), 'thread')} (OMP_NUM_THREADS="
                     f"{os.environ.get('OMP_NUM_THREADS', 'unset')})")]
    for device in devices()[1:]:
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            lines.append((str(device), f"{props.name}, {props.total_memory / 2**30:.0f} GiB, "
                                       f"compute {props.major}.{props.minor}"))
        else:
            lines.append((str(device), "available"))
    if len(lines) == 1:
        lines.append(("cuda", "none visible to torch"))
    return lines


def backend_lines() -> List[Tuple[str, str]]:
    """The hot operations' backends: which exist, which one each device gets and why
    (``deqir_fast/ops/backends.py``). The "scan backends" line lists only the backends
    usable on some device here, and says why each other one is not."""
    found = devices()
    lines = backends.info_lines(found)
    usable, unusable = [], []
    for name in backends.CHOICES[1:]:                 # CHOICES[0] is "auto"
        reasons = []
        for device in found:
            try:
                ok, why = backends.available(device)[name]
            except Exception as exc:  # noqa: BLE001 - info never fails on one probe
                ok, why = False, f"error: {exc}"
            if ok:
                break
            reasons.append(why)
        else:
            # The same reason on every device is said once; else the first device's.
            unusable.append(f"{name} ({reasons[0] if reasons else 'no device'})")
            continue
        usable.append(name + (" (reference)" if name == "torch" else ""))
    text = ", ".join(usable) + (f"; not usable here: {'; '.join(unusable)}" if unusable else "")
    return [(key, text if key == "scan backends" else value) for key, value in lines]


def environment_lines() -> List[Tuple[str, str]]:
    cuda = torch.version.cuda or "none"
    lines = [("deqir-fast", __version__), ("python", platform.python_version()),
             ("torch", f"{torch.__version__} (CUDA build: {cuda})")]
    lines += [(name, _version(name)) for name in ("triton", "diffusers", "numpy", "scikit-image",
                                                  "pillow", "matplotlib")]
    return lines + device_lines() + backend_lines()


def run_info(args) -> int:
    lines = environment_lines()
    width = max(len(k) for k, _ in lines) + 2
    for key, value in lines:
        print(f"{key:<{width}}{value}")
    return 0
