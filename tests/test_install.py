"""Packaging: a build without torch (pip's build isolation), the torch pin and the import-time check of
the torch the extension was built against, licence metadata, and the command-line surface.

The setup.py runs use a tiny copy of the tree (real setup.py, pyproject.toml, build_info.py; a stub
package) and only ``egg_info`` / ``build_py``, which take seconds. The full install in a new venv
(plain ``pip install .``, ``pip wheel . --no-deps``, ``--no-build-isolation``) is
``tools/install_check.sh`` (minutes; not part of the suite).
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import cld_fast as cf
from cld_fast import _extension, build_info

ROOT = Path(__file__).resolve().parents[1]

try:
    import tomllib  # Python >= 3.11
except ImportError:  # pragma: no cover - Python 3.9 / 3.10
    tomllib = pytest.importorskip("tomli")


def _setup_module():
    spec = importlib.util.spec_from_file_location("cld_fast_setup_for_install_test", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_tree(dest: Path) -> Path:
    """setup.py, pyproject.toml and their files, a stub package and one stub C++ source."""
    for pkg in ("cld_fast/backends", "triton_kernels", "models"):
        (dest / pkg).mkdir(parents=True, exist_ok=True)
        (dest / pkg / "__init__.py").write_text("")
    (dest / "cld_fast" / "__init__.py").write_text('__version__ = "0.1.0"\n')
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE", "NOTICE", "cld_fast/build_info.py",
                 "cld_fast/py.typed"):
        shutil.copy(ROOT / name, dest / name)
    (dest / "csrc" / "cpu").mkdir(parents=True)
    (dest / "csrc" / "cpu" / "stub.cpp").write_text("int stub() { return 0; }\n")
    return dest


def _run_setup(tree: Path, *args, hide_torch: bool):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLD_FAST_")}
    env.update(CLD_FAST_SKIP_CUDA="1", PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONPATH", None)
    if hide_torch:  # as under pip's build isolation: `import torch` fails
        fake = tree.parent / "no_torch"
        (fake / "torch").mkdir(parents=True, exist_ok=True)
        (fake / "torch" / "__init__.py").write_text("raise ImportError('torch is hidden by this test')\n")
        env["PYTHONPATH"] = str(fake)
    res = subprocess.run([sys.executable, "setup.py", *args], cwd=tree, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res


def _requires(tree: Path):
    (egg,) = tree.glob("*.egg-info")
    return (egg / "requires.txt").read_text().split("[", 1)[0].split(), (egg / "PKG-INFO").read_text()


# ---- setup.py ---------------------------------------------------------------------------------------


def test_build_without_torch_installs_pure_python_and_reports_how_to_build(tmp_path):
    tree = _tiny_tree(tmp_path / "tree")
    res = _run_setup(tree, "egg_info", "build_py", hide_torch=True)
    assert "torch was not importable" in res.stderr and build_info.BUILD_COMMAND in res.stderr
    requires, _ = _requires(tree)
    assert "torch>=2.11" in requires
    for report_path in (tree / "cld_fast" / "_build_info.json", tree / "build" / "lib" / "cld_fast" / "_build_info.json"):
        report = build_info.read_report(str(report_path))
        assert report is not None, report_path
        assert report["torch_missing"] and not report["cpu_built"] and report["torch"] is None
        assert "torch was not importable" in report["skipped"]
        message = build_info.missing_torch_message(report)
        assert build_info.BUILD_COMMAND in message and "'torch' and 'triton' backends work" in message
        lines = "\n".join(build_info.info_lines(report))
        assert "extension not built" in lines and build_info.BUILD_COMMAND in lines and "FAILED" not in lines
    assert (tree / "build" / "lib" / "cld_fast" / "py.typed").exists()
    assert not list(tree.rglob("*.so")) and not list(tree.rglob("*.o"))


def test_build_without_torch_keeps_the_report_of_an_in_place_extension(tmp_path):
    """An isolated build in a checkout with an in-place build must not relabel that build as missing."""
    tree = _tiny_tree(tmp_path / "tree")
    (tree / "cld_fast" / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"not really a library")
    kept = build_info.new_report(cpu_built=True, torch="2.13.0+cpu")
    build_info.write_report(kept, [str(tree / "cld_fast")])
    _run_setup(tree, "egg_info", "build_py", hide_torch=True)
    assert build_info.read_report(str(tree / "cld_fast" / "_build_info.json"))["cpu_built"]
    assert build_info.read_report(str(tree / "build" / "lib" / "cld_fast" / "_build_info.json"))["torch_missing"]


def test_build_with_torch_pins_the_torch_release(tmp_path):
    import torch

    tree = _tiny_tree(tmp_path / "tree")
    _run_setup(tree, "egg_info", hide_torch=False)
    requires, pkg_info = _requires(tree)
    assert f"torch=={torch.__version__.split('+')[0]}" in requires
    assert not any(r.startswith("torch>") for r in requires)
    assert "License-Expression: Apache-2.0" in pkg_info
    assert "License-File: LICENSE" in pkg_info and "License-File: NOTICE" in pkg_info
    assert "Provides-Extra: tensorboard" in pkg_info


def test_torch_requirement_drops_the_local_label():
    setup = _setup_module()
    assert setup.torch_requirement("2.13.0+cpu") == "torch==2.13.0"
    assert setup.torch_requirement("2.11.0") == "torch==2.11.0"
    assert setup.torch_requirement(None) == "torch>=2.11"
    assert "py.typed" in setup.PACKAGE_DATA["cld_fast"]
    assert (ROOT / "cld_fast" / "py.typed").is_file()


def test_pyproject_has_no_torch_build_requirement_and_apache_metadata():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert not any(r.split("[")[0].split("=")[0].split(">")[0].strip() == "torch"
                   for r in meta["build-system"]["requires"])
    project = meta["project"]
    assert "license" in project["dynamic"] and "license" not in project  # setup.py sets it (below)
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()
    notice = (ROOT / "NOTICE").read_text()
    assert "score_sde" in notice and "Apache" in notice and "NVIDIA Source Code License" in notice
    assert project["optional-dependencies"]["tensorboard"] == ["tensorboard"]
    assert project["scripts"]["cld-fast"] == "cld_fast.cli:main"


def test_license_metadata_fits_old_and_new_setuptools():
    setup = _setup_module()
    assert setup.license_metadata("84.2.1") == {"license_expression": "Apache-2.0", "license_files": ["LICENSE", "NOTICE"]}
    old = setup.license_metadata("65.5.0")
    assert old["license"] == "Apache-2.0" and "license_expression" not in old
    dist = old["distclass"]()
    dist._finalize_license_files()
    assert dist.metadata.license_files == ["LICENSE", "NOTICE"]


@pytest.mark.parametrize("version,has_wheel,argv,message", [
    ("58.1.0", True, ["egg_info"], "setuptools 58.1.0 is too old (need >= 61)"),
    ("65.5.0", False, ["dist_info", "--output-dir", "x"], "setuptools 65.5.0 needs the 'wheel' package"),
    ("65.5.0", False, ["build_ext", "--inplace"], None),
    ("65.5.0", True, ["bdist_wheel"], None),
    ("70.1.0", False, ["bdist_wheel"], None),
])
def test_build_tools_that_cannot_build_stop_with_one_line(version, has_wheel, argv, message):
    setup = _setup_module()
    if message is None:
        setup.check_build_tools(version, has_wheel, argv)
        return
    with pytest.raises(SystemExit) as exc:
        setup.check_build_tools(version, has_wheel, argv)
    text = str(exc.value)
    assert message in text and 'python -m pip install "setuptools>=77" wheel' in text and "\n" not in text


# ---- the torch the extension was built against --------------------------------------------------------


def _report(**values):
    return build_info.new_report(cpu_built=True, **values)


def test_torch_mismatch_compares_releases_not_local_labels():
    assert build_info.torch_mismatch(_report(torch="2.13.0+cpu"), "2.13.0+cpu") == ""
    assert build_info.torch_mismatch(_report(torch="2.13.0+cpu"), "2.13.0+cu128") == ""
    msg = build_info.torch_mismatch(_report(torch="2.11.0"), "2.13.0+cpu")
    assert "built against torch 2.11.0 but torch 2.13.0+cpu is running" in msg
    assert build_info.BUILD_COMMAND in msg
    assert build_info.torch_mismatch(None, "2.13.0") == ""
    assert build_info.torch_mismatch(build_info.new_report(torch="2.11.0"), "2.13.0") == ""  # nothing was built
    lines = "\n".join(build_info.info_lines(_report(torch="2.11.0")))
    assert "built against torch" in lines and "2.11.0" in lines


@pytest.fixture
def fresh_extension_state(monkeypatch):
    """_extension's once-per-process cache emptied for the test, restored after it."""
    monkeypatch.setattr(_extension, "_state", {})


