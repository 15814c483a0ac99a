"""``cld-fast selftest`` (cld_fast/selftest.py): every op of every CPU backend passes against the float64
reference, a wrong or raising backend op is reported (never a crash), and the CLI subcommand's output and
exit status. On a machine without CUDA the Triton backend runs under TRITON_INTERPRET=1 (conftest.py)."""
import os
import re
import subprocess
import sys

import pytest
import torch

from cld_fast import backends, opdefs
from cld_fast.backends import cpu_backend
from cld_fast.cli import main
from cld_fast.selftest import MODE_EXPLICIT, MODE_SEED, PHILOX, QUICK_SHAPES, SHAPES, run_selftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMMARY = re.compile(r"^selftest: (\d+) passed, (\d+) failed, (\d+) skipped$")
NOISY = {"perturb", "hsm_loss_fwd", "hsm_loss_bwd", "hsm_loss_fwd_grad", "half_step_", "sscs_step_", "affine_step",
         "gddim_step_"}  # gddim_step_ draws noise only for an inpainting condition (obs)


def _cpu_backends():
    names = ["cpu", "torch"]
    if backends.get("triton").is_available():
        names.append("triton")
    return names


@pytest.fixture(scope="module")
def report():
    return run_selftest(device="cpu")


def test_selftest_passes_on_cpu_and_covers_every_op(report):
    assert report.passed, "\n".join(str(r) for r in report.failures())
    assert report.device == "cpu"
    for name in _cpu_backends():
        assert name in report.backends_run
        rows = [r for r in report.rows if r.backend == name]
        assert rows and all(r.passed for r in rows)
        for dtype in ("float32", "float64"):
            for shape in SHAPES:
                ops = {(r.op, r.mode) for r in rows if r.dtype == dtype and r.shape == shape.label}
                for op in opdefs.OPS:
                    assert (op, MODE_EXPLICIT) in ops, (name, dtype, shape.label, op)
                    assert ((op, MODE_SEED) in ops) == (op in NOISY), (name, dtype, shape.label, op)
        philox_rows = {r.mode: r for r in rows if r.op == PHILOX}
        assert set(philox_rows) == {"bits", "normals"}
        assert philox_rows["bits"].max_err == 0 and philox_rows["bits"].tol == 0
    for r in report.rows:
        if r.passed:
            assert r.max_err <= r.tol
    if not torch.cuda.is_available():
        skipped = [r for r in report.rows if r.backend == "cuda"]
        assert len(skipped) == 1 and skipped[0].passed is None and "unavailable" in skipped[0].note
    m = SUMMARY.match(report.summary())
    assert m and int(m.group(1)) == report.n_passed > 0 and m.group(2) == "0"
    md = report.to_markdown()
    assert "| backend | op | mode | dtype | shape | max_err | tol | result | note |" in md
    assert report.summary() in md and "backends run:" in md
    text = report.to_text().splitlines()
    assert text[0].split()[:3] == ["backend", "op", "mode"] and len(text) == len(report.rows) + 1


def _wrong_cpu_ops(real):
    """The cpu backend with three broken ops: a perturbed result, a raise, a write outside a strided view."""
    def op(name):
        fn = real(name)
        if name == "mixed_score":
            return lambda *args: fn(*args) * (1 + 1e-4)
        if name == "perturb":
            def boom(*args):
                raise RuntimeError("boom: deliberately broken")
            return boom
        if name == "sscs_step_":
            def gaps(u, *args):
                fn(u, *args)
                if u._base is not None:
                    u._base.fill_(0.0)  # the whole buffer, gaps included: a contiguous-layout bug
            return gaps
        return fn
    return op


def test_a_wrong_or_raising_backend_op_is_a_failed_row(monkeypatch):
    monkeypatch.setattr(cpu_backend, "op", _wrong_cpu_ops(cpu_backend.op))
    rep = run_selftest(device="cpu", backends=["cpu"], dtypes=["float32"], quick=True)
    assert not rep.passed
    failed = {(r.op, r.shape) for r in rep.failures()}
    sliced = QUICK_SHAPES[1].label
    assert {("mixed_score", s.label) for s in QUICK_SHAPES} <= failed
    assert {("perturb", s.label) for s in QUICK_SHAPES} <= failed
    assert ("sscs_step_", sliced) in failed and ("sscs_step_", QUICK_SHAPES[0].label) not in failed
    assert {op for op, _ in failed} == {"mixed_score", "perturb", "sscs_step_"}
    notes = {(r.op, r.shape, r.mode): r.note for r in rep.failures()}
    assert "RuntimeError: boom: deliberately broken" in notes[("perturb", sliced, MODE_SEED)]
    assert "wrote outside the strided view" in notes[("sscs_step_", sliced, MODE_EXPLICIT)]
    assert "max_err" in notes[("mixed_score", sliced, MODE_EXPLICIT)]
    assert rep.n_failed == len(rep.failures()) and rep.n_passed > 0


def test_cli_exit_status_on_failure_and_on_nothing_to_run(monkeypatch, capsys):
    monkeypatch.setattr(cpu_backend, "op", _wrong_cpu_ops(cpu_backend.op))
    assert main(["selftest", "--device", "cpu", "--backend", "cpu", "--dtype", "float32", "--quick"]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert SUMMARY.match(out[-1]) and " 0 failed" not in out[-1]
    assert any(line.startswith("FAILED cpu perturb") for line in out)
    if not torch.cuda.is_available():
        assert main(["selftest", "--backend", "cuda"]) == 1  # skipped only: nothing was checked
        assert "nothing ran" in capsys.readouterr().out
        assert main(["selftest", "--device", "cuda"]) == 2
        assert "torch.cuda.is_available() is False" in capsys.readouterr().err
    assert main(["selftest", "--backend", "nope"]) == 2
    assert "unknown backend 'nope'" in capsys.readouterr().err


def test_cli_selftest_quick(tmp_path):
    out = tmp_path / "selftest.md"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "cld_fast.cli", "selftest", "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    m = SUMMARY.match(lines[-1])
    assert m and int(m.group(1)) > 0 and m.group(2) == "0", lines[-1]
    assert lines[0].startswith("cld-fast selftest on cpu: backends run:") or torch.cuda.is_available()
    for name in ("cpu", "torch"):
        assert name in lines[0]
    md = out.read_text()
    assert md.startswith("# cld-fast selftest on") and lines[-1] in md
