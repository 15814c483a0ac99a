#!/usr/bin/env bash
# Install check for cld_fast: what a plain `pip install .` and `pip wheel .` give, in a new virtual
# environment, never touching the global one. Usage:
#
#   bash tools/install_check.sh [--system-site-packages | --old-setuptools-only] [WORKDIR]
#
# Default: a new `python -m venv` holding a torch that is not the newest release (so a build that
# downloads and builds against the newest torch shows as a mismatch): $TORCH_SPEC, default
# torch==2.13.0+cpu (pip finds the CPU wheel through a find-links folder or the CPU wheel index;
# 183 MB), plus numpy, tqdm and matplotlib.
# --system-site-packages: the venv sees the global torch instead (nothing downloaded). Only where
# cld_fast is not installed globally: a global editable install's import hook would serve its own
# cld_fast._C to the venv, so the script refuses then.
#
# --old-setuptools-only: step 0 alone (seconds, nothing downloaded but `wheel`).
#
# The source tree is copied (tracked and untracked, not ignored files) into WORKDIR/src, so builds
# never write into this checkout. Steps, each timed; any failed check exits non-zero:
#   0 a venv with setuptools 65.5 (what `python -m venv` gives on Python 3.11) and no torch:
#     `pip install --no-build-isolation` without `wheel` stops with setup.py's one line, with
#     --check-build-dependencies with pip's; with `wheel` it installs (pure Python, no torch there)
#     with the licence metadata and both licence files
#   1 plain `pip install SRC` (build isolation): pure-Python install, no torch downloaded into the
#     venv, import warns with the build command, `cld-fast info` says the extension is not built,
#     the torch backend runs an op; `python -m cld_fast --version`
#   2 `pip install --no-build-isolation --no-deps --force-reinstall SRC`: the cpu backend runs, the
#     metadata pins torch==<running release>
#   3 a recorded torch that differs from the running one: import warns, the cpu backend is off and says why
#   4 `pip wheel SRC --no-deps` with and without build isolation; each wheel installs into the venv and
#     runs from another folder (without --no-deps pip also saves every dependency's wheel: GBs)
#   5 `pip install --no-build-isolation -e SRC` (development install) works
#
# Measured 2026-12-02 (2-core CPU box shared with other jobs, torch 2.13.0+cpu from a local wheel,
# CLD_FAST_SKIP_CUDA=1): PASSED in 1660 s wall (5 min 49 s CPU): venv + torch 340 s, plain install
# 70 s (pure Python, no torch downloaded), --no-build-isolation install 640 s (compiling the C++
# kernels), wheels 50 s (pure-Python wheel 178 kB, compiled wheel 5.7 MB; the compiled one reuses
# step 2's objects), editable 550 s (compiles again). Too slow for the test suite: run it by hand.
set -euo pipefail

FRESH=1 OLD_ONLY=0
if [ "${1:-}" = "--system-site-packages" ]; then FRESH=0; shift; fi
if [ "${1:-}" = "--old-setuptools-only" ]; then OLD_ONLY=1; shift; fi
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-$(mktemp -d /tmp/cld_fast_install_check.XXXXXX)}"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
SRC="$WORK/src" VENV="$WORK/venv" ELSEWHERE="$WORK/elsewhere" WHEELS="$WORK/wheels"
rm -rf "$SRC" "$VENV" "$ELSEWHERE" "$WHEELS"
mkdir -p "$SRC" "$ELSEWHERE" "$WHEELS"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore MAX_JOBS="${MAX_JOBS:-2}"
unset PYTHONPATH CLD_FAST_SKIP_CPU_EXT CLD_FAST_SKIP_CUDA CLD_FAST_FORCE_CUDA CLD_FAST_REQUIRE_CUDA
export CLD_FAST_SKIP_CUDA=1  # the check is about packaging; a CUDA build would only add minutes

T0=$SECONDS
step() { echo; echo "== [$((SECONDS - T0)) s] $*"; }
fail() { echo "INSTALL CHECK FAILED: $*" >&2; exit 1; }
command -v git >/dev/null || fail "git is needed to copy the source tree"

step "copy the source tree to $SRC"
(cd "$ROOT" && git ls-files -co --exclude-standard -z | xargs -0 -I{} cp --parents {} "$SRC/")
rm -f "$SRC"/cld_fast/_C*.so "$SRC"/cld_fast/_build_info.json

