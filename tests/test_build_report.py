"""A CUDA build that cannot fail silently: setup.py's toolkit discovery, banner, build report and switches.

The builds run on a tiny copy of the tree (this repo's setup.py and cld_fast/build_info.py, a
one-file CPU "extension" that includes only Python.h, one .cu file) so each takes seconds, not the
minute the real kernels need. The toolkit is fake: ``<tmp>/fakecuda/bin/nvcc`` answers
``--version`` like nvcc 13.0 and fails every compilation with a ``cuda_runtime.h`` error, and it
is reached through a symlink ``<tmp>/wrapbin/nvcc`` on PATH, as on the GPU box where torch guessed
CUDA_HOME=/usr/local from a wrapper. The CUDA part is made *expected* with CLD_FAST_FORCE_CUDA=1 (or
CLD_FAST_REQUIRE_CUDA=1), the switch users have for the same thing, so these builds behave the same
under a CPU and a CUDA build of torch; the builds without a switch run under both flavours, the other
one simulated by setting ``torch.version.cuda`` before setup.py runs.
"""
import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cld_fast import build_info

ROOT = Path(__file__).resolve().parents[1]
FAKE_ERROR = "csrc/cuda/kernel.cu:1:10: fatal error: cuda_runtime.h: No such file or directory"
NOISE_LINES = 40  # printed after the error: the banner and the report keep only the first lines


