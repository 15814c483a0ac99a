"""Build checks of csrc/: the CUDA kernel files compile with plain nvcc (no GPU needed).

``.ci/compile_cuda.sh`` compiles every csrc/cuda/*.cu for sm_80 and sm_90 and syntax-checks the torch
binding; it runs here whenever nvcc is on PATH (or at /usr/local/cuda/bin/nvcc).
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "compile_cuda.sh"
TORCH_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](torch|ATen|c10)/', re.M)


def _nvcc():
    return shutil.which("nvcc") or next((p for p in ["/usr/local/cuda/bin/nvcc"] if os.access(p, os.X_OK)), None)


def _local_includes(path: Path):
    return re.findall(r'^\s*#\s*include\s*"([^"]+)"', path.read_text(), re.M)


def test_cuda_kernel_files_include_no_torch_headers():
    """Kernel files (and the headers they pull from csrc/include) stay torch-free, so plain nvcc builds them."""
    kernels = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    assert kernels, "no csrc/cuda/*.cu kernel files"
    seen, todo = set(), list(kernels)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        assert not TORCH_INCLUDE.search(path.read_text()), f"{path.relative_to(ROOT)} includes a torch header"
        for inc in _local_includes(path):
            for base in (path.parent, ROOT / "csrc" / "include"):
                if (base / inc).exists():
                    todo.append((base / inc).resolve())
                    break


@pytest.mark.build
@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
def test_compile_cuda_script_passes():
    env = dict(os.environ, NVCC=_nvcc())
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    for kernel in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        assert f"compiled  csrc/cuda/{kernel.name}" in proc.stdout, log[-6000:]
    assert "compile_cuda: OK" in proc.stdout