step "0: setuptools 65.5 and --no-build-isolation"
OLD="$WORK/old-setuptools"
rm -rf "$OLD"
python -m venv --without-pip "$OLD"
python -m pip --python "$OLD/bin/python" install -q "setuptools==65.5.0" pip 2>/dev/null \
  || { python -m venv "$OLD" && "$OLD/bin/python" -m pip install -q "setuptools==65.5.0"; }
"$OLD/bin/python" -m pip uninstall -q -y wheel 2>/dev/null || true
echo "setuptools in the venv: $("$OLD/bin/python" -c 'import setuptools; print(setuptools.__version__)')"
out="$("$OLD/bin/python" -m pip install --no-build-isolation --no-deps "$SRC" 2>&1)" && fail "built without wheel"
echo "$out" | grep -F "cld_fast setup: setuptools 65.5.0 needs the 'wheel' package" || fail "no clear line: $out"
out="$("$OLD/bin/python" -m pip install --no-build-isolation --check-build-dependencies --no-deps "$SRC" 2>&1)" \
  && fail "--check-build-dependencies passed without wheel"
echo "$out" | grep -F "are missing: 'wheel'" || fail "pip did not name the missing build requirement: $out"
"$OLD/bin/python" -m pip install -q wheel
"$OLD/bin/python" -m pip install -q --no-build-isolation --no-deps "$SRC" 2>&1 | tail -5
meta="$(ls -d "$OLD"/lib/python*/site-packages/cld_fast-*.dist-info)/METADATA"
grep -qx "License: Apache-2.0" "$meta" || fail "no License field in $meta"
for f in LICENSE NOTICE; do grep -qx "License-File: $f" "$meta" || fail "$f missing from $meta"; done
echo "setuptools 65.5 + wheel: installed with License: Apache-2.0, License-File: LICENSE, NOTICE"
if [ $OLD_ONLY = 1 ]; then echo; echo "INSTALL CHECK (step 0) PASSED in $((SECONDS - T0)) s"; exit 0; fi

step "create the venv ($([ $FRESH = 1 ] && echo fresh || echo --system-site-packages))"
if [ $FRESH = 1 ]; then
  python -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "${TORCH_SPEC:-torch==2.13.0+cpu}" numpy tqdm matplotlib
else
  python -m venv --system-site-packages "$VENV"
  if (cd "$ELSEWHERE" && "$VENV/bin/python" -c "import importlib.metadata as m; m.distribution('cld_fast')" 2>/dev/null); then
    fail "cld_fast is installed globally; its import hooks would leak into the venv: run without --system-site-packages"
  fi
fi
PY="$VENV/bin/python"
TORCH_VERSION="$(cd "$ELSEWHERE" && "$PY" -c 'import torch; print(torch.__version__)')"
echo "torch in the venv: $TORCH_VERSION"

