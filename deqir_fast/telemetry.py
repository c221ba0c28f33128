"""What a timed run costs besides time: peak memory and, on an NVIDIA GPU, NVML readings
(``deqir-fast bench``, ``deqir_fast.benchmark``).

- ``PeakMemory``: the peak during a block. On CUDA the torch allocator's peak
  (``torch.cuda.max_memory_allocated``, reset on entry). On a CPU the process's resident
  set size: Linux's high-water mark VmHWM, reset on entry through ``/proc/self/clear_refs``;
  where that is not possible, the lifetime peak (``resource.getrusage``), marked as such.
- ``GpuMonitor``: nvidia-ml-py (``pynvml``) read in a background thread while the block
  runs: device memory used, SM utilisation, power, and the energy the block used (the
  driver's energy counter where the GPU has one, else the power samples integrated).
  Without a GPU, without nvidia-ml-py or without a driver (``pynvml.NVMLError``) it
  records nothing and says why in ``reason``; it never raises.
"""
from __future__ import annotations

import re
import sys
import threading
import time
from typing import Dict, List, Optional

import torch

MB = 2 ** 20

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _status_kb(key: str) -> Optional[int]:
    try:
        with open(_STATUS, encoding="ascii") as f:
            match = re.search(rf"^{key}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_hwm() -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open(_CLEAR_REFS, "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _lifetime_peak_mb() -> Optional[float]:
    try:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):
        return None
    return peak / MB if sys.platform == "darwin" else peak / 1024     # bytes on macOS, kB else


def rss_mb() -> Optional[float]:
    """The process's resident set size now (Linux), in MiB."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak_mb`` (peak during the block),
    ``m.added_mb`` (peak minus the memory in use on entry) and ``m.kind``:
    ``"cuda allocator"``, ``"rss"`` (peak RSS of the block) or ``"rss, process
    lifetime"`` (the process's peak since it started: the block's cannot be isolated
    here; ``added_mb`` is then None)."""

    def __init__(self, device=None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.peak_mb: Optional[float] = None
        self.added_mb: Optional[float] = None
        self.kind = ""
        self._start: Optional[float] = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device) / MB
            self.kind = "cuda allocator"
        elif _reset_hwm() and _status_kb("VmHWM") is not None:
            self._start = rss_mb()
            self.kind = "rss"
        else:
            self._start = None
            self.kind = "rss, process lifetime"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / MB
        elif self.kind == "rss":
            self.peak_mb = _status_kb("VmHWM") / 1024
        else:
            self.peak_mb = _lifetime_peak_mb()
        if self._start is not None and self.peak_mb is not None:
            self.added_mb = max(self.peak_mb - self._start, 0.0)


# -- NVML ---------------------------------------------------------------------------------
_NVML: Dict[str, object] = {}


def _nvml():
    """(pynvml module, None) once NVML is initialised, else (None, why not). Cached."""
    if "module" in _NVML:
        return _NVML["module"], _NVML["reason"]
    try:
        import pynvml
    except ImportError:
        module, reason = None, "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
    else:
        try:
            pynvml.nvmlInit()
            module, reason = pynvml, None
        except pynvml.NVMLError as exc:          # no driver, no library, no GPU
            module, reason = None, f"NVML unavailable ({exc})"
    _NVML.update(module=module, reason=reason)
    return module, reason


def nvml_status(device=None) -> Dict[str, object]:
    """``{"available": bool, "reason": why not (or ""), "name": the GPU NVML reports}``
    for ``device`` (a CUDA device; anything else gives available False)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda":
        return {"available": False, "reason": f"no NVIDIA GPU in use (device {device})", "name": ""}
    nvml, reason = _nvml()
    if nvml is None:
        return {"available": False, "reason": reason, "name": ""}
    try:
        handle = _handle(nvml, device)
        name = nvml.nvmlDeviceGetName(handle)
    except nvml.NVMLError as exc:
        return {"available": False, "reason": f"NVML has no handle for {device} ({exc})", "name": ""}
    return {"available": True, "reason": "", "name": name.decode() if isinstance(name, bytes) else name}


def _handle(nvml, device: torch.device):
    """The NVML handle of a torch CUDA device: by PCI bus id (CUDA_VISIBLE_DEVICES may
    renumber devices), else by index."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        props = torch.cuda.get_device_properties(index)
        bus = f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
    except (RuntimeError, AttributeError, AssertionError, TypeError, ValueError):
        bus = None
    if bus is not None:
        try:
            return nvml.nvmlDeviceGetHandleByPciBusId(bus)
        except nvml.NVMLError:
            pass
    return nvml.nvmlDeviceGetHandleByIndex(index)


GPU_FIELDS = ("gpu_mem_used_mb", "sm_util_mean", "sm_util_max", "power_mean_w", "power_max_w",
              "energy_j", "energy_source", "samples")


class GpuMonitor:
    """``with GpuMonitor(device) as g: ...`` samples NVML every ``interval`` seconds in a
    background thread; ``g.summary()`` is a dict of ``GPU_FIELDS`` (None without NVML;
    ``g.reason`` says why). Memory is the device's (every process on it), SM utilisation
    is the driver's busy fraction over its own sampling period (1/6 s to 1 s), so runs
    shorter than that read coarsely."""

    def __init__(self, device=None, interval: float = 0.02):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.interval = interval
        status = nvml_status(self.device)
        self.available = bool(status["available"])
        self.reason = str(status["reason"])
        self._nvml = _nvml()[0] if self.available else None
        self._handle = _handle(self._nvml, self.device) if self.available else None
        self._samples: List[tuple] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._energy0 = self._energy1 = None
        self._t0 = self._t1 = 0.0

    def _energy_mj(self) -> Optional[float]:
        try:
            return float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
        except self._nvml.NVMLError:             # not supported before Volta
            return None

    def _sample(self) -> None:
        nvml, h = self._nvml, self._handle
        try:
            mem = nvml.nvmlDeviceGetMemoryInfo(h).used / MB
            util = float(nvml.nvmlDeviceGetUtilizationRates(h).gpu)
            power = nvml.nvmlDeviceGetPowerUsage(h) / 1000.0          # mW -> W
        except nvml.NVMLError:
            return
        self._samples.append((time.perf_counter(), mem, util, power))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "GpuMonitor":
        if self.available:
            self._samples = []
            self._stop.clear()
            self._energy0 = self._energy_mj()
            self._t0 = time.perf_counter()
            self._thread = threading.Thread(target=self._loop, name="deqir-fast-nvml", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.available and self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._sample()                       # at least one reading, even for a short block
            self._t1 = time.perf_counter()
            self._energy1 = self._energy_mj()

    def summary(self) -> Dict[str, object]:
        out: Dict[str, object] = {k: None for k in GPU_FIELDS}
        if not self.available or not self._samples:
            return out
        _, mem, util, power = zip(*self._samples)
        out.update(gpu_mem_used_mb=max(mem), sm_util_mean=sum(util) / len(util),
                   sm_util_max=max(util), power_mean_w=sum(power) / len(power),
                   power_max_w=max(power), samples=len(self._samples))
        if self._energy0 is not None and self._energy1 is not None:
            out.update(energy_j=(self._energy1 - self._energy0) / 1000.0, energy_source="counter")
        else:
            times = [self._t0] + [s[0] for s in self._samples]
            watts = [power[0]] + list(power)
            energy = sum((t1 - t0) * (w0 + w1) / 2
                         for t0, t1, w0, w1 in zip(times, times[1:], watts, watts[1:]))
            out.update(energy_j=energy, energy_source="power integrated")
        return out
