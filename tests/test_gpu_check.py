"""bench/gpu_check.sh on a CPU: the budget table, the dry run's plumbing and summary, failure reporting.

The dry run (``--dry-run``) runs every stage's CPU variant for real (the helper scripts'
``--cpu-smoke`` modes, pytest --collect-only of the GPU test selection, a tiny kernel bench) and
echoes the GPU commands, so the script, its helpers and the node ids it names can't rot unnoticed.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
STAGES = ["build", "selftest", "gpu_tests", "sync", "memcheck", "large", "bench"]
LIMIT = 480


def budget_table():
    """[(stage, seconds)] from the block between ``# BUDGET-BEGIN`` and ``# BUDGET-END`` of the script."""
    text = SCRIPT.read_text()
    block = text.split("# BUDGET-BEGIN", 1)[1].split("# BUDGET-END", 1)[0]
    return [(m.group(1), int(m.group(2))) for m in re.finditer(r'^\s*"(\w+)\s+(\d+)"\s*$', block, re.M)]


def summary_rows(path: Path):
    """{stage: (status, seconds, budget, log)} from the stage table of summary.md."""
    rows = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] in STAGES:
            rows[cells[0]] = tuple(cells[1:])
    return rows


def run_script(tmp_path, *args, **env):
    """Run the script from the repo root with OUT in ``tmp_path`` (the Triton kernels interpreted)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    full.update(OUT=str(tmp_path / "out"), TRITON_INTERPRET="1", PYTHON=sys.executable)
    full.update(env)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=900)


def test_budget_table_covers_every_stage_and_sums_under_480():
    table = budget_table()
    assert [name for name, _ in table] == STAGES
    assert all(secs > 0 for _, secs in table)
    assert sum(secs for _, secs in table) < LIMIT
    text = SCRIPT.read_text()
    for name in STAGES:
        assert re.search(rf"^stage_{name}\(\) \{{", text, re.M), f"no stage_{name} function"


def test_script_parses():
    res = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_only_one_stage_and_a_failing_stage_is_reported(tmp_path):
    """GPU_CHECK_ONLY runs one stage (the others: skipped); a failing command makes the stage and the run fail,
    and the summary quotes the end of its log."""
    res = run_script(tmp_path, GPU_CHECK_DRY_RUN="1", GPU_CHECK_ONLY="large", PYTHON="false")
    assert res.returncode == 1, res.stdout + res.stderr
    summary = tmp_path / "out" / "summary.md"
    rows = summary_rows(summary)
    assert rows["large"][0] == "fail"
    assert all(rows[s][0] == "skipped" for s in STAGES if s != "large")
    assert "## large: fail" in summary.read_text()
    assert "dry run: would run: false bench/gpu_large_check.py" in summary.read_text()


@pytest.mark.build
def test_dry_run_passes_and_writes_the_summary(tmp_path):
    res = run_script(tmp_path, "--dry-run")
    out = tmp_path / "out"
    summary = out / "summary.md"
    assert summary.exists(), res.stdout + res.stderr
    text = summary.read_text()
    rows = summary_rows(summary)
    assert list(rows) == STAGES, text
    budgets = dict(budget_table())
    for stage, (status, seconds, budget, log) in rows.items():
        assert int(budget) == budgets[stage]
        assert log == f"{stage}.log" and (out / log).exists()
        assert float(seconds) <= 3 * budgets[stage] + 15  # the dry run's limit: 3x the GPU budget
    for key in ("| device |", "| torch |", "| triton |", "| nvcc |", "| date |", "dry run"):
        assert key in text
    failing = {s: r[0] for s, r in rows.items() if r[0] not in ("pass", "skipped")}
    assert not failing and res.returncode == 0, f"{failing}\n{text}"
    assert rows["memcheck"][0] == "pass" and rows["large"][0] == "pass" and rows["sync"][0] == "pass"
    # the GPU commands are echoed, the CPU variants really ran
    assert "compute-sanitizer --tool memcheck" in (out / "memcheck.log").read_text()
    assert "gpu_memcheck_ops: OK" in (out / "memcheck.log").read_text()
    assert "gpu_large_check: OK" in (out / "large.log").read_text()
    assert "gpu_sync_check: OK" in (out / "sync.log").read_text()
    assert "CLD_FAST_REQUIRE_CUDA=1" in (out / "build.log").read_text()
    assert "tests/test_ops_cuda.py" in (out / "gpu_tests.log").read_text()
    assert list((out / "bench").glob("*.md")), "the tiny kernel bench wrote no report"
