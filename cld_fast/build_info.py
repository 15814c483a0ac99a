"""The build report ``cld_fast/_build_info.json``: what ``setup.py`` tried to compile and what failed.

Every build of the extension ``cld_fast._C`` (``pip install -e .``, ``python setup.py build_ext``)
writes this file, success or failure, so that a CUDA build that failed during a quiet ``pip install``
is still visible afterwards: ``cld-fast info`` prints it and the ``cuda`` backend's
``why_unavailable()`` quotes it. Fields (``FIELDS``):

    format          1
    timestamp       when the build finished (ISO 8601, local time with offset)
    cuda_expected   the CUDA part was requested (CLD_FAST_FORCE_CUDA / CLD_FAST_REQUIRE_CUDA) or
                    expected (a CUDA build of torch and nvcc on PATH, no CLD_FAST_SKIP_CUDA)
    cuda_reason     why it was (or was not) expected, in words
    cuda_built      the extension holds the CUDA kernels
    cpu_built       the extension was built at all (it always holds the CPU kernels)
    error_head      first lines of the CUDA build's error (compiler output), [] when none
    cpu_error_head  first lines of the error of a failed CPU-only build, [] when none
    cuda_home       the CUDA toolkit used (or found wanting); null when none was looked for
    cuda_home_from  how it was found: "CUDA_HOME", "CUDA_PATH", "nvcc (symlinks resolved)",
                    "nvcc --dryrun", "/usr/local/cuda"
    nvcc            nvcc as found on PATH (may be a wrapper script); null when absent
    torch           torch version at build time
    torch_cuda      torch.version.cuda at build time (null for a CPU build of torch)
    require_cuda    CLD_FAST_REQUIRE_CUDA was set (a CUDA failure then failed the install)
    skipped         why no build of the extension was attempted ('' when one was): CLD_FAST_SKIP_CPU_EXT,
                    or torch not importable at build time (``torch_missing``)
    torch_missing   torch could not be imported by the build, as under pip's build isolation: the
                    package was installed without ``cld_fast._C`` (``BUILD_COMMAND`` builds it)

The extension is not ABI-stable across torch versions: ``torch_mismatch`` compares the recorded
``torch`` with the running one and the package refuses to load a mismatched build (see
``cld_fast._extension``).

This module only uses the standard library: ``setup.py`` loads it by path (before the package can
be imported) to write the report with ``write_report``; the package reads it with ``read_report``.
"""
from __future__ import annotations

import json
import os
import time
from typing import Iterable, List, Optional

FILENAME = "_build_info.json"
REPORT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), FILENAME)
FORMAT = 1
FIELDS = ("format", "timestamp", "cuda_expected", "cuda_reason", "cuda_built", "cpu_built", "error_head",
          "cpu_error_head", "cuda_home", "cuda_home_from", "nvcc", "torch", "torch_cuda", "require_cuda", "skipped",
          "torch_missing")
# Builds the extension against the torch of the environment pip installs into (run in the source folder).
BUILD_COMMAND = "pip install --no-build-isolation --no-deps --force-reinstall ."
_KEY = 24  # column width of ``cld-fast info``


def new_report(**values) -> dict:
    """A report with every field of ``FIELDS`` (defaults: nothing expected, nothing built), updated by ``values``."""
    report = {
        "format": FORMAT, "timestamp": None, "cuda_expected": False, "cuda_reason": "", "cuda_built": False,
        "cpu_built": False, "error_head": [], "cpu_error_head": [], "cuda_home": None, "cuda_home_from": None,
        "nvcc": None, "torch": None, "torch_cuda": None, "require_cuda": False, "skipped": "", "torch_missing": False,
    }
    unknown = set(values) - set(report)
    if unknown:
        raise KeyError(f"unknown build report fields {sorted(unknown)}; known: {FIELDS}")
    report.update(values)
    return report


