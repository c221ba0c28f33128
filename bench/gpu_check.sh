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
# Intermediate files go to RAW (the lent machine returns at most 8 files from OUT, so
# gpu_check.json embeds them all; bench.md and one plot are copied next to it).
raw="${RAW:-$out/raw}"
mkdir -p "$out" "$raw"
log="$out/gpu_check.log"
# Every step's timeout is cut to what is left of DEADLINE_S (seconds from the start), so
# the script ends, and writes its JSON, inside the lease's limit on one command.
deadline="${DEADLINE_S:-540}"
exec > >(tee "$log") 2>&1
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
py="${PYTHON:-python3}"
steps_json="$raw/steps.jsonl"
: > "$steps_json"
failed=0
start_all=$(date +%s)
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  # wheels carried to a machine without a registry (diffusers for the UNet and the loop)
  "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/gpu_check_site .whl/*.whl && export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
fi

# run NAME TIMEOUT_S CMD...: run a step under a timeout, record status and seconds.
run() {
  local name="$1" limit="$2"; shift 2
  local t0 rc left
  t0=$(date +%s)
  left=$(( deadline - (t0 - start_all) ))
  if [ "$left" -lt 20 ]; then
    echo "=== [$name] skipped: ${left}s left of DEADLINE_S=$deadline"
    printf '{"step": "%s", "status": "skipped (deadline)", "exit": 0, "seconds": 0}\n' "$name" >> "$steps_json"
    return 0
  fi
  [ "$limit" -le "$left" ] || limit="$left"
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
cp deqir_fast/_native_build.json "$raw/native_build.json" 2>/dev/null || true

# Steps in order of value: each is cut short (or skipped) when DEADLINE_S runs out.
# 2. the CUDA tests, for real: kernels vs the reference, solves on CUDA vs serial, the
#    ring's CUDA kernels, CUDA-graph replay vs eager.
if "$py" -c "import pytest" 2>/dev/null; then
  run tests_cuda 150 "$py" -m pytest -q -x -p no:cacheprovider tests/test_kernels_cuda.py \
      tests/test_check_every.py -k "cuda or graph" --junitxml="$raw/tests_cuda.xml"
else
  echo "pytest missing: tests skipped"
  printf '{"step": "tests", "status": "skipped (no pytest)", "exit": 0, "seconds": 0}\n' >> "$steps_json"
fi

# 3. the fused round, torch eager vs CUDA C++ vs Triton, GB/s vs a D2D copy (S=100, 3x256x256)
run bench_round_256 90 "$py" bench/round.py --device cuda --shape 100x1x3x256x256 --repeats 10 \
    --json "$raw/round_256.json"

# 4. end to end on the bundled model: serial vs parallel (each peer), diffusers' loop,
#    NVML telemetry (deqir-fast bench; S = 100, batch 1 and 8; then S = 1000, ours only)
run bench_e2e 150 "$py" -m deqir_fast bench --device cuda --model bundled --chains DDIM,DDPM,DDRM,DDNM \
    --steps 100 --batch 1,8 --repeats 3 --out "$raw/bench_e2e"
run bench_e2e_1000 90 "$py" -m deqir_fast bench --device cuda --model bundled --chains DDIM,DDRM \
    --steps 1000 --batch 1 --peers deqir_fast --repeats 2 --no-loops --out "$raw/bench_e2e_1000"

# 5. solver overhead per round / one batched model call (S=100, 3x256x256, a 109M UNet)
if "$py" -c "import diffusers" 2>/dev/null; then
  run overhead 120 "$py" bench/round.py --device cuda --overhead --overhead-steps 100 --rounds 4 \
      --repeats 3 --json "$raw/overhead.json"
else
  printf '{"step": "overhead", "status": "skipped (no diffusers)", "exit": 0, "seconds": 0}\n' >> "$steps_json"
fi

# 5b. window="auto" (issue #24): the bundled model's rounds at a 109M UNet's cost (256^2),
#     DDIM-100 and DDRM-100: serial vs the whole chain vs the planner (first and warm)
if "$py" -c "import diffusers" 2>/dev/null; then
  run planner_unet 150 "$py" bench/planner.py --unet-cost --device cuda --chains DDIM,DDRM-inp \
      --repeats 2 --json "$raw/planner_unet.json"
else
  printf '{"step": "planner_unet", "status": "skipped (no diffusers)", "exit": 0, "seconds": 0}\n' >> "$steps_json"
fi

# 6. CUDA-graph replay vs eager; the round at S=1000, 3x64x64; the kernel tests on this CPU
run graphs 90 "$py" bench/round.py --device cuda --graphs --repeats 3 --json "$raw/graphs.json"
run bench_round_64 60 "$py" bench/round.py --device cuda --shape 1000x1x3x64x64 --repeats 10 \
    --json "$raw/round_64.json"
if "$py" -c "import pytest" 2>/dev/null; then
  run tests_kernels 120 "$py" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_anderson.py \
      --junitxml="$raw/tests_kernels.xml"
fi

# 6b. step sharding with nccl, only when several GPUs are visible (issue #14)
ngpu="$("$py" -c "import torch; print(torch.cuda.device_count())")"
if [ "$ngpu" -gt 1 ]; then
  run sharding_nccl 90 "$py" -m torch.distributed.run --nproc-per-node "$ngpu" \
      examples/sharded_solve.py --device cuda --steps 100
else
  printf '{"step": "sharding_nccl", "status": "skipped (%s GPU)", "exit": 0, "seconds": 0}\n' "$ngpu" >> "$steps_json"
fi

# 7. one JSON (the lent machine returns few files: everything goes into it)
"$py" - "$out" "$raw" <<'EOF'
import json, shutil, sys, pathlib, platform
out, raw = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
def load(name):
    p = raw / name
    try:
        return json.loads(p.read_text())
    except Exception as exc:
        return {"missing": f"{name}: {exc}"}
import torch
doc = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
       "python": platform.python_version(),
       "steps": [json.loads(l) for l in (raw / "steps.jsonl").read_text().splitlines() if l.strip()],
       "native_build": load("native_build.json"),
       "fused_round_S100_256": load("round_256.json"), "fused_round_S1000_64": load("round_64.json"),
       "overhead": load("overhead.json"), "cuda_graphs": load("graphs.json"),
       "planner_unet": load("planner_unet.json"),
       "bench_e2e": load("bench_e2e/bench.json"), "bench_e2e_1000": load("bench_e2e_1000/bench.json")}