# run python from a folder outside the source tree; fails unless cld_fast comes from the venv
run_elsewhere() {
  (cd "$ELSEWHERE" && "$PY" -c "import importlib.util as iu; o = iu.find_spec('cld_fast').origin; assert o.startswith('$VENV'), o
$1")
}

step "1: plain pip install (build isolation)"
"$PY" -m pip install -v "$SRC" > "$WORK/plain_install.log" 2>&1 || { tail -30 "$WORK/plain_install.log"; fail "plain pip install"; }
grep -E "Collecting torch|torch-[0-9][^ ]*\.whl" "$WORK/plain_install.log" && fail "the build downloaded a torch"
grep -E "torch was not importable" "$WORK/plain_install.log" | head -1
after="$(cd "$ELSEWHERE" && "$PY" -c 'import torch; print(torch.__version__)')"
[ "$after" = "$TORCH_VERSION" ] || fail "the install changed the venv's torch: $TORCH_VERSION -> $after"
out="$(run_elsewhere "
import warnings
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always')
    import cld_fast as cf
msgs = [str(x.message) for x in w]
assert any('--no-build-isolation' in m for m in msgs), msgs
import torch
assert 'cpu' not in cf.backends() and 'torch' in cf.backends(), cf.backends()
u, noise = cf.perturb(torch.randn(4, 3), torch.full((4,), 0.5), cf.CLD(), generator=torch.Generator().manual_seed(0))
assert u.shape == (4, 6) and bool(torch.isfinite(u).all())
print('pure-Python install ok; warning:', msgs[0][:100], '...')
" 2>&1)" || fail "pure-Python install: $out"
echo "$out"
info="$(cd "$ELSEWHERE" && "$VENV/bin/cld-fast" info 2>/dev/null)"
echo "$info" | grep -E "extension not built|to build it" || fail "cld-fast info does not say the extension is missing"
(cd "$ELSEWHERE" && "$PY" -m cld_fast --version 2>/dev/null) || fail "python -m cld_fast --version"

step "2: pip install --no-build-isolation (against the venv's torch)"
"$PY" -m pip install -q --no-build-isolation --no-deps --force-reinstall "$SRC" 2>&1 | tail -5
out="$(run_elsewhere "
import warnings
warnings.simplefilter('error')
import cld_fast as cf, torch
from importlib.metadata import requires
assert 'cpu' in cf.backends(), cf.backends.get('cpu').why_unavailable()
req = [r for r in requires('cld_fast') if r.startswith('torch')]
assert req == ['torch==' + torch.__version__.split('+')[0]], req
u, _ = cf.perturb(torch.randn(4, 3), torch.full((4,), 0.5), cf.CLD(), generator=torch.Generator().manual_seed(0))
print('compiled install ok:', cf.backends(), req)
" 2>&1)" || fail "compiled install: $out"
echo "$out"

step "3: an extension recorded as built against another torch"
report="$(run_elsewhere "import cld_fast, os; print(os.path.join(os.path.dirname(cld_fast.__file__), '_build_info.json'))")"
cp "$report" "$WORK/report.json"
"$PY" - "$report" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1])); r["torch"] = "2.11.0"; json.dump(r, open(sys.argv[1], "w"))
PYEOF
out="$(run_elsewhere "
import warnings
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always')
    import cld_fast as cf
assert any('built against torch 2.11.0' in str(x.message) for x in w), [str(x.message) for x in w]
assert 'cpu' not in cf.backends()
why = cf.backends.get('cpu').why_unavailable()
assert 'built against torch 2.11.0' in why and '--no-build-isolation' in why, why
print('mismatch refused:', why[:120], '...')
" 2>&1)" || fail "torch mismatch: $out"
echo "$out"
cp "$WORK/report.json" "$report"

step "4: pip wheel --no-deps, isolated and not; install each wheel and run it from another folder"
"$PY" -m pip wheel -q --no-deps -w "$WHEELS/isolated" "$SRC" 2>&1 | tail -5
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS/compiled" "$SRC" 2>&1 | tail -5
ls -la "$WHEELS"/isolated "$WHEELS"/compiled
for kind in isolated compiled; do
  whl="$(ls "$WHEELS/$kind"/cld_fast-*.whl)"
  "$PY" -m pip install -q --no-deps --force-reinstall "$whl"
  out="$(run_elsewhere "
import warnings
warnings.simplefilter('ignore')
import cld_fast as cf, torch, os
has_ext = any(f.startswith('_C') for f in os.listdir(os.path.dirname(cf.__file__)))
assert has_ext == ('$kind' == 'compiled'), (has_ext, '$kind')
assert ('cpu' in cf.backends()) == has_ext, cf.backends()
assert os.path.exists(os.path.join(os.path.dirname(cf.__file__), 'py.typed'))
res = cf.sample(lambda u, t: -u[:, 2:], (8, 2), cf.CLD(), steps=5, generator=torch.Generator().manual_seed(0))
assert bool(torch.isfinite(res.x).all())
print('$kind wheel', os.path.basename('$whl'), 'runs; backends', cf.backends())
" 2>&1)" || fail "$kind wheel: $out"
  echo "$out"
done
unzip -l "$(ls "$WHEELS/compiled"/cld_fast-*.whl)" | grep -E "LICENSE|NOTICE|py.typed|_build_info|_C" || true

step "5: pip install --no-build-isolation -e (development install)"
"$PY" -m pip install -q --no-build-isolation --no-deps -e "$SRC" 2>&1 | tail -5
out="$(cd "$ELSEWHERE" && "$PY" -c "
import cld_fast as cf
assert cf.__file__.startswith('$SRC'), cf.__file__
assert 'cpu' in cf.backends(), cf.backends()
print('editable install ok:', cf.__file__)
" 2>&1)" || fail "editable install: $out"
echo "$out"

echo
echo "INSTALL CHECK PASSED in $((SECONDS - T0)) s (torch $TORCH_VERSION, $([ $FRESH = 1 ] && echo fresh venv || echo venv with system site packages); work folder $WORK)"
