"""Install layout and the `cld-fast info` command."""
import os
import subprocess
import sys

import cld_fast as cf


def _run(code, cwd):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_generic_names_are_not_top_level_packages(tmp_path):
    # Outside the source tree nothing called `models` or `triton_kernels` may be importable.
    res = _run("import importlib.util as u; print(u.find_spec('models'), u.find_spec('triton_kernels'))", tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "None None"
    res = _run("import cld_fast.models, cld_fast.triton_kernels; print('ok')", tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_backends_lists_torch_and_registry_is_callable():
    names = cf.backends()
    assert "torch" in names
    assert names == cf.backends.available()
    assert set(names) <= {"cuda", "triton", "cpu", "torch"}


def test_cli_info_runs(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "cld-fast")
    cmd = [exe, "info"] if os.path.exists(exe) else [sys.executable, "-m", "cld_fast.cli", "info"]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for key in ("cld_fast", "torch", "backends", "compiled", "gpu"):
        assert key in res.stdout
    assert "torch" in res.stdout.split("backends", 1)[1].splitlines()[0]


def test_why_unavailable_is_empty_exactly_for_available_backends():
    from cld_fast import backends
    for name in backends.BACKEND_NAMES:
        mod = backends.get(name)
        assert (mod.why_unavailable() == "") == mod.is_available(), name
