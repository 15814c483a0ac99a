#!/usr/bin/env bash
# One-shot check of cld_fast on a fresh H100 / H200 machine (torch + triton preinstalled, no network),
# under 8 minutes, most valuable stages first. Run from the repository root:
#
#   bash bench/gpu_check.sh                    # writes ./gpu_check_out (or $OUT)
#   OUT=/tmp/out bash bench/gpu_check.sh
#   bash bench/gpu_check.sh --dry-run          # CPU: CPU-sized variants / echoes (CI); or GPU_CHECK_DRY_RUN=1
#   GPU_CHECK_ONLY=gpu_tests,large bash bench/gpu_check.sh   # only these stages (the others: skipped)
#
# Stages (each under `timeout` with the budget below, SIGKILL 5 s later, logged to $OUT/<stage>.log):
#   build      pip install --no-build-isolation --no-deps -e . with CLD_FAST_REQUIRE_CUDA=1; fails unless
#              cld_fast._C.with_cuda(); copies the build report cld_fast/_build_info.json to $OUT
#   selftest   cld-fast selftest --out $OUT/selftest.md
#   gpu_tests  pytest: CUDA / Triton op tests, the op contract, launch counts, CUDA-graph and no-sync sampler tests
#   sync       bench/gpu_sync_check.py: torch.cuda.set_sync_debug_mode("error") around training steps and sampler loops
#   memcheck   compute-sanitizer --tool memcheck on bench/gpu_memcheck_ops.py (every op, every GPU backend, odd shapes)
#   large      bench/gpu_large_check.py: perturb + loss + SSCS step with B * D > 2^32 against the Philox contract
#   bench      python bench/run.py --only kernels (results in bench/results, copied to $OUT/bench)
# A stage's status is pass, fail, timeout or skipped (exit 77, or not in GPU_CHECK_ONLY); $OUT/summary.md
# has the table and the tail of every failing log. Exit status: 1 if any stage failed or timed out, else 0.
#
# In --dry-run every stage runs a CPU-sized variant (the helper scripts' --cpu-smoke modes, pytest
# --collect-only, a tiny kernel bench) or echoes the GPU command, so CI proves the plumbing, the budget
# and the summary without a GPU. Environment: OUT, PYTHON (default python), MAX_JOBS (default: nproc),
# CLD_FAST_CUDA_ARCH (default: the GPU's compute capability), GPU_CHECK_DRY_RUN, GPU_CHECK_ONLY.
set -u

# ---- budget: seconds per stage, in run order; the sum must stay under 480 -------------------------
# BUDGET-BEGIN
BUDGET=(
  "build      130"
  "selftest    35"
  "gpu_tests  100"
  "sync        25"
  "memcheck    90"
  "large       50"
  "bench       40"
)
# BUDGET-END
TOTAL_LIMIT=480

cd "$(dirname "$0")/.." || exit 2
DRY=${GPU_CHECK_DRY_RUN:-0}
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $arg (use --dry-run)" >&2; exit 2 ;;
  esac
done
[ "$DRY" = "true" ] && DRY=1
OUT=${OUT:-./gpu_check_out}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
PYTHON=${PYTHON:-python}
ONLY=${GPU_CHECK_ONLY:-}
if [ "$DRY" != "1" ]; then
  unset TRITON_INTERPRET  # real Triton kernels on the GPU
fi
export OUT PYTHON DRY PYTHONUNBUFFERED=1

names=(); budgets=(); total=0
for row in "${BUDGET[@]}"; do
  read -r name secs <<<"$row"
  names+=("$name"); budgets+=("$secs"); total=$((total + secs))
done
if [ "$total" -ge "$TOTAL_LIMIT" ]; then
  echo "gpu_check: the stage budgets sum to $total s, not under $TOTAL_LIMIT s" >&2
  exit 2
fi

say() { echo "[gpu_check] $*"; }
dry() { [ "$DRY" = "1" ]; }
# echo a GPU command in dry-run mode instead of running it
would() { echo "dry run: would run: $*"; }

# ---- stages: each a function run as `timeout <budget> bash -c stage_<name>` -------------------------