def _setup_module():
    """setup.py imported as a module (its setup() call runs only as __main__)."""
    spec = importlib.util.spec_from_file_location("cld_fast_setup_under_test", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _fake_toolkit(root: Path, dryrun_home: Path = None) -> Path:
    """A CUDA install at ``root`` whose nvcc reports 13.0, fails every compile, and (``--dryrun``) names ``dryrun_home``."""
    (root / "include").mkdir(parents=True, exist_ok=True)
    (root / "include" / "cuda_runtime.h").write_text("/* fake */\n")
    home = dryrun_home or root
    noise = "\n".join(f"echo 'note: follow-up diagnostic {i}' >&2" for i in range(NOISE_LINES))
    _executable(root / "bin" / "nvcc", f"""#!/bin/sh
case " $* " in
  *" --version "*) echo "Cuda compilation tools, release 13.0, V13.0.88"; exit 0;;
  *" --dryrun "*)
    echo '#$ _HERE_={home}/bin' >&2
    echo '#$ TOP={home}/bin/..' >&2
    echo '#$ INCLUDES="-I{home}/bin/../targets/x86_64-linux/include"' >&2
    exit 0;;
esac
echo "{FAKE_ERROR}" >&2
echo "compilation terminated." >&2
{noise}
exit 1
""")
    return root


def _tiny_tree(dest: Path) -> Path:
    """The smallest tree setup.py builds: real setup.py and build_info.py, stub sources."""
    for pkg in ("cld_fast/backends", "triton_kernels", "models"):
        (dest / pkg).mkdir(parents=True, exist_ok=True)
        (dest / pkg / "__init__.py").write_text("")
    (dest / "cld_fast" / "__init__.py").write_text("")
    shutil.copy(ROOT / "setup.py", dest / "setup.py")
    shutil.copy(ROOT / "cld_fast" / "build_info.py", dest / "cld_fast" / "build_info.py")
    (dest / "csrc" / "include").mkdir(parents=True)
    (dest / "csrc" / "cpu").mkdir()
    (dest / "csrc" / "cuda").mkdir()
    (dest / "csrc" / "cpu" / "stub.cpp").write_text(
        "#include <Python.h>\n"
        "static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, \"_C\", nullptr, -1, nullptr};\n"
        "PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&mod); }\n")
    (dest / "csrc" / "cuda" / "kernel.cu").write_text("__global__ void k() {}\n")
    return dest


@pytest.fixture
def sandbox(tmp_path):
    """(tree, fake toolkit, env): the fake nvcc reachable only through a symlink on PATH."""
    tree = _tiny_tree(tmp_path / "tree")
    toolkit = _fake_toolkit(tmp_path / "fakecuda")
    wrap = tmp_path / "wrapbin"
    wrap.mkdir()
    (wrap / "nvcc").symlink_to(toolkit / "bin" / "nvcc")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CLD_FAST_") and k not in ("CUDA_HOME", "CUDA_PATH", "TORCH_CUDA_ARCH_LIST")}
    env.update(PATH=f"{wrap}{os.pathsep}{env.get('PATH', '')}", MAX_JOBS="2", PYTHONDONTWRITEBYTECODE="1")
    return tree, toolkit, env


# setup.py run as __main__ after torch.version.cuda is set to the value in argv[1] ('' = a CPU build).
_AS_FLAVOUR = ("import runpy, sys, torch; cuda = sys.argv.pop(1); torch.version.cuda = cuda or None; "
               "sys.argv[0] = 'setup.py'; runpy.run_path('setup.py', run_name='__main__')")


def _build(tree: Path, env: dict, torch_cuda=..., **flags):
    """``setup.py build_ext --inplace`` in ``tree``; ``torch_cuda`` (None: a CPU build, '13.0': a CUDA
    build) overrides what the installed torch reports, default: as installed."""
    env = dict(env, **flags)
    cmd = [sys.executable, "setup.py"] if torch_cuda is ... else [sys.executable, "-c", _AS_FLAVOUR, torch_cuda or ""]
    return subprocess.run(cmd + ["build_ext", "--inplace"], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=600)


def _built_extension(tree: Path):
    return sorted((tree / "cld_fast").glob("_C*.so"))


# ---- toolkit discovery -----------------------------------------------------------------------------


def test_cuda_home_from_a_symlinked_nvcc(tmp_path):
    """nvcc on PATH is a symlink into the toolkit: its resolved location gives CUDA_HOME, no nvcc run needed."""
    setup = _setup_module()
    toolkit = _fake_toolkit(tmp_path / "opt" / "cuda-12.9")
    link = tmp_path / "usr" / "local" / "bin" / "nvcc"
    link.parent.mkdir(parents=True)
    link.symlink_to(toolkit / "bin" / "nvcc")

    def no_dryrun(nvcc):
        raise AssertionError("the symlink alone should have been enough")

    found = setup.find_cuda_home({}, which=lambda name: str(link), dryrun=no_dryrun, fallbacks=())
    assert found["home"] == os.path.realpath(toolkit)
    assert found["source"] == "nvcc (symlinks resolved)"
    assert found["problem"] == "" and found["nvcc"] == str(link)


def test_cuda_home_through_a_wrapper_script(tmp_path):
    """nvcc on PATH is a wrapper script (the GPU box: /usr/local/bin/nvcc -> exec .../cuda-13.0/bin/nvcc):
    its own parent (here <tmp>/usr/local) has no headers, so nvcc is asked (``--dryrun``) where it lives."""
    setup = _setup_module()
    toolkit = _fake_toolkit(tmp_path / "opt" / "cuda-13.0")
    wrapper = _executable(tmp_path / "usr" / "local" / "bin" / "nvcc",
                          f"#!/bin/sh\nexec {toolkit / 'bin' / 'nvcc'} \"$@\"\n")
    found = setup.find_cuda_home({}, which=lambda name: str(wrapper), fallbacks=())
    assert found["home"] == os.path.realpath(toolkit), found
    assert found["source"] == "nvcc --dryrun"
    assert str(tmp_path / "usr" / "local") in found["tried"]  # torch's own guess, rejected: no cuda_runtime.h
    assert setup.nvcc_dryrun_homes(str(wrapper))[0] == os.path.realpath(toolkit)


def test_cuda_home_from_the_environment_wins_and_is_validated(tmp_path):
    setup = _setup_module()
    empty = tmp_path / "empty"
    empty.mkdir()
    found = setup.find_cuda_home({"CUDA_HOME": str(empty)}, which=lambda name: None, fallbacks=())
    assert found["home"] == str(empty) and found["source"] == "CUDA_HOME"
    assert "include/cuda_runtime.h" in found["problem"] and "bin/nvcc" in found["problem"]


def test_no_usable_toolkit_says_what_was_tried(tmp_path):
    setup = _setup_module()
    fake_bin = _executable(tmp_path / "bin" / "nvcc", "#!/bin/sh\nexit 1\n")  # headers nowhere, --dryrun fails
    found = setup.find_cuda_home({}, which=lambda name: str(fake_bin), fallbacks=(str(tmp_path / "nope"),))
    assert found["home"] is None
    assert str(tmp_path) in found["problem"] and "set CUDA_HOME" in found["problem"]
    assert str(tmp_path / "nope") in found["tried"]


def test_error_head_skips_commands_and_keeps_the_first_lines():
    setup = _setup_module()
    log = "\n".join(
        ["running build_ext", "[1/3] c++ -MMD -c a.cpp -o a.o", "[2/3] /cuda/bin/nvcc -c k.cu -o k.o",
         "FAILED: build/k.o", "/cuda/bin/nvcc --generate-dependencies -c k.cu -o build/k.o",
         "k.cu:1:10: fatal error: cuda_runtime.h: No such file or directory", "compilation terminated."]
        + [f"more {i}" for i in range(50)])
    head = setup.error_head(log, RuntimeError("Error compiling objects for extension"))
    assert len(head) == setup.ERROR_LINES
    assert head[0] == "FAILED: build/k.o"
    assert head[1].startswith("k.cu:1:10: fatal error")
    assert not any(" -c " in ln for ln in head)
    assert head[-1] == "RuntimeError: Error compiling objects for extension"


# ---- builds of the tiny tree ---------------------------------------------------------------------


def test_failed_cuda_build_is_loud_reported_and_falls_back_to_cpu(sandbox, monkeypatch, capsys):
    """FORCE_CUDA + a toolkit whose nvcc fails: exit 0 with the CPU extension, a banner on stderr quoting the
    error, and a report with cuda_expected / not cuda_built / the error head, which build_info,
    the cuda backend's why_unavailable() and ``cld-fast info`` all show."""
    tree, toolkit, env = sandbox
    res = _build(tree, env, CLD_FAST_FORCE_CUDA="1")
    assert res.returncode == 0, res.stderr[-4000:]
    err = res.stderr
    assert "cld_fast: the CUDA kernels FAILED to build" in err
    banner = err.split("cld_fast: the CUDA kernels FAILED to build", 1)[1]
    assert FAKE_ERROR in banner and "compilation terminated." in banner
    assert f"note: follow-up diagnostic {NOISE_LINES - 1}" not in banner  # only the first lines
    assert "the cpu backend was built" in banner
    assert _built_extension(tree), "the CPU-only fallback extension was not built"

    path = tree / "cld_fast" / build_info.FILENAME
    report = json.loads(path.read_text())
    assert set(report) == set(build_info.FIELDS)
    assert report["cuda_expected"] is True and report["cuda_built"] is False and report["cpu_built"] is True
    assert report["cuda_reason"] == "CLD_FAST_FORCE_CUDA=1"
    assert report["cuda_home"] == os.path.realpath(toolkit)  # found through the symlink on PATH
    assert report["cuda_home_from"] == "nvcc (symlinks resolved)"
    assert report["nvcc"].endswith(os.path.join("wrapbin", "nvcc"))
    assert any(FAKE_ERROR in ln for ln in report["error_head"])
    assert len(report["error_head"]) <= 20 and report["timestamp"]

    # reading it back: build_info, the cuda backend, cld-fast info
    lines = build_info.info_lines(path=str(path))
    assert any(ln.startswith("cuda build FAILED") for ln in lines)
    assert any(FAKE_ERROR in ln for ln in lines)
    msg = build_info.cuda_failure_message(path=str(path))
    assert "the CUDA build FAILED" in msg and FAKE_ERROR in msg

    from cld_fast import cli
    from cld_fast.backends import cuda_backend

    monkeypatch.setattr(build_info, "REPORT_PATH", str(path))
    if not cuda_backend.is_available():  # always here (no GPU): the reason now quotes the failed build
        why = cuda_backend.why_unavailable()
        assert "the CUDA build FAILED" in why and FAKE_ERROR in why
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "cuda build FAILED" in out and FAKE_ERROR in out


def test_require_cuda_makes_the_failure_fail_the_build(sandbox):
    tree, toolkit, env = sandbox
    res = _build(tree, env, CLD_FAST_REQUIRE_CUDA="1")
    assert res.returncode != 0
    assert "cld_fast: the CUDA kernels FAILED to build" in res.stderr and FAKE_ERROR in res.stderr
    assert "the install FAILS (CLD_FAST_REQUIRE_CUDA=1)" in res.stderr
    report = build_info.read_report(str(tree / "cld_fast" / build_info.FILENAME))
    assert report["cuda_expected"] and not report["cuda_built"] and report["require_cuda"]
    assert build_info.cuda_failed(report)
    assert not _built_extension(tree)  # no silent CPU-only fallback


def test_cuda_home_without_headers_fails_before_compiling(sandbox, tmp_path):
    """CUDA_HOME names a folder without the toolkit (the GPU box's /usr/local): reported, CPU kernels built."""
    tree, toolkit, env = sandbox
    bare = tmp_path / "usr-local"
    (bare / "bin").mkdir(parents=True)
    res = _build(tree, env, CLD_FAST_FORCE_CUDA="1", CUDA_HOME=str(bare))
    assert res.returncode == 0, res.stderr[-4000:]
    assert "cld_fast: the CUDA kernels FAILED to build" in res.stderr
    assert f"{bare} has no include/cuda_runtime.h" in res.stderr
    report = build_info.read_report(str(tree / "cld_fast" / build_info.FILENAME))
    assert report["cuda_home"] == str(bare) and report["cuda_home_from"] == "CUDA_HOME"
    assert report["cpu_built"] and not report["cuda_built"]
    assert _built_extension(tree)


@pytest.mark.parametrize("torch_cuda", [None, "13.0"], ids=["cpu-torch", "cuda-torch"])
def test_skip_cuda_builds_the_cpu_part_and_writes_a_report(sandbox, torch_cuda):
    """CLD_FAST_SKIP_CUDA=1 with nvcc on PATH: CUDA not expected under either torch, no banner, a report."""
    tree, toolkit, env = sandbox
    res = _build(tree, env, torch_cuda=torch_cuda, CLD_FAST_SKIP_CUDA="1")
    assert res.returncode == 0, res.stderr[-4000:]
    assert "FAILED" not in res.stderr
    report = build_info.read_report(str(tree / "cld_fast" / build_info.FILENAME))
    assert report["torch_cuda"] == torch_cuda
    assert report["cuda_expected"] is False and report["cuda_reason"] == "CLD_FAST_SKIP_CUDA=1"
    assert report["cpu_built"] is True and report["error_head"] == [] and _built_extension(tree)
    assert any(ln.startswith("cuda build ") and "not attempted" in ln for ln in build_info.info_lines(report))


def test_cpu_torch_with_nvcc_on_path_does_not_expect_cuda(sandbox):
    """A CPU build of torch and no switch: the (failing) nvcc on PATH is not tried, no banner, a report."""
    tree, toolkit, env = sandbox
    res = _build(tree, env, torch_cuda=None)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "FAILED" not in res.stderr
    report = build_info.read_report(str(tree / "cld_fast" / build_info.FILENAME))
    assert report["cuda_expected"] is False and "CPU-only build of torch" in report["cuda_reason"]
    assert report["cpu_built"] is True and report["error_head"] == []
    assert any(ln.startswith("cuda build ") and "not attempted" in ln for ln in build_info.info_lines(report))


def test_cuda_torch_with_nvcc_on_path_expects_cuda_and_falls_back_loudly(sandbox):
    """A CUDA build of torch and nvcc on PATH, no switch: the CUDA part is expected; the failing toolkit
    gives the banner, a report naming the reason, and the CPU-only extension."""
    tree, toolkit, env = sandbox
    res = _build(tree, env, torch_cuda="13.0")
    assert res.returncode == 0, res.stderr[-4000:]
    assert "cld_fast: the CUDA kernels FAILED to build" in res.stderr and FAKE_ERROR in res.stderr
    report = build_info.read_report(str(tree / "cld_fast" / build_info.FILENAME))
    assert report["cuda_expected"] is True and report["cuda_built"] is False and report["cpu_built"] is True
    assert report["cuda_reason"].startswith("a CUDA build of torch (CUDA 13.0) and nvcc at ")
    assert report["cuda_home"] == os.path.realpath(toolkit)
    assert build_info.cuda_failed(report) and _built_extension(tree)


def test_cuda_torch_with_a_broken_cuda_home_reports_it(sandbox, tmp_path):
    """A CUDA build of torch, CUDA_HOME naming a folder without a toolkit and no nvcc on PATH: expected,
    reported as a toolkit problem before any compile, CPU kernels built."""
    tree, toolkit, env = sandbox
    bare = tmp_path / "not-a-toolkit"
    bare.mkdir()
    path = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not (Path(p) / "nvcc").exists())
    res = _build(tree, dict(env, PATH=path), torch_cuda="13.0", CUDA_HOME=str(bare))
    assert res.returncode == 0, res.stderr[-4000:]
    assert f"{bare} has no include/cuda_runtime.h" in res.stderr
    report = build_info.read_report(str(tree / "cld_fast" / build_info.FILENAME))
    assert report["cuda_expected"] is True and report["nvcc"] is None
    assert report["cuda_home"] == str(bare) and report["cuda_home_from"] == "CUDA_HOME"
    assert report["cpu_built"] and not report["cuda_built"] and _built_extension(tree)


