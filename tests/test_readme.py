"""Every ```python block of README.md runs as written (CPU sizes).

Rule: a README section is a level-2 heading (``## ...``) and everything up to the next one. The
python blocks of a section run in order in one namespace, so a block may use names defined by an
earlier block of the *same* section; each section starts from an empty namespace (and torch seeded
with 0) in an empty temporary folder. A block may be skipped only with the comment
``<!-- readme-test: skip (why) -->`` on the line right before its fence, only when it needs a GPU
(the reason must say so), and the next python block of its section must then be a CPU variant
that runs. ``bash`` and other blocks are not run.
"""
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP = re.compile(r"^<!--\s*readme-test:\s*skip\s*\((?P<why>[^)]+)\)\s*-->$")


def parse(text: str):
    """[(section title, [(first line number, code, skip reason or None)])] of the python blocks."""
    sections, title, blocks = [], "(top)", []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            if blocks:
                sections.append((title, blocks))
            title, blocks = line[3:].strip(), []
        elif line.strip().startswith("```"):
            lang = line.strip()[3:].strip()
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            if j == len(lines):
                raise ValueError(f"README.md:{i + 1}: unclosed code fence")
            if lang == "python":
                prev = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
                m = SKIP.match(prev)
                blocks.append((i + 2, "\n".join(lines[i + 1:j]), m.group("why") if m else None))
            i = j
        i += 1
    if blocks:
        sections.append((title, blocks))
    return sections


SECTIONS = parse(README.read_text(encoding="utf-8"))
SLOW = {"Sampling: a drop-in fast sampler", "Networks and official checkpoints"}  # > 20 s on a 2-core CPU


def test_readme_has_python_blocks_and_skips_follow_the_rule():
    n_blocks = sum(len(b) for _, b in SECTIONS)
    assert n_blocks >= 6, n_blocks
    for title, blocks in SECTIONS:
        for k, (line, _, why) in enumerate(blocks):
            if why is None:
                continue
            assert "gpu" in why.lower(), f"README.md:{line} ({title}): blocks are skipped only when they need a GPU"
            assert k + 1 < len(blocks) and blocks[k + 1][2] is None, (
                f"README.md:{line} ({title}): a skipped block must be followed by a CPU variant in its section")


def test_parse_follows_the_rule():
    text = "\n".join([
        "## A", "```python", "x = 1", "```", "```bash", "echo no", "```",
        "<!-- readme-test: skip (needs a GPU) -->", "```python", "y = x.cuda()", "```",
        "## B", "```python", "z = 2", "```"])
    sections = parse(text)
    assert [t for t, _ in sections] == ["A", "B"]
    assert [(c, w) for _, c, w in sections[0][1]] == [("x = 1", None), ("y = x.cuda()", "needs a GPU")]
    assert sections[1][1] == [(14, "z = 2", None)]


@pytest.mark.parametrize("title,blocks", [pytest.param(t, b, marks=[pytest.mark.slow] if t in SLOW else [])
                                          for t, b in SECTIONS], ids=[t for t, _ in SECTIONS])
def test_readme_section_runs(title, blocks, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace = {"__name__": "__readme__"}
    ran = 0
    for line, code, why in blocks:
        if why is not None:
            compile(code, f"README.md:{line}", "exec")  # still valid Python
            continue
        exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102 - the README's own code
        ran += 1
    assert ran >= 1


def test_scheduler_fed_the_wrappers_score_agrees_to_float32_rounding():
    """The README's claim next to the scheduler snippet: with a cf.score_fn wrapper, stepping with the
    wrapper's score (mixed=False) instead of the raw output agrees with cf.sample to ~6e-7, not bitwise."""
    import cld_fast as cf
    from cld_fast.models import build_model

    torch.manual_seed(0)
    net = build_model("toy2d").eval()
    sde = cf.CLD()
    score = cf.score_fn(net, sde)
    sched = cf.SSCSScheduler(sde, steps=50)
    u = sched.init_noise((512, 2), generator=torch.Generator().manual_seed(0))
    for t in sched.timesteps:
        u = sched.step(score(u, t.expand(512)), t, u)
    ref = cf.sample(score, (512, 2), sde, steps=50, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(u, ref.u, rtol=0, atol=5e-6)
