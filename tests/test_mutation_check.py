"""tools/mutation_check.py: its mutant list stays applicable, and one mutant runs end to end."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import mutation_check as mc  # noqa: E402


def test_every_mutant_applies_once_and_names_existing_tests():
    assert len(mc.MUTANTS) >= 41
    assert len({m.id for m in mc.MUTANTS}) == len(mc.MUTANTS)
    for m in mc.MUTANTS:
        with open(os.path.join(ROOT, m.file)) as f:
            text = f.read()
        assert text.count(m.old) == 1, f"{m.id}: the text to mutate is found {text.count(m.old)} times in {m.file}"
        assert m.new != m.old
        files = [a for a in m.tests if a.startswith("tests/")]
        assert files, m.id
        for f in files:
            assert os.path.exists(os.path.join(ROOT, f.split("::")[0])), (m.id, f)


@pytest.mark.slow
def test_one_mutant_is_planted_in_a_copy_and_killed(tmp_path):
    out = tmp_path / "table.md"
    before = open(os.path.join(ROOT, "cld_fast", "ema.py")).read()
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "mutation_check.py"), "--only", "S8",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "| S8 |" in out.read_text() and "KILLED" in out.read_text()
    assert open(os.path.join(ROOT, "cld_fast", "ema.py")).read() == before  # the working tree is untouched
