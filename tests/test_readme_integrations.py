"""Every code snippet of the README subsection "Using it from diffusers and k-diffusion" runs as written."""
import importlib.util
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

README = Path(__file__).resolve().parents[1] / "README.md"
HEADING = "### Using it from diffusers and k-diffusion"


def _snippets():
    text = README.read_text()
    start = text.index(HEADING)
    end = text.index("\n## ", start)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_the_subsection_has_its_three_snippets():
    blocks = _snippets()
    assert len(blocks) == 3
    assert "diffusers" in blocks[2] and "kdiffusion" in blocks[1] and "timesteps=ts" in blocks[0]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["sample-u-timesteps", "kdiffusion", "diffusers"])
def test_snippet_runs(index, tmp_path, monkeypatch, capsys):
    code = _snippets()[index]
    if "from diffusers" in code and importlib.util.find_spec("diffusers") is None:
        pytest.skip("diffusers is not installed (pip install 'cld_fast[diffusers]')")
    monkeypatch.chdir(tmp_path)  # save_pretrained writes into the working directory
    exec(compile(code, f"README:{HEADING}[{index}]", "exec"), {"__name__": "__readme__"})
    if index == 0:
        out = capsys.readouterr().out.splitlines()
        assert out[-1] == "torch.Size([256, 2]) 6"  # the printed line the README promises
        assert len(out) == 7
    if index == 2:
        assert (tmp_path / "cld_scheduler" / "scheduler_config.json").is_file()
