"""Build script for cld_fast.

The compiled extension ``cld_fast._C`` holds the C++ CPU kernels (always, OpenMP where the
compiler supports it) and the CUDA kernels (only where a CUDA toolkit and a CUDA build of torch
are present). Environment switches:

  CLD_FAST_SKIP_CPU_EXT=1   do not build the C++ extension at all
  CLD_FAST_SKIP_CUDA=1      build only the CPU part even where CUDA is present
  CLD_FAST_FORCE_CUDA=1     build the CUDA part even without a visible GPU (needs nvcc)
  CLD_FAST_CUDA_ARCH="8.0;9.0"  architectures for the CUDA part (default: 8.0;9.0 or TORCH_CUDA_ARCH_LIST)
  MAX_JOBS=N                parallel compile jobs (torch.utils.cpp_extension)

A failed optional build never breaks the install: cld_fast then runs on the remaining backends.
"""
import glob
import os
import sys

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


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _log(msg):
    print(f"[cld_fast setup] {msg}", file=sys.stderr)


def _extensions():
    """Return (ext_modules, cmdclass); empty where torch or a compiler is missing."""
    if _flag("CLD_FAST_SKIP_CPU_EXT"):
        _log("CLD_FAST_SKIP_CPU_EXT set: not building cld_fast._C")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except Exception as exc:  # torch missing: pure-Python install
        _log(f"torch not importable ({exc}); building no extension")
        return [], {}

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if not sources:
        return [], {}
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cxx_flags = ["-O3", "-std=c++20"]
    link_args = []
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_args.append("-fopenmp")
    define_macros = []

    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    want_cuda = bool(cuda_sources) and not _flag("CLD_FAST_SKIP_CUDA")
    have_cuda = (
        ce.CUDA_HOME is not None
        and torch.version.cuda is not None
        and (torch.cuda.is_available() or _flag("CLD_FAST_FORCE_CUDA"))
    )
    ext_cls = ce.CppExtension
    extra = {"cxx": cxx_flags}
    if want_cuda and have_cuda:
        ext_cls = ce.CUDAExtension
        # kernels (*.cu, plain nvcc) + their torch binding (*.cpp, host compiler), CUDA builds only
        sources += cuda_sources + sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        define_macros.append(("CLD_FAST_WITH_CUDA", None))
        archs = os.environ.get("CLD_FAST_CUDA_ARCH") or os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0"
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        extra["nvcc"] = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"]
        _log(f"building CPU + CUDA kernels for arch {archs}")
    elif want_cuda:
        _log("no CUDA toolkit or CPU-only torch: building the CPU kernels only")

    ext = ext_cls(
        name="cld_fast._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=link_args,
    )

    class OptionalBuildExt(ce.BuildExtension):
        """Build the extension, but let a failure leave a working pure-Python install."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any build failure is optional
                _log(f"WARNING: building cld_fast._C failed ({exc}); the 'cpu'/'cuda' backends will be unavailable")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001
                _log(f"WARNING: building {ext.name} failed ({exc}); continuing without it")

    return [ext], {"build_ext": OptionalBuildExt.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()

setup(
    name="cld_fast",
    version="0.1.0",
    description="Fused kernels, samplers and training for critically-damped Langevin diffusion",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    python_requires=">=3.9",
    install_requires=["torch>=2.11", "numpy", "tqdm", "matplotlib"],
    extras_require={
        "test": ["pytest", "scipy", "mpmath", "matplotlib", "triton>=3.6"],
        "triton": ["triton"],
        "bench": ["matplotlib", "pytest-benchmark"],
    },
    entry_points={"console_scripts": ["cld-fast=cld_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