def test_a_build_for_another_torch_is_not_loaded_and_warns(fresh_extension_state, monkeypatch):
    monkeypatch.setattr(build_info, "read_report", lambda path=None: _report(torch="2.11.0"))
    with pytest.warns(UserWarning, match=r"built against torch 2\.11\.0 but torch .* is running"):
        message = _extension.check_build()
    assert "--no-build-isolation" in message
    ext, why = _extension.load_extension()
    assert ext is None and "built against torch 2.11.0" in why
    assert _extension.compiled_parts() == []
    from cld_fast.backends import cpu_backend

    assert not cpu_backend.is_available() and "built against torch 2.11.0" in cpu_backend.why_unavailable()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _extension.check_build() == message  # once per process


def test_a_pure_python_install_warns_once_with_the_build_command(fresh_extension_state, monkeypatch):
    report = build_info.new_report(skipped="torch was not importable at build time", torch_missing=True)
    monkeypatch.setattr(build_info, "read_report", lambda path=None: report)
    with pytest.warns(UserWarning, match="installed without its compiled extension"):
        assert build_info.BUILD_COMMAND in _extension.check_build()


def test_matching_or_deliberately_skipped_builds_do_not_warn(fresh_extension_state, monkeypatch):
    import torch

    for report in (_report(torch=torch.__version__), build_info.new_report(skipped="CLD_FAST_SKIP_CPU_EXT=1"), None):
        monkeypatch.setattr(_extension, "_state", {})
        monkeypatch.setattr(build_info, "read_report", lambda path=None, r=report: r)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _extension.check_build() == ""


def test_this_checkout_imports_without_a_build_warning(tmp_path):
    res = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", "import cld_fast"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


# ---- command line and module surface ------------------------------------------------------------------


def test_python_m_cld_fast_runs_the_cli(tmp_path):
    res = subprocess.run([sys.executable, "-m", "cld_fast", "--version"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    import torch

    assert res.stdout.strip() == f"cld-fast {cf.__version__} (torch {torch.__version__})"
    res = subprocess.run([sys.executable, "-m", "cld_fast", "info"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "backends" in res.stdout, res.stderr
    res = subprocess.run([sys.executable, "-m", "cld_fast", "no-such-command"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "invalid choice" in res.stderr


def test_cli_version_flag(capsys):
    from cld_fast.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"cld-fast {cf.__version__} (torch ")


def test_dir_lists_the_lazy_names():
    names = dir(cf)
    for name in cf._LAZY:
        assert name in names, name
        assert callable(getattr(cf, name)) or isinstance(getattr(cf, name), (type, dict)), name
    assert set(cf.__all__) <= set(names)
    assert names == sorted(names)
