"""The benchmark runner works end to end on a tiny kernel table (no timing is asserted anywhere)."""
import importlib.util
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_PY = os.path.join(ROOT, "bench", "run.py")


def _load_run():
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    spec = importlib.util.spec_from_file_location("bench_run_under_test", RUN_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run = _load_run()
    out = tmp_path_factory.mktemp("bench")
    argv = ["--only", "kernels", "--device", "cpu", "--sizes", "2x3x4x4", "--target-s", "0.002",
            "--no-compile", "--out", str(out)]
    path = run.run(argv)
    return out, path, path.read_text()


def test_report_files_written(report):
    out, path, text = report
    assert path.exists() and path.parent == out
    assert (out / "latest-cpu.md").read_text() == text
    raw = json.loads(path.with_suffix(".json").read_text())
    assert raw["kernels"], "raw kernel results missing"
    assert any(p.name.endswith("-kernels-gbps.png") for p in out.iterdir())
    assert any(p.name.endswith("-kernels-copyfrac.png") for p in out.iterdir())


def test_report_header(report):
    _, _, text = report
    import cld_fast

    assert text.startswith("# cld_fast benchmarks (CPU)")
    for field in ("| device | CPU: ", "| torch | " + torch.__version__, "| triton | ", "| CUDA (torch build) | ",
                  "| cld_fast | " + cld_fast.__version__, "| git commit | ", "| date | "):
        assert field in text, field
    assert "thread" in text


def test_one_row_per_implementation(report):
    from bench import kernels

    _, _, text = report
    for op in kernels.OPS:
        section = text.split(f"#### {kernels.OP_TITLES[op]}", 1)[1].split("####", 1)[0].split("Noise and step conventions", 1)[0]
        rows = [ln for ln in section.splitlines() if ln.startswith("| 2x3x4x4 |")]
        names = [ln.split("|")[2].strip() for ln in rows]
        assert names == [kernels.IMPL_TITLES[i] for i in kernels.IMPLS], (op, names)
    # what can't run here says n/a with a footnote, and what can run has numbers
    torch_row = next(ln for ln in text.splitlines() if ln.startswith("| 2x3x4x4 | cld_fast torch (reference) |"))
    assert "n/a" not in torch_row
    for impl in ("compile", "triton", "cuda"):   # --no-compile; CPU tensors
        row = next(ln for ln in text.splitlines() if ln.startswith(f"| 2x3x4x4 | {kernels.IMPL_TITLES[impl]} |"))
        assert "n/a [^" in row, row
    from cld_fast import backends

    cpu_rows = [ln for ln in text.splitlines() if ln.startswith("| 2x3x4x4 | cld_fast cpu (C++) |")]
    assert len(cpu_rows) == len(kernels.OPS)
    for cpu_row in cpu_rows:  # every op's kernel call matches its schema (a stale call is an n/a "cpu failed")
        assert ("n/a [^" in cpu_row) == (not backends.get("cpu").is_available()), cpu_row
    assert "## Notes" in text and "[^1]:" in text
    summary = text.split("**Public ops against the eager code and torch.compile**", 1)[1].split("\n\n", 2)[1]
    for op in kernels.PUBLIC_OPS:  # the loss as forward + backward; vs eager timed, vs compile "-" (--no-compile)
        row = next(ln for ln in summary.splitlines() if ln.startswith(f"| `{kernels.OP_SHORT[op]}` | 2x3x4x4 | cld_fast torch"))
        vs_eager, vs_compile = [c.strip() for c in row.strip("|").split("|")[-2:]]
        assert vs_eager.endswith("x") and vs_compile == "-", row


def test_launch_counts_match_the_committed_table():
    """bench/launch_counts.py: the official-style code dispatches ~100x more ops than our one fused launch
    per call, and the committed table (the README's headline) holds the current counts."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from bench import launch_counts

    rows = {r["op"]: r for r in launch_counts.count("cpu")}
    assert {op: r["ours"] for op, r in rows.items()} == {"perturb": 2, "loss_fwd": 1, "loss_bwd": 1, "sscs": 1}
    assert all(rows[op]["official"] > 100 for op in ("perturb", "loss_fwd", "sscs")), rows
    committed = open(os.path.join(ROOT, "bench", "results", "launch_counts-cpu.md"), encoding="utf-8").read()
    for r in rows.values():
        assert f"| {r['label']} | {r['official']} | {r['ours']} |" in committed, r
    for key in ("| device |", "| torch |", "| git commit |", "| date |"):
        assert key in committed


def test_expect_counts_passes_on_its_own_report_and_fails_on_a_changed_count(report, tmp_path):
    """--expect-counts: a run matches its own report; a report whose op-level counts differ exits 1 and says which."""
    out, path, text = report
    run = _load_run()
    from bench import kernels

    rows = run.count_rows(text)
    assert rows and set(rows) <= set(kernels.IMPL_TITLES.values()), rows  # that table's rows only
    assert run.count_differences(text, text) == []
    impl, cells = next(iter(run.count_rows(text).items()))
    stale = text.replace(f"| {impl} | {cells[0]} |", f"| {impl} | 999 (998) |", 1)
    assert stale != text
    problems = run.count_differences(stale, text)
    assert len(problems) == 1 and problems[0].startswith(impl) and "999 (998)" in problems[0]
    committed = tmp_path / "committed.md"
    committed.write_text(stale)
    argv = ["--only", "kernels", "--device", "cpu", "--sizes", "2x3x4x4", "--target-s", "0.002", "--no-compile",
            "--no-plots", "--no-latest", "--out", str(tmp_path / "again"), "--expect-counts", str(committed)]
    with pytest.raises(SystemExit) as info:
        run.run(argv)
    assert info.value.code == 1
