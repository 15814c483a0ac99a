"""pytest configuration for ``pytest bench/ --benchmark-only`` (pytest-benchmark wrappers of the CPU kernels).

Not part of the normal test run: the repository's pytest config collects ``tests/`` only. Without
pytest-benchmark (not installed, or disabled with ``-p no:benchmark``) every benchmark here is
skipped, not errored.
"""
import os
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def pytest_collection_modifyitems(config, items):
    if config.pluginmanager.hasplugin("benchmark"):
        return
    skip = pytest.mark.skip(reason="pytest-benchmark is not installed or is disabled (pip install pytest-benchmark)")
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)
