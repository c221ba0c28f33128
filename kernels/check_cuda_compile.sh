#!/usr/bin/env bash
# Compile kernels/fused_round_cuda.cu to an object file with nvcc against the installed
# torch's headers, without linking: a check that runs on a machine with nvcc but a CPU
# build of torch (which is how it was checked during development; a real build needs a
# CUDA torch and happens in `pip install`).
#
# The CPU wheel of torch lacks exactly one header the CUDA sources need:
#   c10/cuda/impl/cuda_cmake_macros.h   (generated when torch is built with CUDA)
# and the libraries to link against (libc10_cuda.so, libtorch_cuda.so). The header is
# shimmed here with the content a CUDA build generates (C10_CUDA_BUILD_SHARED_LIBS).
#   usage: kernels/check_cuda_compile.sh [sm arch, default 90]
set -euo pipefail
cd "$(dirname "$0")/.."
arch="${1:-90}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/shim/c10/cuda/impl"
inc="$(python -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")"
abi="$(python -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")"
hdr="$(python -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'include/c10/cuda/impl/cuda_cmake_macros.h'))")"
if [ ! -f "$hdr" ]; then
  echo "torch's headers lack c10/cuda/impl/cuda_cmake_macros.h (a CPU wheel): shimming it"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$tmp/shim/c10/cuda/impl/cuda_cmake_macros.h"
fi
time nvcc -std=c++20 -O3 -arch="sm_${arch}" -Xcompiler -fPIC -D_GLIBCXX_USE_CXX11_ABI="$abi" \
  $inc -I"$tmp/shim" -Ikernels -Xptxas -v -c kernels/fused_round_cuda.cu -o "$tmp/fused_round_cuda.o" 2>&1 \
  | grep -E "error|ptxas info *: (Used|Compiling entry)" | sed 's/ptxas info *: //' | head -80
test -s "$tmp/fused_round_cuda.o" && echo "OK: kernels/fused_round_cuda.cu compiles for sm_${arch}"
