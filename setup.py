"""Install deqir_fast. ``pip install --no-build-isolation -e .`` also builds the native
kernels (``kernels/``, ``CMakeLists.txt``) with CMake against the installed torch: a
C++/OpenMP CPU kernel, plus a CUDA C++ kernel when CMake finds nvcc and torch has CUDA.

A failed or skipped native build never fails the install: the package then runs on
its PyTorch reference ops, and ``deqir-fast info`` prints the reason recorded in
``deqir_fast/_native_build.json``. A failed CUDA build is retried CPU-only, so the CPU
kernel survives a CUDA toolchain problem.

The CUDA kernel is built when torch has CUDA, CMake finds nvcc, and either a GPU is
visible at install time (its architecture is used) or ``DEQIR_FAST_CUDA_ARCH`` names the
architectures (e.g. "90" or "80;90"): compiling it for no GPU would cost a CPU-only CI
machine minutes for nothing (~2 minutes per architecture on 2 cores).
``DEQIR_FAST_NO_NATIVE=1`` skips the build; ``DEQIR_FAST_BUILD_JOBS`` sets the parallel
compile jobs (default: CPU count).
"""
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
BUILD_TIMEOUT_S = 1200        # a clean 2-core build takes ~30 s (CPU) to a few minutes (CUDA)


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


