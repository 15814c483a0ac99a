#!/usr/bin/env bash
# Compile-only check of the CUDA sources, for machines with nvcc but no GPU (and CI).
#
#   1. every kernel file csrc/cuda/*.cu with plain nvcc (no torch), for sm_80 and sm_90, with the
#      defines torch's CUDAExtension adds (no implicit half / bfloat16 conversions) and the nvcc flags
#      of setup.py (--use_fast_math);
#   2. a syntax check of the torch binding csrc/cuda/*.cpp with the host compiler against torch's
#      include dirs and the CUDA headers, as setup.py builds it with CLD_FAST_WITH_CUDA. This step is
#      skipped (not failed) when torch, a host compiler or the CUDA headers are missing, or when
#      CLD_FAST_SKIP_BINDING_CHECK=1.
#
# Exits non-zero if any compilation fails. Environment: NVCC (default: nvcc on PATH, then
# /usr/local/cuda/bin/nvcc), PYTHON (default python3), CXX (default g++).
set -u
cd "$(dirname "$0")/.." || exit 2

NVCC=${NVCC:-$(command -v nvcc || true)}
[ -n "$NVCC" ] || NVCC=/usr/local/cuda/bin/nvcc
if ! [ -x "$NVCC" ] && ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "compile_cuda: nvcc not found (set NVCC=/path/to/nvcc)" >&2
  exit 2
fi
echo "compile_cuda: $("$NVCC" --version | tail -n 2 | head -n 1)"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

GENCODE=(-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90)
TORCH_DEFINES=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr)
FLAGS=(-std=c++20 -O3 --use_fast_math -I csrc/include --threads 2 "${TORCH_DEFINES[@]}" "${GENCODE[@]}")

fail=0
shopt -s nullglob
kernels=(csrc/cuda/*.cu)
if [ ${#kernels[@]} -eq 0 ]; then
  echo "compile_cuda: no csrc/cuda/*.cu files" >&2
  exit 1
fi
for f in "${kernels[@]}"; do
  if "$NVCC" "${FLAGS[@]}" -c "$f" -o "$tmp/$(basename "$f").o"; then
    echo "compiled  $f  (nvcc, sm_80 + sm_90)"
  else
    echo "FAILED    $f  (nvcc)"
    fail=1
  fi
done

# ---- 2. the torch-facing binding --------------------------------------------------------------
bindings=(csrc/cuda/*.cpp)
PYTHON=${PYTHON:-python3}
CXX=${CXX:-g++}
skip=""
if [ "${CLD_FAST_SKIP_BINDING_CHECK:-0}" = "1" ]; then
  skip="CLD_FAST_SKIP_BINDING_CHECK=1"
elif [ ${#bindings[@]} -eq 0 ]; then
  skip="no csrc/cuda/*.cpp binding"
elif ! command -v "$CXX" >/dev/null 2>&1; then
  skip="no host compiler $CXX"
fi
torch_inc=""
if [ -z "$skip" ]; then
  torch_inc=$("$PYTHON" - <<'PY' 2>/dev/null
import sysconfig
from torch.utils.cpp_extension import include_paths
print("\n".join(include_paths() + [sysconfig.get_paths()["include"]]))
PY
) || skip="torch not importable with $PYTHON"
fi
# The CUDA headers: CUDA_HOME / CUDA_PATH, next to nvcc (nvcc may be a wrapper script, so also ask it
# where its includes are), then /usr/local/cuda.
cuda_inc=""
nvcc_dir="$(dirname "$(readlink -f "$(command -v "$NVCC")")")"
dryrun_inc=$("$NVCC" -dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/.*INCLUDES="*-I"*\([^" ]*\)".*/\1/p' | head -n 1)
for d in "${CUDA_HOME:-}/include" "${CUDA_PATH:-}/include" "$nvcc_dir/../include" "$dryrun_inc" /usr/local/cuda/include; do
  if [ -f "$d/cuda_runtime_api.h" ]; then
    cuda_inc="$d"
    break
  fi
done
if [ -z "$skip" ] && [ -z "$cuda_inc" ]; then
  skip="no CUDA headers found (set CUDA_HOME)"
fi
if [ -n "$skip" ]; then
  echo "skipped   binding syntax check ($skip)"
else
  inc=(-I csrc/include -I "$cuda_inc")
  while IFS= read -r d; do [ -n "$d" ] && inc+=(-I "$d"); done <<<"$torch_inc"
  # A CPU-only torch wheel ships c10/cuda but not the generated c10/cuda/impl/cuda_cmake_macros.h.
  has_macros=0
  while IFS= read -r d; do [ -f "$d/c10/cuda/impl/cuda_cmake_macros.h" ] && has_macros=1; done <<<"$torch_inc"
  if [ $has_macros -eq 0 ]; then
    mkdir -p "$tmp/stub/c10/cuda/impl"
    echo "#define C10_CUDA_BUILD_SHARED_LIBS" >"$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"
    inc+=(-I "$tmp/stub")
  fi
  for f in "${bindings[@]}"; do
    if "$CXX" -std=c++20 -fsyntax-only -DCLD_FAST_WITH_CUDA "${inc[@]}" -x c++ "$f"; then
      echo "checked   $f  ($CXX -fsyntax-only against torch + CUDA headers)"
    else
      echo "FAILED    $f  ($CXX -fsyntax-only)"
      fail=1
    fi
  done
fi

if [ $fail -ne 0 ]; then
  echo "compile_cuda: FAILED"
  exit 1
fi
echo "compile_cuda: OK"
