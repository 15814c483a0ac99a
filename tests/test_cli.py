"""The cld-fast command line: help, a short train run, sampling from our and from official checkpoints."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from cld_fast.cli import build_parser, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "official_cld_sgm")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one intra-op thread is fastest


def _run(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "cld_fast.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def _wrote(stdout):
    """{label: path} from the 'wrote:' block."""
    out = {}
    for line in stdout.splitlines():
        m = re.match(r"^\s{2}(\S.*?)\s{2,}(/.*)$", line)
        if m:
            out[m.group(1).strip()] = m.group(2).strip()
    return out


def test_help_texts(capsys):
    res = _run("--help")
    assert res.returncode == 0
    for cmd in ("train", "sample", "info"):
        assert cmd in res.stdout
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--out", "--resume", "--device", "--steps", "--batch-size", "--precision", "--compile", "--seed",
                 "--preset", "{auto,bf16,fp16,fp32}", "toy"):
        assert flag in text
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = capsys.readouterr().out
    assert "sscs" in text and "--config" in text


def test_info_still_works(capsys):
    assert main(["info"]) == 0
    assert "backends" in capsys.readouterr().out


def test_train_short_run_then_sample(tmp_path):
    out = tmp_path / "run"
    res = _run("train", "--steps", "30", "--out", str(out), "--log-every", "10", "--eval-samples", "300",
               "--eval-steps", "20", "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    files = _wrote(res.stdout)
    for label in ("checkpoint", "metrics", "samples plot", "quality figure", "samples npz"):
        assert label in files and os.path.isfile(files[label]), (label, res.stdout)
    assert files["checkpoint"].endswith("ckpt_0000030.pt")
    assert files["samples plot"].endswith(".png") and files["metrics"].endswith(".jsonl")
    assert "energy distance to fresh data (sscs, 20 steps" in res.stdout
    recs = [json.loads(x) for x in open(files["metrics"])]
    assert [r["step"] for r in recs if "loss" in r] == [10, 20, 30]

    res = _run("sample", files["checkpoint"], "--steps", "10", "--n", "200", "--method", "sscs")
    assert res.returncode == 0, res.stderr[-3000:]
    wrote = _wrote(res.stdout)
    assert os.path.isfile(wrote["png"]) and os.path.isfile(wrote["npz"])
    assert np.load(wrote["npz"])["x"].shape == (200, 2)
    # the run folder works too, with another method
    res = _run("sample", str(out), "--steps", "10", "--n", "100", "--method", "em", "--out", str(tmp_path / "s"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert os.path.isfile(tmp_path / "s" / "samples_em_10.png")

    # a second fresh run into the same folder is refused; --resume continues
    res = _run("train", "--steps", "40", "--out", str(out), "--no-progress")
    assert res.returncode == 2 and "--resume" in res.stderr
    res = _run("train", "--steps", "40", "--out", str(out), "--resume", "--no-progress", "--eval-samples", "200",
               "--eval-steps", "10", "--no-quality-figure")
    assert res.returncode == 0, res.stderr[-3000:]
    assert _wrote(res.stdout)["checkpoint"].endswith("ckpt_0000040.pt")


def test_sample_official_fixture_checkpoint(tmp_path):
    path = os.path.join(FIXTURES, "official_small_checkpoint.pth")
    config = os.path.join(FIXTURES, "official_small_config.json")
    if not os.path.exists(path):
        pytest.skip("official fixture checkpoint not present")
    res = _run("sample", path, "--config", config, "--steps", "3", "--n", "4", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    wrote = _wrote(res.stdout)
    png, npz = wrote["png"], wrote["npz"]
    assert os.path.isfile(png) and png.endswith(".png")
    z = np.load(npz)
    assert z["x"].shape == (4, 3, 16, 16) and z["v"].shape == (4, 3, 16, 16)
    assert np.isfinite(z["x"]).all()
    res = _run("sample", path, "--config", config, "--steps", "3", "--n", "2", "--method", "em", "--no-ema",
               "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]


def test_cli_errors_are_clear(tmp_path):
    res = _run("train", "--data", "cifar10", "--data-path", str(tmp_path / "nope"), "--out", str(tmp_path / "r"),
               "--no-progress")
    assert res.returncode == 2
    assert "cifar-10-batches-py" in res.stderr and "Traceback" not in res.stderr
    res = _run("sample", str(tmp_path / "missing.pt"))
    assert res.returncode == 2 and "not found" in res.stderr
    res = _run("train", "--steps", "-3", "--out", str(tmp_path / "r2"), "--no-progress")
    assert res.returncode == 2 and "steps" in res.stderr
    res = _run("train", "--model-opt", "oops", "--out", str(tmp_path / "r3"))
    assert res.returncode != 0 and "KEY=VALUE" in res.stderr


def test_parser_defaults_leave_preset_values():
    args = build_parser().parse_args(["train"])
    assert args.preset == "toy" and args.steps is None and args.resume is None
    args = build_parser().parse_args(["train", "--resume"])
    assert args.resume == "latest"