stage_build() {
  cmd=(env CLD_FAST_REQUIRE_CUDA=1 "$PYTHON" -m pip install -v --no-build-isolation --no-deps -e .)
  if dry; then
    would "${cmd[@]}"
    "$PYTHON" -c "import cld_fast; from cld_fast._extension import compiled_parts; print('installed:', cld_fast.__file__, 'compiled parts:', compiled_parts())" || return 1
    "$PYTHON" -c "from cld_fast.build_info import info_lines; print(chr(10).join(info_lines()))" || return 1
    return 0
  fi
  if [ -z "${CLD_FAST_CUDA_ARCH:-}" ]; then
    arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')
    export CLD_FAST_CUDA_ARCH=${arch:-9.0}
  fi
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  echo "CLD_FAST_CUDA_ARCH=$CLD_FAST_CUDA_ARCH MAX_JOBS=$MAX_JOBS"
  "${cmd[@]}"; rc=$?
  cp -f cld_fast/_build_info.json "$OUT/build_info.json" 2>/dev/null
  [ $rc -eq 0 ] || { echo "pip install failed (rc $rc)"; return 1; }
  "$PYTHON" - <<'PY' || return 1
import sys
import torch  # noqa: F401  (the extension links against torch)
import cld_fast._C as C
from cld_fast.backends import cuda_backend
print("cld_fast._C.with_cuda():", C.with_cuda())
if not C.with_cuda():
    print("FAILED: the extension was built without the CUDA kernels:", cuda_backend.why_unavailable())
    sys.exit(1)
PY
  "$PYTHON" -m cld_fast.cli info
}

stage_selftest() {
  if dry; then
    would "$PYTHON -m cld_fast.cli selftest --out $OUT/selftest.md"
    if ! "$PYTHON" -m cld_fast.cli selftest --help >/dev/null 2>&1; then
      echo "cld-fast selftest is not available in this tree"
      return 77
    fi
    "$PYTHON" -m cld_fast.cli selftest --device cpu --backend cpu,torch --quick --out "$OUT/selftest.md"
    return
  fi
  "$PYTHON" -m cld_fast.cli selftest --out "$OUT/selftest.md"
}

stage_gpu_tests() {
  # the op tests of the GPU backends, then the tests in other files that need CUDA (grep -n "needs CUDA")
  local GPU_TESTS=(tests/test_ops_cuda.py tests/test_ops_triton.py tests/test_ops_contract.py tests/test_launch_counts.py
    tests/test_sampling.py::test_cuda_graph_matches_eager_on_gpu tests/test_sampling.py::test_no_cuda_sync_inside_the_loop
    tests/test_score.py::test_autocast_on_cuda)
  if dry; then
    would "$PYTHON -m pytest -q -p no:cacheprovider -rs ${GPU_TESTS[*]}"
    # collection proves the files and node ids exist (a renamed test fails here)
    "$PYTHON" -m pytest -q -p no:cacheprovider --collect-only "${GPU_TESTS[@]}"
    return
  fi
  # the failure mode this guards against: a broken CUDA build makes tests/test_ops_cuda.py skip everything
  "$PYTHON" - <<'PY' || return 1
import sys
from cld_fast import backends
bad = [f"{n}: {backends.get(n).why_unavailable()}" for n in ("cuda", "triton") if not backends.get(n).is_available()]
print("\n".join(f"FAILED: backend {b}" for b in bad) or "cuda and triton backends available")
sys.exit(1 if bad else 0)
PY
  "$PYTHON" -m pytest -q -p no:cacheprovider -rs "${GPU_TESTS[@]}"
}

# A stage that is one bench/ script: on the GPU as is, in the dry run its --cpu-smoke variant.
run_script_stage() {
  if dry; then
    would "$PYTHON $1"
    "$PYTHON" "$1" --cpu-smoke
    return
  fi
  "$PYTHON" "$1"
}

stage_sync() { run_script_stage bench/gpu_sync_check.py; }

stage_memcheck() {
  if dry; then
    would "PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 $PYTHON bench/gpu_memcheck_ops.py"
    "$PYTHON" bench/gpu_memcheck_ops.py --cpu-smoke
    return
  fi
  sanitizer=$(command -v compute-sanitizer || true)
  if [ -z "$sanitizer" ]; then
    home=$("$PYTHON" -c "import json; print(json.load(open('cld_fast/_build_info.json')).get('cuda_home') or '')" 2>/dev/null)
    for d in "${CUDA_HOME:-}" "$home" /usr/local/cuda; do
      if [ -n "$d" ] && [ -x "$d/bin/compute-sanitizer" ]; then sanitizer="$d/bin/compute-sanitizer"; break; fi
    done
  fi
  if [ -z "$sanitizer" ]; then
    echo "compute-sanitizer not found (PATH, CUDA_HOME, the build's CUDA_HOME, /usr/local/cuda)"
    return 77
  fi
  # no caching allocator: every tensor its own allocation, so an overrun is a memcheck error
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool memcheck --error-exitcode 1 --leak-check no \
    --print-limit 50 "$PYTHON" bench/gpu_memcheck_ops.py
}

stage_large() { run_script_stage bench/gpu_large_check.py; }