for name in ("bench_e2e/bench.md", "bench_e2e_1000/bench.md", "bench_e2e/bench_time.png", "tests_cuda.xml"):
    if (raw / name).exists() and raw != out:
        shutil.copyfile(raw / name, out / name.replace("/", "_"))
goals = {}
rows = doc["fused_round_S100_256"] if isinstance(doc["fused_round_S100_256"], list) else []
for r in rows:
    for b, f in (r.get("fraction_of_copy") or {}).items():
        goals[f"GB/s {b} {r['sampler']} / copy >= 0.8"] = round(f, 3)
for r in doc["overhead"] if isinstance(doc["overhead"], list) else []:
    goals[f"overhead {r['chain']} {r['backend']} <= 0.05"] = round(r["overhead_fraction"], 4)
for r in (doc["planner_unet"] or {}).get("rows", []) if isinstance(doc["planner_unet"], dict) else []:
    goals[f"planner {r['chain']} auto / serial <= 1.05"] = round(r["auto"] / r["serial"], 3)
doc["goals"] = goals
(out / "gpu_check.json").write_text(json.dumps(doc, indent=1))
print(json.dumps(goals, indent=1))
print("wrote", out / "gpu_check.json")
EOF
echo "gpu_check: done in $(( $(date +%s) - start_all ))s; failures: $failed"
exit "$failed"