@pytest.mark.parametrize("parts", [("cpu",), ("cpu", "cuda")], ids=["cpu-only-extension", "cuda-extension"])
def test_why_unavailable_quotes_a_failed_build(tmp_path, monkeypatch, parts):
    """Whatever the extension holds, without a GPU the cuda backend's reason quotes a failed build's report."""
    from cld_fast.backends import cuda_backend

    report = build_info.new_report(cuda_expected=True, cuda_built=False, cpu_built=True, error_head=[FAKE_ERROR],
                                   cuda_reason="CLD_FAST_FORCE_CUDA=1")
    path = tmp_path / build_info.FILENAME
    path.write_text(json.dumps(report))
    monkeypatch.setattr(build_info, "REPORT_PATH", str(path))
    monkeypatch.setattr(cuda_backend, "compiled_parts", lambda: set(parts))
    monkeypatch.setattr(cuda_backend, "load_extension", lambda: (object(), ""))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    why = cuda_backend.why_unavailable()
    assert "the CUDA build FAILED" in why and FAKE_ERROR in why
    path.write_text(json.dumps(dict(report, cuda_expected=False)))  # no failure recorded: no quote
    assert "FAILED" not in cuda_backend.why_unavailable()


def test_report_reading_is_forgiving_and_generated_file_is_ignored(tmp_path):
    assert build_info.read_report(str(tmp_path / "missing.json")) is None
    (tmp_path / "bad.json").write_text("{not json")
    assert build_info.read_report(str(tmp_path / "bad.json")) is None
    assert "none" in build_info.info_lines(path=str(tmp_path / "missing.json"))[0]
    assert build_info.cuda_failure_message(path=str(tmp_path / "missing.json")) == ""
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "cld_fast/_build_info.json" in ignored
