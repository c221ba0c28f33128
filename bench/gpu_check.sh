#!/usr/bin/env bash
# The one script to run on a lent GPU machine (issue #10): builds the native kernels with
# CUDA, runs the CUDA tests for real (compiled Triton and CUDA C++, not the interpreter),
# times the kernels against torch eager with achieved GB/s against a measured
# device-to-device copy, measures the solver's overhead per round against one batched
# UNet call at S=100, 3x256x256, times CUDA-graph replay against eager, and writes ONE
# JSON: $OUT/gpu_check.json (OUT defaults to ./gpu_out), with the log next to it.
#
#   bash bench/gpu_check.sh            # ~5 minutes on one H200; every step has a timeout
#
# Offline-safe: it installs nothing from the network. It needs a python3 whose torch has
# CUDA (and triton, pytest, diffusers for the tests and the UNet); a missing piece skips
# its step and is recorded as such. Each step's status, time and output file go into
# the JSON; a failing step does not stop the others (the exit status is 1 then).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"
mkdir -p "$out"
log="$out/gpu_check.log"
exec > >(tee "$log") 2>&1
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
py="${PYTHON:-python3}"
steps_json="$out/steps.jsonl"
: > "$steps_json"
failed=0
start_all=$(date +%s)

# run NAME TIMEOUT_S CMD...: run a step under a timeout, record status and seconds.
run() {
  local name="$1" limit="$2"; shift 2
  local t0 rc
  t0=$(date +%s)
  echo
  echo "=== [$name] (timeout ${limit}s): $*"
  set +e
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  set -e
  local dt=$(( $(date +%s) - t0 ))
  local status=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=timeout; elif [ "$rc" -ne 0 ]; then status=failed; fi
  [ "$status" = ok ] || failed=1
  echo "=== [$name] $status (exit $rc) in ${dt}s"
  printf '{"step": "%s", "status": "%s", "exit": %d, "seconds": %d}\n' "$name" "$status" "$rc" "$dt" >> "$steps_json"
}

echo "gpu_check: $(date -u +%FT%TZ) in $(pwd), output in $out"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "FATAL: $py has no CUDA torch (torch.cuda.is_available() is False); nothing to check"
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda build', torch.version.cuda)" || true
  printf '{"fatal": "no CUDA torch"}\n' > "$out/gpu_check.json"
  exit 1
fi
"$py" - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0))
for m in ("triton", "pytest", "diffusers"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as exc:
        print(m, "MISSING:", exc)
EOF

# 1. build: the package with its native kernels (CPU + CUDA C++), as users install it.
#    No dependencies are fetched. If pip cannot build here (no setuptools offline, ...),
#    build the library with CMake directly and point the package at it. nvcc must be on
#    PATH for the CUDA kernel (else it is skipped and the build record says so).
export DEQIR_FAST_BUILD_JOBS="${DEQIR_FAST_BUILD_JOBS:-16}"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
run build 420 "$py" -m pip install --no-deps --no-build-isolation --no-index -e .
if ! "$py" -c "import sys; from deqir_fast.ops import native; st = native.status(); print(st); sys.exit(0 if st.ok and st.cuda else 1)"; then
  echo "the pip build gave no CUDA kernel: building with CMake directly"
  arch="$("$py" -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}')")"
  run build_cmake 420 bash -c "cmake -S . -B build/gpu_check -DPython_EXECUTABLE=$py -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_CUDA_ARCHITECTURES=$arch -DDEQIR_FAST_TORCH_CUDA=ON && cmake --build build/gpu_check -j $DEQIR_FAST_BUILD_JOBS"
  if [ -f build/gpu_check/deqir_fast_kernels.so ]; then
    export DEQIR_FAST_NATIVE_LIB="$(pwd)/build/gpu_check/deqir_fast_kernels.so"
  fi
fi
"$py" -m deqir_fast info 2>&1 | tail -12 || true
cp deqir_fast/_native_build.json "$out/native_build.json" 2>/dev/null || true

# 2. the CUDA tests, for real: kernels vs the reference, solves on CUDA vs serial, the
#    ring's CUDA kernels, CUDA-graph replay vs eager; then the CPU kernel tests again.
if "$py" -c "import pytest" 2>/dev/null; then
  run tests_cuda 240 "$py" -m pytest -q -x -p no:cacheprovider tests/test_kernels_cuda.py \
      tests/test_check_every.py -k "cuda or graph" --junitxml="$out/tests_cuda.xml"
  run tests_kernels 180 "$py" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_anderson.py \
      --junitxml="$out/tests_kernels.xml"
else
  echo "pytest missing: tests skipped"
  printf '{"step": "tests", "status": "skipped (no pytest)", "exit": 0, "seconds": 0}\n' >> "$steps_json"
fi

# 3. timings: the fused round, torch eager vs CUDA C++ vs Triton, GB/s vs a D2D copy
#    (S=100 at 3x256x256 and S=1000 at 3x64x64, B=1).
run bench_round_256 120 "$py" bench/round.py --device cuda --shape 100x1x3x256x256 --repeats 10 \
    --json "$out/round_256.json"
run bench_round_64 120 "$py" bench/round.py --device cuda --shape 1000x1x3x64x64 --repeats 10 \
    --json "$out/round_64.json"

# 4. solver overhead per round / one batched model call (S=100, 3x256x256, a 109M UNet)
if "$py" -c "import diffusers" 2>/dev/null; then
  run overhead 180 "$py" bench/round.py --device cuda --overhead --overhead-steps 100 --rounds 4 \
      --repeats 3 --json "$out/overhead.json"
else
  printf '{"step": "overhead", "status": "skipped (no diffusers)", "exit": 0, "seconds": 0}\n' >> "$steps_json"
fi

# 5. CUDA-graph replay vs eager
run graphs 120 "$py" bench/round.py --device cuda --graphs --repeats 3 --json "$out/graphs.json"

# 6. one JSON
"$py" - "$out" <<'EOF'
import json, sys, pathlib, platform
out = pathlib.Path(sys.argv[1])
def load(name):
    p = out / name
    try:
        return json.loads(p.read_text())
    except Exception as exc:
        return {"missing": f"{name}: {exc}"}
import torch
doc = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
       "python": platform.python_version(),
       "steps": [json.loads(l) for l in (out / "steps.jsonl").read_text().splitlines() if l.strip()],
       "native_build": load("native_build.json"),
       "fused_round_S100_256": load("round_256.json"), "fused_round_S1000_64": load("round_64.json"),
       "overhead": load("overhead.json"), "cuda_graphs": load("graphs.json")}
goals = {}
rows = doc["fused_round_S100_256"] if isinstance(doc["fused_round_S100_256"], list) else []
for r in rows:
    for b, f in (r.get("fraction_of_copy") or {}).items():
        goals[f"GB/s {b} {r['sampler']} / copy >= 0.8"] = round(f, 3)
for r in doc["overhead"] if isinstance(doc["overhead"], list) else []:
    goals[f"overhead {r['chain']} {r['backend']} <= 0.05"] = round(r["overhead_fraction"], 4)
doc["goals"] = goals
(out / "gpu_check.json").write_text(json.dumps(doc, indent=1))
print(json.dumps(goals, indent=1))
print("wrote", out / "gpu_check.json")
EOF
echo "gpu_check: done in $(( $(date +%s) - start_all ))s; failures: $failed"
exit "$failed"