def _import_torch():
    """torch, imported without its one warning that does not concern the build: pip
    installs numpy (a dependency) only after building, so under --no-build-isolation
    torch finds no numpy here and warns "Failed to initialize NumPy", which pip prints
    as a BuildBackendWarning even with -q. The kernels are built with no numpy; any
    other warning or error still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Failed to initialize NumPy",
                                category=UserWarning)
        import torch
        import torch.utils.cpp_extension as ce
    return torch, ce


def _quiet_editable_notice():
    """setuptools reports every editable install with an InformationOnly warning
    ("Editable installation. ... folders in your working directory with the same name as
    your package ... may take precedence"), which pip prints as a BuildBackendWarning
    even with -q, on the README's own `pip install -q -e .`. Only that notice is
    silenced (its category and message); every other warning still shows."""
    try:
        from setuptools.warnings import InformationOnly
    except ImportError:          # an older setuptools: no such notice
        return
    warnings.filterwarnings("ignore", message="Editable installation", category=InformationOnly)


def _torch_build_vars():
    torch, ce = _import_torch()
    defs = {
        "TORCH_INCLUDE_DIRS": ";".join(ce.include_paths()),
        "TORCH_LIBRARY_DIRS": ";".join(ce.library_paths()),
        "TORCH_CXX11_ABI": str(int(torch._C._GLIBCXX_USE_CXX11_ABI)),
        "DEQIR_FAST_TORCH_CUDA": "ON" if torch.version.cuda else "OFF",
    }
    arch = os.environ.get("DEQIR_FAST_CUDA_ARCH")
    if not arch and torch.version.cuda:
        try:
            if torch.cuda.is_available():
                major, minor = torch.cuda.get_device_capability()
                arch = f"{major}{minor}"
        except Exception:
            arch = None
    if arch and torch.version.cuda:
        defs["CMAKE_CUDA_ARCHITECTURES"] = arch
        defs["DEQIR_FAST_WITH_CUDA"] = "ON"      # explicit: the CMake cache remembers OFF
    else:
        defs["DEQIR_FAST_WITH_CUDA"] = "OFF"     # no GPU to build for (see the docstring)
    return torch, defs


class CMakeBuild(build_ext):
    """Build the kernels with CMake; on any failure record why and carry on."""

    def run(self):
        if getattr(self, "editable_mode", False):
            self.inplace = True
        for ext in self.extensions:
            self.build_cmake(ext)

    def build_cmake(self, ext):
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        record_path = target.parent / "_native_build.json"
        record = {"ok": False, "library": None, "seconds": None}
        start = time.time()
        try:
            if os.environ.get("DEQIR_FAST_NO_NATIVE") == "1":
                raise RuntimeError("skipped: DEQIR_FAST_NO_NATIVE=1 at install")
            cmake = shutil.which("cmake")
            if cmake is None:
                raise RuntimeError("cmake not found on PATH at install (apt-get install cmake or "
                                   "pip install cmake, then reinstall)")
            try:
                torch, defs = _torch_build_vars()
            except ImportError as exc:
                raise RuntimeError(f"torch is not importable at build time ({exc}): install torch "
                                   "first and use pip install --no-build-isolation") from None
            record["torch"] = torch.__version__
            base = ROOT / "build" / f"native-py{sys.version_info[0]}{sys.version_info[1]}"
            jobs = os.environ.get("DEQIR_FAST_BUILD_JOBS", str(os.cpu_count() or 2))
            log = []
            try:
                build_dir = self._cmake(cmake, base, target, defs, jobs, log)
            except RuntimeError as exc:
                if defs.get("DEQIR_FAST_WITH_CUDA") == "OFF":
                    raise
                # keep the CPU kernel when only the CUDA part fails
                record["cuda_failure"] = str(exc)
                print(f"warning: deqir_fast CUDA kernel not built, retrying CPU-only: {exc}",
                      file=sys.stderr)
                build_dir = self._cmake(cmake, base.with_name(base.name + "-cpu"), target,
                                        dict(defs, DEQIR_FAST_WITH_CUDA="OFF"), jobs, log)
            built = build_dir / f"{target.stem}.so"
            if not built.exists():
                raise RuntimeError(f"CMake finished but {built} is missing")
            tmp = target.with_suffix(".tmp")
            shutil.copyfile(built, tmp)
            os.replace(tmp, target)           # atomic: a loaded old copy keeps its inode
            cuda_line = [ln for ln in "\n".join(log[-2:]).splitlines() if "deqir_fast:" in ln]
            record.update(ok=True, library=target.name, reason="built",
                          configure=[ln.strip("- ").strip() for ln in cuda_line])
        except Exception as exc:     # never fail the install: the reference ops remain
            record["reason"] = str(exc)
            print(f"warning: deqir_fast native kernels not built: {exc}\n"
                  "         the package falls back to its PyTorch reference ops.", file=sys.stderr)
            if target.exists():
                target.unlink()       # never leave a stale library next to a failure record
        record["seconds"] = round(time.time() - start, 1)
        record_path.write_text(json.dumps(record, indent=1) + "\n")

    @staticmethod
    def _cmake(cmake, build_dir, target, defs, jobs, log):
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [cmake, "-S", str(ROOT), "-B", str(build_dir),
                f"-DPython_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release",
                f"-DDEQIR_FAST_OUTPUT_NAME={target.stem}"]
        args += [f"-D{k}={v}" for k, v in defs.items()]
        for cmd in (args, [cmake, "--build", str(build_dir), "-j", jobs]):
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  timeout=BUILD_TIMEOUT_S)
            log.append(proc.stdout + proc.stderr)
            if proc.returncode != 0:
                tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
                raise RuntimeError(f"`{' '.join(cmd[:2])}` failed (exit {proc.returncode}):\n{tail}")
        return build_dir

    def get_outputs(self):
        outs = [o for o in super().get_outputs() if Path(o).exists()]
        for ext in self.extensions:
            rec = Path(self.get_ext_fullpath(ext.name)).parent / "_native_build.json"
            if rec.exists():
                outs.append(str(rec))
        return outs


_quiet_editable_notice()
setup(
    name="deqir_fast",
    version="0.1.0",
    description="Diffusion restoration (DDIM, DDRM, DDNM) solved as one parallel "
                "fixed-point system (DeqIR), with serial reference samplers",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["deqir_fast", "deqir_fast.*"]),
    package_data={"deqir_fast": ["assets/*", "assets/model/*"]},
    ext_modules=[CMakeExtension("deqir_fast._native_kernels")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=["torch>=2.13", "numpy"],
    extras_require={
        "demo": ["diffusers", "safetensors", "scikit-image", "matplotlib", "tqdm", "pillow"],
        "deepinv": ["deepinv"],
    },
    entry_points={"console_scripts": ["deqir-fast = deqir_fast.cli:main"]},
)
