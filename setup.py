"""Build script for cld_fast.

The compiled extension ``cld_fast._C`` holds the C++ CPU kernels (always, OpenMP where the
compiler supports it) and the CUDA kernels (where a CUDA toolkit and a CUDA build of torch are
present). Environment switches:

  CLD_FAST_SKIP_CPU_EXT=1   do not build the C++ extension at all
  CLD_FAST_SKIP_CUDA=1      build only the CPU part even where CUDA is present
  CLD_FAST_FORCE_CUDA=1     build (and expect) the CUDA part even without a CUDA build of torch or
                            nvcc on PATH: a failure is then reported like any expected CUDA failure
  CLD_FAST_REQUIRE_CUDA=1   a CUDA part that is not built fails the install (non-zero exit) instead
                            of falling back to the CPU kernels; implies CLD_FAST_FORCE_CUDA
  CLD_FAST_CUDA_ARCH="8.0;9.0"  architectures for the CUDA part (default: 8.0;9.0 or TORCH_CUDA_ARCH_LIST)
  CUDA_HOME=/path/to/cuda   the toolkit (default: found from nvcc's real location, see below)
  MAX_JOBS=N                parallel compile jobs (torch.utils.cpp_extension)

The CUDA part is *expected* when a CUDA build of torch and nvcc are present (or it is forced), unless
CLD_FAST_SKIP_CUDA=1. Without CUDA_HOME / CUDA_PATH the toolkit is found from nvcc on PATH with
symlinks resolved, then by asking nvcc itself (``nvcc --dryrun`` names its install, which sees
through wrapper scripts such as ``exec /usr/local/cuda-13.0/bin/nvcc "$@"`` at /usr/local/bin), then
/usr/local/cuda; a candidate counts only with ``include/cuda_runtime.h`` and ``bin/nvcc`` inside. The
choice is exported as CUDA_HOME for torch.utils.cpp_extension (whose own guess, the parent of
nvcc's folder, is /usr/local for such a wrapper).

torch is not a build requirement (pyproject.toml): under pip's build isolation it would be whatever
torch pip downloads into the temporary build environment, not the one that runs the package, and the
extension is not ABI-stable across torch releases. So a plain ``pip install .`` (or ``pip wheel .``)
finds no torch and installs pure Python (the 'torch' and 'triton' backends); the report and a warning
at import say so and give the command that builds the extension against the installed torch,
``pip install --no-build-isolation --no-deps --force-reinstall .`` (``pip install --no-build-isolation
-e .`` for development). A build with the extension requires exactly the torch release it was built
against (``torch==X.Y.Z``), and ``import cld_fast`` refuses to load it under another one.

Every build writes a report, ``cld_fast/_build_info.json`` (``cld_fast.build_info``; shown by
``cld-fast info``). When an expected CUDA part fails to build, a banner with the first lines of the
compiler error goes to stderr and the CPU-only extension is built instead (unless
CLD_FAST_REQUIRE_CUDA=1). A failed CPU build never breaks the install: cld_fast then runs on the
pure-Python backends. ``pip install`` hides build output unless run with ``-v``; the report and
``cld-fast info`` do not.
"""
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = [
    "cld_fast",
    "cld_fast.backends",
    "cld_fast.triton_kernels",
    "cld_fast.models",
]
PACKAGE_DIR = {
    "cld_fast": "cld_fast",
    "cld_fast.triton_kernels": "triton_kernels",
    "cld_fast.models": "models",
}
# py.typed: the package ships inline type hints (PEP 561); assets: the digit classifiers of cld_fast.metrics
PACKAGE_DATA = {"cld_fast": ["py.typed", "assets/*.pt"]}
EXT_NAME = "cld_fast._C"
ERROR_LINES = 20


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _log(msg):
    print(f"[cld_fast setup] {msg}", file=sys.stderr, flush=True)