stage_bench() {
  if dry; then
    would "$PYTHON bench/run.py --only kernels --out bench/results --no-compile --target-s 0.05"
    "$PYTHON" bench/run.py --quick --only kernels --out "$OUT/bench" --no-latest --no-plots --sizes 2x8 \
      --target-s 0.01 --device cpu --no-compile --impls cpu,torch
    return
  fi
  # --no-compile and short measurements keep it inside the budget; the full bench is bench/run.py alone
  "$PYTHON" bench/run.py --only kernels --out bench/results --no-compile --target-s 0.05; rc=$?
  mkdir -p "$OUT/bench"
  find bench/results -maxdepth 1 -type f -newer "$OUT/.started" -exec cp -f {} "$OUT/bench/" \;
  return $rc
}

export -f say dry would run_script_stage stage_build stage_selftest stage_gpu_tests stage_sync stage_memcheck stage_large stage_bench

# ---- environment, for the summary ---------------------------------------------------------------------

touch "$OUT/.started"
if dry; then
  DEVICE="none (dry run on $(uname -m) CPU)"
else
  DEVICE=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -n 1)
  [ -n "$DEVICE" ] || DEVICE=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')" 2>/dev/null)
fi
TORCH_V=$("$PYTHON" -c "import torch; print(torch.__version__, '(CUDA', str(torch.version.cuda) + ')')" 2>/dev/null || echo "not importable")
TRITON_V=$("$PYTHON" -c "import triton; print(triton.__version__)" 2>/dev/null || echo "not installed")
NVCC_V=$(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*, V[0-9.]*' | head -n 1)
[ -n "$NVCC_V" ] || NVCC_V="nvcc not on PATH"
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo "unknown")
STARTED=$(date '+%Y-%m-%d %H:%M:%S %Z')

statuses=(); seconds=()

write_summary() {
  local f="$OUT/summary.md" i used=0
  {
    echo "# cld_fast GPU check"
    echo
    echo "| | |"
    echo "|---|---|"
    echo "| mode | $([ "$DRY" = "1" ] && echo "dry run (CPU variants)" || echo "GPU") |"
    echo "| device | $DEVICE |"
    echo "| torch | $TORCH_V |"
    echo "| triton | $TRITON_V |"
    echo "| nvcc | $NVCC_V |"
    echo "| git commit | $COMMIT |"
    echo "| date | $STARTED |"
    echo
    echo "| stage | status | seconds | budget | log |"
    echo "|---|---|---:|---:|---|"
    for i in "${!names[@]}"; do
      local st=${statuses[$i]:-not run} sec=${seconds[$i]:-}
      echo "| ${names[$i]} | $st | ${sec:--} | ${budgets[$i]} | ${names[$i]}.log |"
      if [ -n "$sec" ]; then used=$(awk -v a="$used" -v b="$sec" 'BEGIN{printf "%.1f", a + b}'); fi
    done
    echo "| **total** | | $used | $total | |"
    for i in "${!names[@]}"; do
      case "${statuses[$i]:-}" in
        fail|timeout)
          echo
          echo "## ${names[$i]}: ${statuses[$i]} (last lines of ${names[$i]}.log)"
          echo
          echo '```'
          tail -n 25 "$OUT/${names[$i]}.log" 2>/dev/null
          echo '```'
          ;;
      esac
    done
  } >"$f"
}

# ---- run --------------------------------------------------------------------------------------------

say "$( [ "$DRY" = "1" ] && echo "DRY RUN" || echo "GPU run" ) -> $OUT (budget $total s of $TOTAL_LIMIT s)"
failed=0
for i in "${!names[@]}"; do
  name=${names[$i]}
  log="$OUT/$name.log"
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then
    statuses[$i]=skipped; seconds[$i]=0
    echo "skipped: not in GPU_CHECK_ONLY=$ONLY" >"$log"
    write_summary
    continue
  fi
  say "stage $name (budget ${budgets[$i]} s)"
  t0=$(date +%s%N)
  limit=${budgets[$i]}
  # The budgets are the GPU's; the dry run's CPU variants (Triton interpreter) on a loaded 2-core CI
  # machine get three times as long, so a slow CPU does not read as a broken script.
  dry && limit=$((limit * 3))
  timeout --kill-after=5 "$limit" bash -c "stage_$name" >"$log" 2>&1
  rc=$?
  ms=$((($(date +%s%N) - t0) / 1000000))
  seconds[$i]=$(awk -v ms="$ms" 'BEGIN{printf "%.1f", ms / 1000}')
  case $rc in
    0) statuses[$i]=pass ;;
    77) statuses[$i]=skipped ;;
    124|137) statuses[$i]=timeout; failed=1; echo "gpu_check: TIMEOUT after $limit s" >>"$log" ;;
    *) statuses[$i]=fail; failed=1; echo "gpu_check: exit status $rc" >>"$log" ;;
  esac
  say "stage $name: ${statuses[$i]} in ${seconds[$i]} s (log $log)"
  write_summary
done
rm -f "$OUT/.started"
say "summary: $OUT/summary.md"
cat "$OUT/summary.md" | sed -n '/^| stage/,/^| \*\*total/p'
exit $failed