def write_report(report: dict, directories: Iterable[str]) -> List[str]:
    """Write ``report`` (timestamped now) as ``FILENAME`` into each existing directory; returns the paths written."""
    report = dict(report, timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    text = json.dumps(report, indent=2) + "\n"
    written = []
    for d in dict.fromkeys(os.path.abspath(d) for d in directories):
        if not os.path.isdir(d):
            continue
        path = os.path.join(d, FILENAME)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
        written.append(path)
    return written


def read_report(path: Optional[str] = None) -> Optional[dict]:
    """The report as a dict (every field present), or None when there is no readable report.

    ``path`` defaults to ``REPORT_PATH`` (next to this module, where ``setup.py`` writes it).
    """
    path = path or REPORT_PATH
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    report = new_report()
    report.update({k: v for k, v in data.items() if k in report})
    return report


def cuda_failed(report: Optional[dict]) -> bool:
    """Whether the report records a CUDA build that was expected and did not happen."""
    return bool(report) and bool(report.get("cuda_expected")) and not report.get("cuda_built")


def cuda_failure_message(report: Optional[dict] = None, path: Optional[str] = None, lines: int = 3) -> str:
    """One paragraph saying the CUDA build failed, with the error's first ``lines`` lines; '' if it did not fail.

    Reads the report at ``path`` (default ``REPORT_PATH``) unless ``report`` is given.
    """
    report = read_report(path) if report is None else report
    if not cuda_failed(report):
        return ""
    head = [ln.strip() for ln in report.get("error_head") or [] if ln.strip()][:lines]
    where = f"CUDA_HOME={report.get('cuda_home')}, nvcc={report.get('nvcc')}"
    text = (f"the CUDA build FAILED at install time ({report.get('timestamp')}, {where})"
            + (": " + " | ".join(head) if head else "")
            + "; see `cld-fast info`, or rebuild with CLD_FAST_REQUIRE_CUDA=1 to make the failure stop the install")
    return text


def public_version(version: Optional[str]) -> str:
    """``'2.13.0+cpu'`` -> ``'2.13.0'`` (the local label names the build flavour, not the release)."""
    return (version or "").split("+", 1)[0]


def torch_mismatch(report: Optional[dict], running: str) -> str:
    """A message when ``report`` records an extension built against another torch release than
    ``running`` (``torch.__version__``), else ''. Builds that recorded no torch are not compared."""
    if not report or not report.get("cpu_built") or not report.get("torch"):
        return ""
    if public_version(report["torch"]) == public_version(running):
        return ""
    return (f"cld_fast._C was built against torch {report['torch']} but torch {running} is running; "
            "the extension is not ABI-stable across torch versions, so it is not loaded (the 'cpu' and "
            "'cuda' backends are off, 'triton' and 'torch' still work). Rebuild it against this torch "
            f"from the source folder: {BUILD_COMMAND}")


def missing_torch_message(report: Optional[dict]) -> str:
    """A message when the package was built without torch (pip's build isolation), else ''."""
    if not report or not report.get("torch_missing"):
        return ""
    return ("cld_fast was installed without its compiled extension cld_fast._C: torch was not importable "
            "when it was built (pip's build isolation hides the installed torch). The 'torch' and "
            "'triton' backends work; for the C++ CPU (and CUDA) kernels build it against your torch "
            f"from the source folder: {BUILD_COMMAND} (or pip install --no-build-isolation -e .)")


def info_lines(report: Optional[dict] = None, path: Optional[str] = None, error_lines: int = 12) -> List[str]:
    """The build report as ``cld-fast info`` prints it (key column of 24 characters).

    A failed CUDA build reads ``cuda build FAILED`` followed by the first ``error_lines`` lines of the
    compiler error; a failed CPU build likewise. Without a report: one line saying so.
    """
    report = read_report(path) if report is None else report
    shown = path or REPORT_PATH
    if report is None:
        return [f"{'build report':<{_KEY}} none ({shown} is missing: the extension was not built from this tree, "
                "or was built before build reports existed)"]
    out = [f"{'build report':<{_KEY}} {report.get('timestamp')} ({shown})"]
    home = f"CUDA_HOME={report.get('cuda_home')} (from {report.get('cuda_home_from')}), nvcc={report.get('nvcc')}"
    if cuda_failed(report):
        out.append(f"{'cuda build FAILED':<{_KEY}} {report.get('cuda_reason')}; {home}")
        out += [f"{'':<{_KEY}} | {ln}" for ln in (report.get("error_head") or [])[:error_lines]]
    elif report.get("cuda_built"):
        out.append(f"{'cuda build':<{_KEY}} ok; {home}")
    else:
        out.append(f"{'cuda build':<{_KEY}} not attempted ({report.get('cuda_reason') or 'not expected'})")
    if report.get("torch"):
        out.append(f"{'built against torch':<{_KEY}} {report.get('torch')}")
    if report.get("skipped"):
        out.append(f"{'extension not built':<{_KEY}} {report.get('skipped')}")
        if report.get("torch_missing"):
            out.append(f"{'to build it':<{_KEY}} {BUILD_COMMAND}  (in the source folder)")
    elif not report.get("cpu_built"):
        out.append(f"{'cpu build FAILED':<{_KEY}} the extension cld_fast._C was not built")
        out += [f"{'':<{_KEY}} | {ln}" for ln in (report.get("cpu_error_head") or [])[:error_lines]]
    return out
