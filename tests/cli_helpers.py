"""Helpers for tests that drive the CLI or a finished toy run: one-line error checks, run copies, poisoned checkpoints."""
import shutil

import torch

from cld_fast.cli import main
from cld_fast.config import get_preset


def toy_config(**kw):
    """The toy preset at test size (4 steps, checkpoints every 2)."""
    base = dict(steps=4, batch_size=16, log_every=1, ckpt_every=2, keep_checkpoints=5, device="cpu", precision="fp32",
                quality_figure=False, eval_samples=50, eval_steps=2, sample_steps=2, sample_every=0)
    base.update(kw)
    return get_preset("toy", **base)


def copy_run(run_dir, tmp_path):
    """A copy of ``run_dir`` under ``tmp_path`` (without its lock file)."""
    dst = str(tmp_path / "run")
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def poison(path, where="model"):
    """Write NaN into the model (or inf into the EMA) of the checkpoint at ``path``."""
    state = torch.load(path, weights_only=True)
    if where == "model":
        state["model"]["main.0.weight"][0, 0] = float("nan")
    else:
        state["ema"]["shadow_params"][2].fill_(float("inf"))
    torch.save(state, path)


def cli(capsys, *argv):
    """(exit status, stdout, stderr) of ``cld-fast argv...`` run in-process."""
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc, err, *needles):
    """Assert a user error: exit status 2, one line on stderr naming every needle; returns the line."""
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error:" in lines[0]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]
