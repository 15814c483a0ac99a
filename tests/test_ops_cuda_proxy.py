"""tests/test_ops_cuda.py with CLD_FAST_CUDA_TESTS_PROXY=cpu: the CUDA backend's tests, run on the CPU
against the ``cpu`` backend, so the file keeps up with the op API where there is no GPU (CI)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cld_fast.backends import cpu_backend

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.build
@pytest.mark.skipif(not cpu_backend.is_available(), reason="the cpu backend (cld_fast._C) is not built")
def test_cuda_test_file_passes_in_cpu_proxy_mode():
    env = dict(os.environ, CLD_FAST_CUDA_TESTS_PROXY="cpu")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                           str(ROOT / "tests" / "test_ops_cuda.py")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    # the file ran (not skipped as a whole): only the tests that need CUDA itself may skip
    assert " passed" in out and "backend unavailable" not in out, out[-3000:]
    skips = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    assert all("needs CUDA itself" in line for line in skips), "\n".join(skips)
