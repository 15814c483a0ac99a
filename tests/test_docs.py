"""The README and the docs/ pages: every ```python block runs as written (CPU sizes), links resolve,
the site's navigation lists every page, and the README's test command is the one CI runs.

Rules for a python block:
- it is self-contained: it runs alone, in a fresh namespace (torch seeded with 0), in an empty
  temporary folder;
- it may be skipped only with the comment ``<!-- docs-test: skip (why) -->`` on the line right before
  its fence, only when it needs a GPU (the reason must say so), and the next python block of its
  section (a ``## `` heading and what follows up to the next one) must then be a CPU variant that runs;
- a ``print(...)`` whose comment starts with ``torch.Size`` states its output: that line must be printed;
- a block that imports diffusers skips where diffusers is not installed.
``bash`` and other blocks are not run.
"""
import importlib.util
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
SKIP = re.compile(r"^<!--\s*docs-test:\s*skip\s*\((?P<why>[^)]+)\)\s*-->$")
STATED = re.compile(r"^\s*print\(.*\)\s*#\s*(?P<out>torch\.Size.*?)\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\((?P<target>[^)\s]+)\)")
SLOW = {("dropin.md", "Networks and official checkpoints"), ("sampling.md", "Likelihood"),
        ("training.md", "From Python"), ("guidance.md", "From Python")}  # 5-60 s on a 2-core CPU


def parse(text: str, name: str = "page"):
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
                raise ValueError(f"{name}:{i + 1}: unclosed code fence")
            if lang == "python":
                prev = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
                m = SKIP.match(prev)
                blocks.append((i + 2, "\n".join(lines[i + 1:j]), m.group("why") if m else None))
            i = j
        i += 1
    if blocks:
        sections.append((title, blocks))
    return sections


def _blocks():
    """pytest params: one per python block of every page."""
    params = []
    for page in PAGES:
        for title, blocks in parse(page.read_text(encoding="utf-8"), page.name):
            for line, code, why in blocks:
                marks = [pytest.mark.slow] if (page.name, title) in SLOW else []
                params.append(pytest.param(page.name, line, code, why, marks=marks, id=f"{page.name}:{line}"))
    return params


BLOCKS = _blocks()


def test_every_page_has_python_and_skips_follow_the_rule():
    for page in PAGES:
        sections = parse(page.read_text(encoding="utf-8"), page.name)
        if page.name in ("README.md", "sampling.md", "dropin.md", "guarantees.md"):
            assert sections, f"{page.name} has no python block"
        for title, blocks in sections:
            for k, (line, _, why) in enumerate(blocks):
                if why is None:
                    continue
                assert "gpu" in why.lower(), f"{page.name}:{line} ({title}): blocks are skipped only when they need a GPU"
                assert k + 1 < len(blocks) and blocks[k + 1][2] is None, (
                    f"{page.name}:{line} ({title}): a skipped block must be followed by a CPU variant in its section")


def test_parse_follows_the_rule():
    text = "\n".join([
        "## A", "```python", "x = 1", "```", "```bash", "echo no", "```",
        "<!-- docs-test: skip (needs a GPU) -->", "```python", "y = x.cuda()", "```",
        "## B", "```python", "z = 2", "```"])
    sections = parse(text)
    assert [t for t, _ in sections] == ["A", "B"]
    assert [(c, w) for _, c, w in sections[0][1]] == [("x = 1", None), ("y = x.cuda()", "needs a GPU")]
    assert sections[1][1] == [(14, "z = 2", None)]


@pytest.mark.parametrize("page,line,code,why", BLOCKS)
def test_block_runs_on_its_own(page, line, code, why, tmp_path, monkeypatch, capsys):
    if why is not None:
        compile(code, f"{page}:{line}", "exec")  # still valid Python
        pytest.skip(why)
    if "from diffusers" in code and importlib.util.find_spec("diffusers") is None:
        pytest.skip("diffusers is not installed (pip install 'cld_fast[diffusers]')")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(code, f"{page}:{line}", "exec"), {"__name__": "__docs__"})  # noqa: S102 - the docs' own code
    printed = capsys.readouterr().out.splitlines()
    for stated in (m.group("out") for m in map(STATED.match, code.splitlines()) if m):
        assert stated in printed, f"{page}:{line}: the block states it prints {stated!r}; it printed {printed}"


def test_relative_links_resolve():
    """Links to files of the repository (as read on GitHub or in an editor) point at existing files."""
    for page in PAGES:
        for m in LINK.finditer(page.read_text(encoding="utf-8")):
            target = m.group("target").split("#", 1)[0]
            if not target or re.match(r"^[a-z]+:", target):
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)}: broken link {m.group('target')}"


def test_site_navigation_lists_every_page():
    nav = re.findall(r"^\s+- [^:]+: (\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(encoding="utf-8"), flags=re.M)
    assert sorted(nav) == sorted(p.name for p in (ROOT / "docs").glob("*.md"))


def test_readme_is_a_front_page():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 170


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = next(ln for ln in readme.splitlines() if ln.endswith("python -m pytest -q -p no:cacheprovider"))
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert command in ci, command
    assert 'python -m pytest -q -p no:cacheprovider -m "build or long"' in "\n".join(ci)
