#!/usr/bin/env bash
# The one script to run on a lent GPU machine (see bench/RESULTS.md): installs, runs the
# CUDA-relevant tests and times the GPU paths. Sized to finish in well under 8 minutes.
# Results land in $OUT (or ./gpu_out) as gpu_check.log.
set -uo pipefail
out="${OUT:-gpu_out}"; mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -m pip install -q -r requirements-test.txt && python3 -m pip install -q --no-build-isolation -e . || exit 1
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'triton', triton.__version__)"
timeout 240 python3 -m pytest -q -x tests/test_parity.py tests/test_triton_scan.py tests/test_gradients.py -k "not 100" || echo "TESTS FAILED"
timeout 120 python3 bench/scan.py --device cuda
timeout 120 deqir-fast demo --device cuda --quiet --out "$out"
DEQIR_FAST_BACKEND=triton timeout 120 deqir-fast demo --device cuda --quiet --out "$out/triton"