def _build_info():
    """``cld_fast/build_info.py`` loaded by path (the package itself may not be importable while it builds)."""
    spec = importlib.util.spec_from_file_location("_cld_fast_build_info", os.path.join(ROOT, "cld_fast", "build_info.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- finding the CUDA toolkit --------------------------------------------------------------------


def cuda_home_problem(home):
    """'' when ``home`` looks like a CUDA toolkit root torch can build with, else what is missing."""
    if not home:
        return "no directory"
    missing = [p for p in (os.path.join("include", "cuda_runtime.h"), os.path.join("bin", "nvcc"))
               if not os.path.isfile(os.path.join(home, p))]
    return f"{home} has no {' and no '.join(missing)}" if missing else ""


def nvcc_dryrun_homes(nvcc, timeout=60):
    """Toolkit roots nvcc itself reports (``nvcc --dryrun``: its _HERE_, TOP and -I include folder).

    This sees through wrapper scripts, whose own location says nothing about the toolkit.
    Returns [] when nvcc can't be run.
    """
    try:
        proc = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                              capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return []
    homes = []
    for line in (proc.stdout + "\n" + proc.stderr).splitlines():
        m = re.match(r"^#\$ (_HERE_|TOP)=(.+)$", line.strip())
        if m:
            path = os.path.realpath(m.group(2).strip())
            homes.append(os.path.dirname(path) if m.group(1) == "_HERE_" else path)
        m = re.search(r'INCLUDES="-I([^"]+)"', line)
        if m:  # <home>/targets/<arch>/include or <home>/include
            inc = os.path.realpath(m.group(1).strip())
            up = os.path.dirname(inc)
            homes.append(os.path.dirname(os.path.dirname(up)) if os.path.basename(os.path.dirname(up)) == "targets" else up)
    return list(dict.fromkeys(homes))


def find_cuda_home(environ=None, which=shutil.which, dryrun=nvcc_dryrun_homes, fallbacks=("/usr/local/cuda",)):
    """Where the CUDA toolkit is: a dict with ``home`` (None if nothing usable was found), ``source``,
    ``nvcc`` (as found on PATH, may be a wrapper), ``problem`` ('' when usable) and ``tried``.

    CUDA_HOME or CUDA_PATH, when set, is the answer even if unusable (the problem then says why).
    Otherwise the candidates, first usable wins: the parent of the folder of nvcc with symlinks
    resolved, the same without resolving them, the roots ``nvcc --dryrun`` names, then ``fallbacks``.
    ``which`` and ``dryrun`` are seams for tests (``shutil.which`` and ``nvcc_dryrun_homes``).
    """
    environ = os.environ if environ is None else environ
    nvcc = which("nvcc")
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = environ.get(var)
        if home:
            return {"home": home, "source": var, "nvcc": nvcc, "problem": cuda_home_problem(home), "tried": [home]}
    candidates = []
    if nvcc:
        candidates.append((os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "nvcc (symlinks resolved)"))
        candidates.append((os.path.dirname(os.path.dirname(os.path.abspath(nvcc))), "nvcc on PATH"))
    candidates.append((None, "nvcc --dryrun"))
    candidates += [(f, f) for f in fallbacks]
    tried = []
    for home, source in candidates:
        homes = ([] if not nvcc else dryrun(nvcc)) if home is None else [home]
        for h in homes:
            if h in tried:
                continue
            tried.append(h)
            if not cuda_home_problem(h):
                return {"home": h, "source": source, "nvcc": nvcc, "problem": "", "tried": tried}
    what = f"nvcc at {nvcc}" if nvcc else "no nvcc on PATH"
    problem = (f"no CUDA toolkit found ({what}; tried {', '.join(tried) or 'nothing'}: none has "
               "include/cuda_runtime.h and bin/nvcc); set CUDA_HOME to the toolkit root")
    return {"home": None, "source": None, "nvcc": nvcc, "problem": problem, "tried": tried}


# ---- build output capture and error extraction ----------------------------------------------------


class OutputCapture:
    """Copy everything written to file descriptors 1 and 2 (by Python and by compiler subprocesses)
    into ``text`` while still passing it through, so a failed build's compiler error can be quoted.

    If the descriptors can't be redirected, nothing is captured and ``text`` stays ''.
    """

    LIMIT = 8 << 20

    def __init__(self):
        self.chunks, self.size, self.saved, self.threads = [], 0, {}, []
        self.lock = threading.Lock()

    @property
    def text(self):
        with self.lock:
            return b"".join(self.chunks).decode("utf-8", errors="replace")

    def _pump(self, read_fd, out_fd):
        while True:
            try:
                data = os.read(read_fd, 65536)
            except OSError:
                break
            if not data:
                break
            with self.lock:
                if self.size < self.LIMIT:
                    self.chunks.append(data)
                    self.size += len(data)
            view = memoryview(data)
            while view:
                try:
                    view = view[os.write(out_fd, view):]
                except OSError:
                    break
        os.close(read_fd)

    def __enter__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            for fd in (1, 2):
                self.saved[fd] = os.dup(fd)
            for fd in (1, 2):
                r, w = os.pipe()
                os.dup2(w, fd)
                os.close(w)
                t = threading.Thread(target=self._pump, args=(r, self.saved[fd]), daemon=True)
                t.start()
                self.threads.append(t)
        except OSError:
            self._restore()
        return self

    def _restore(self):
        for fd, saved in self.saved.items():
            os.dup2(saved, fd)

    def __exit__(self, *exc):
        sys.stdout.flush()
        sys.stderr.flush()
        self._restore()
        alive = False
        for t in self.threads:
            t.join(timeout=10)
            alive = alive or t.is_alive()
        if not alive:  # a lingering writer (a compiler cache daemon) keeps its pump and our copy alive
            for saved in self.saved.values():
                os.close(saved)
        return False


_ERROR = re.compile(r"(?i)(\berror\b|fatal|undefined reference|no such file|cannot find|not found)")


def error_head(text, exc=None, lines=ERROR_LINES, width=300):
    """The first ``lines`` lines of the error in a build log, from its first error line on.

    Compiler command echoes (ninja's ``[k/n]`` lines and compile commands) are skipped when looking
    for the first error; ninja's ``FAILED: <object>`` line is kept in front; ``exc`` (the exception
    the build raised) ends the list. Long lines are cut at ``width`` characters.
    """
    def is_command(line):
        return line.startswith("[") or (" -c " in line and " -o " in line)

    all_lines = [ln.rstrip() for ln in (text or "").splitlines() if ln.strip() and not is_command(ln.strip())]
    first = next((i for i, ln in enumerate(all_lines) if _ERROR.search(ln)), None)
    room = lines - (1 if exc is not None else 0)
    head = all_lines[-room:] if first is None else all_lines[first:first + room]
    failed = next((ln for ln in all_lines[:first] if ln.startswith("FAILED:")), None) if first else None
    if failed:
        head = [failed] + head[:room - 1]
    if exc is not None:
        msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        head = head[:room] + [msg]
    return [ln if len(ln) <= width else ln[:width] + " ..." for ln in head]


def banner(report, outcome):
    """The multi-line notice of a failed CUDA build, for stderr."""
    bar = "=" * 88
    out = [bar, "cld_fast: the CUDA kernels FAILED to build",
           f"  expected because: {report['cuda_reason']}",
           f"  nvcc on PATH:     {report['nvcc']}",
           f"  CUDA_HOME:        {report['cuda_home']} (from {report['cuda_home_from']})",
           f"  torch:            {report['torch']} (CUDA {report['torch_cuda']})",
           "  first lines of the error:"]
    out += [f"    | {ln}" for ln in report["error_head"]]
    out += [f"  result: {outcome}",
            "  fix: point CUDA_HOME at the toolkit root (it must hold include/cuda_runtime.h and bin/nvcc)",
            "       and rebuild; CLD_FAST_SKIP_CUDA=1 builds the CPU kernels only (and silences this),",
            "       CLD_FAST_REQUIRE_CUDA=1 makes this failure fail the install.",
            f"  build report: {os.path.join('cld_fast', '_build_info.json')} (`cld-fast info` shows it)",
            bar]
    return "\n".join(out)


# ---- the extension ------------------------------------------------------------------------------


def torch_requirement(version=None):
    """The install requirement on torch: the release the extension is built against (``==``, its local
    label such as ``+cpu`` dropped), or ``torch>=2.11`` when no extension is built (``version`` None)."""
    if not version:
        return "torch>=2.11"
    return f"torch=={_build_info().public_version(version)}"


def _no_extension(info, reason, torch_missing):
    """(ext_modules, cmdclass, torch requirement) of an install without ``cld_fast._C``: the build report
    says why, in the source tree now and in the wheel / build folder through ``build_py``."""
    from setuptools.command.build_py import build_py

    report = info.new_report(skipped=reason, torch_missing=torch_missing, cuda_reason=reason)
    # The source tree's report describes the extension built in place there (editable installs); a tree
    # that holds one keeps its report, e.g. when an isolated `pip wheel .` runs in a developer's checkout.
    if not glob.glob(os.path.join(ROOT, "cld_fast", "_C*.so")) + glob.glob(os.path.join(ROOT, "cld_fast", "_C*.pyd")):
        info.write_report(report, [os.path.join(ROOT, "cld_fast")])

    class ReportingBuildPy(build_py):
        """``build_py`` that also writes the build report into the built package."""

        def run(self):
            super().run()
            info.write_report(report, [os.path.join(self.build_lib, "cld_fast")])

    return [], {"build_py": ReportingBuildPy}, torch_requirement(None)


def _extensions():
    """Return (ext_modules, cmdclass, torch requirement); no extension where torch is missing or it is
    skipped (the build report then says why)."""
    require = _flag("CLD_FAST_REQUIRE_CUDA")
    info = _build_info()
    if _flag("CLD_FAST_SKIP_CPU_EXT"):
        if require:
            raise SystemExit("cld_fast setup: CLD_FAST_REQUIRE_CUDA=1 conflicts with CLD_FAST_SKIP_CPU_EXT=1")
        _log("CLD_FAST_SKIP_CPU_EXT set: not building cld_fast._C")
        return _no_extension(info, "CLD_FAST_SKIP_CPU_EXT=1", torch_missing=False)
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except Exception as exc:  # torch missing (pip's build isolation): pure-Python install
        if require:
            raise SystemExit(f"cld_fast setup: CLD_FAST_REQUIRE_CUDA=1 but torch is not importable ({exc})")
        reason = f"torch was not importable at build time ({type(exc).__name__}: {exc})"
        _log(f"{reason}; building no extension. The 'torch' and 'triton' backends will work; to build the C++ "
             f"kernels against your torch run in the source folder: {info.BUILD_COMMAND}")
        return _no_extension(info, reason, torch_missing=True)

    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if not cpu_sources:
        return _no_extension(info, "no C++ sources under csrc/", torch_missing=False)
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp-simd"]  # -fopenmp-simd: the kernels' `omp simd` loops
    link_args = []
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_args.append("-fopenmp")

    # Is the CUDA part expected, and with which toolkit? (no toolkit search where CUDA is ruled out)
    skip_cuda = _flag("CLD_FAST_SKIP_CUDA") or not cuda_sources
    found = ({"home": None, "source": None, "nvcc": shutil.which("nvcc"), "problem": "", "tried": []} if skip_cuda
             else find_cuda_home())
    forced = require or _flag("CLD_FAST_FORCE_CUDA")
    nvcc_present = bool(found["nvcc"]) or found["source"] in ("CUDA_HOME", "CUDA_PATH") or found["home"] is not None
    if _flag("CLD_FAST_SKIP_CUDA"):
        if require:
            raise SystemExit("cld_fast setup: CLD_FAST_REQUIRE_CUDA=1 conflicts with CLD_FAST_SKIP_CUDA=1")
        expected, reason = False, "CLD_FAST_SKIP_CUDA=1"
    elif not cuda_sources:
        expected, reason = False, "no csrc/cuda/*.cu sources"
    elif forced:
        expected, reason = True, "CLD_FAST_REQUIRE_CUDA=1" if require else "CLD_FAST_FORCE_CUDA=1"
    elif torch.version.cuda is None:
        expected, reason = False, f"a CPU-only build of torch ({torch.__version__})"
    elif not nvcc_present:
        expected, reason = False, "no nvcc on PATH and no CUDA_HOME"
    else:
        expected, reason = True, (f"a CUDA build of torch (CUDA {torch.version.cuda}) and "
                                  f"{'nvcc at ' + found['nvcc'] if found['nvcc'] else 'a CUDA toolkit'}")
    report = info.new_report(
        cuda_expected=expected, cuda_reason=reason, require_cuda=require, torch=torch.__version__,
        torch_cuda=torch.version.cuda, nvcc=found["nvcc"])
    if expected:  # the toolkit used, or the one found wanting (CUDA_HOME as set, else the first candidate)
        report["cuda_home"] = found["home"] or (found["tried"][0] if found["tried"] else None)
        report["cuda_home_from"] = found["source"] or "nowhere (no usable toolkit)"

    def make(ext_cls, sources, extra, macros):
        return ext_cls(name=EXT_NAME, sources=sources, include_dirs=include_dirs, define_macros=macros,
                       extra_compile_args=extra, extra_link_args=link_args)

    cpu_ext = make(ce.CppExtension, cpu_sources, {"cxx": list(cxx_flags)}, [])
    cuda_ext, problem = None, ""
    if expected:
        problem = found["problem"]
        if not problem:
            home = found["home"]
            if found["source"] not in ("CUDA_HOME", "CUDA_PATH"):
                os.environ["CUDA_HOME"] = home
            ce.CUDA_HOME = home  # torch computed its own guess at import (None for a CPU-only torch)
            archs = os.environ.get("CLD_FAST_CUDA_ARCH") or os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0"
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs
            # kernels (*.cu, plain nvcc) + their torch binding (*.cpp, host compiler), CUDA builds only
            sources = cpu_sources + cuda_sources + sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
            extra = {"cxx": list(cxx_flags), "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"]}
            try:
                cuda_ext = make(ce.CUDAExtension, sources, extra, [("CLD_FAST_WITH_CUDA", None)])
                _log(f"CPU + CUDA kernels for arch {archs}, CUDA_HOME={home} (from {found['source']})")
            except Exception as exc:  # noqa: BLE001 - reported by the build command
                problem = f"torch.utils.cpp_extension.CUDAExtension failed: {type(exc).__name__}: {exc}"
    else:
        _log(f"CPU kernels only ({reason})")

    class CldBuildExt(ce.BuildExtension):
        """Build ``cld_fast._C`` with the CUDA part where expected, else (or after a CUDA failure) the
        CPU part only; report loudly what failed and write ``cld_fast/_build_info.json`` either way."""

        def _use(self, ext):
            """Make ``ext`` the one extension this command builds (carrying setuptools' per-extension state)."""
            old = self.extensions[0] if self.extensions else None
            for attr in ("_full_name", "_links_to_dynamic", "_needs_stub", "_file_name"):
                if old is not None and hasattr(old, attr):
                    setattr(ext, attr, getattr(old, attr))
            self.extensions = [ext]
            for key in (EXT_NAME, EXT_NAME.split(".")[-1]):
                if key in getattr(self, "ext_map", {}):
                    self.ext_map[key] = ext

        def _build(self, ext):
            """Build ``ext``; returns the error head of a failure, or None on success."""
            self._use(ext)
            inplace, compiler = self.inplace, self.compiler
            capture = OutputCapture()
            try:
                with capture:
                    super().run()
                return None
            except Exception as exc:  # noqa: BLE001 - any build failure is reported by the caller
                return error_head(capture.text, exc)
            finally:
                # setuptools' run() leaves inplace False when the build raises, and distutils' replaces the
                # compiler's name by a compiler object, which a second run() can't take
                self.inplace, self.compiler = inplace, compiler

        def run(self):
            rep = dict(report)
            dirs = [os.path.join(ROOT, "cld_fast"), os.path.join(self.build_lib, "cld_fast")]
            try:
                if expected:
                    head = self._build(cuda_ext) if cuda_ext is not None else [problem]
                    if head is None:
                        rep["cuda_built"] = rep["cpu_built"] = True
                        return
                    rep["error_head"] = head
                    if require:
                        print(banner(rep, "the install FAILS (CLD_FAST_REQUIRE_CUDA=1)"), file=sys.stderr, flush=True)
                        raise SystemExit("cld_fast setup: the CUDA build failed and CLD_FAST_REQUIRE_CUDA=1 is set")
                    _log("the CUDA build failed; building the CPU kernels only (the error follows at the end)")
                head = self._build(cpu_ext)
                rep["cpu_built"] = head is None
                rep["cpu_error_head"] = head or []
                if head is not None:
                    _log("WARNING: building cld_fast._C failed; the 'cpu' and 'cuda' backends will be unavailable "
                         "(the 'triton' and 'torch' backends still work). First lines of the error:\n    "
                         + "\n    ".join(head))
                if expected:
                    outcome = ("installed WITHOUT the cuda backend; the cpu backend was built" if rep["cpu_built"]
                               else "installed WITHOUT the compiled extension (the CPU-only build failed too)")
                    print(banner(rep, outcome), file=sys.stderr, flush=True)
            finally:
                for path in info.write_report(rep, dirs):
                    _log(f"build report: {path}")

    return ([cuda_ext or cpu_ext], {"build_ext": CldBuildExt.with_options(no_python_abi_suffix=False)},
            torch_requirement(torch.__version__))


MIN_SETUPTOOLS = (61, 0)  # the first setuptools that reads pyproject.toml's [project] table
LICENSE = "Apache-2.0"


def _version_tuple(version):
    return tuple(int(p) for p in re.findall(r"\d+", version)[:2])


FIX_BUILD_TOOLS = 'run: python -m pip install "setuptools>=77" wheel'


def check_build_tools(version, has_wheel, argv):
    """Stop with one line when setuptools ``version`` cannot build this package: below 61 it cannot read
    pyproject.toml's [project] table; below 70.1 a wheel (pip's ``bdist_wheel``/``dist_info``) needs the
    ``wheel`` package (``has_wheel``). ``argv``: setup.py's command line."""
    if _version_tuple(version) < MIN_SETUPTOOLS:
        raise SystemExit(f"cld_fast setup: setuptools {version} is too old (need >= 61); {FIX_BUILD_TOOLS}")
    wheel_commands = {"bdist_wheel", "dist_info", "editable_wheel"}
    if _version_tuple(version) < (70, 1) and not has_wheel and wheel_commands & set(argv):
        raise SystemExit(f"cld_fast setup: setuptools {version} needs the 'wheel' package to build a wheel; "
                         f"{FIX_BUILD_TOOLS}")


LICENSE_FILES = ["LICENSE", "NOTICE"]


def license_metadata(version):
    """The licence as setup() keywords: an SPDX expression for setuptools >= 77, the classic field before;
    both ship ``LICENSE_FILES``."""
    if _version_tuple(version) >= (77, 0):
        return {"license_expression": LICENSE, "license_files": LICENSE_FILES}
    return {"license": LICENSE, "distclass": _license_files_distribution()}


def _license_files_distribution():
    """setuptools 61-76 replace setup()'s license_files by their pyproject default, whose patterns
    (' NOTICE*' with a leading space) miss NOTICE: this Distribution fixes the list instead."""
    from setuptools.dist import Distribution

    class LicenseFilesDistribution(Distribution):
        def _finalize_license_files(self):
            self.metadata.license_files = list(LICENSE_FILES)

    return LicenseFilesDistribution


if __name__ == "__main__":  # setuptools (pip's build backend too) runs this file as __main__
    # Metadata (name, version, extras, scripts) lives in pyproject.toml; dynamic there: the torch
    # requirement (pinned to the release the extension is built against) and the licence (its field
    # differs between setuptools releases).
    import setuptools

    check_build_tools(setuptools.__version__, importlib.util.find_spec("wheel") is not None, sys.argv[1:])
    ext_modules, cmdclass, torch_req = _extensions()
    setup(
        **license_metadata(setuptools.__version__),
        packages=PACKAGES,
        package_dir=PACKAGE_DIR,
        package_data=PACKAGE_DATA,
        install_requires=[torch_req, "numpy", "tqdm", "matplotlib"],
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
