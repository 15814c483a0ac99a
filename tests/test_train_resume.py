"""A run killed with SIGKILL resumes from its last checkpoint and ends bitwise equal to an uninterrupted run."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from cld_fast import checkpoint as ckpt
import torch.nn as nn
from cld_fast.config import get_preset
from cld_fast.train import Trainer

COMMON = ["--batch-size", "128", "--seed", "3", "--lr", "2e-3", "--ckpt-every", "25", "--log-every", "25",
          "--keep", "2", "--no-progress", "--eval-samples", "200", "--eval-steps", "10", "--sample-steps", "10",
          "--no-quality-figure", "--precision", "fp32", "--device", "cpu"]


def _cli(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "cld_fast.cli", "train", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _step(path):
    return int(os.path.basename(path)[5:12])


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    killed = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "cld_fast.cli", "train", "--out", str(killed), "--steps", "1000000",
                             *COMMON], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if len(ckpt.list_checkpoints(str(killed / "checkpoints"))) >= 2:
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        else:
            raise AssertionError("the victim run wrote no checkpoints in time")
        proc.send_signal(signal.SIGKILL)   # mid-training, possibly mid-write
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    last = ckpt.latest_checkpoint(str(killed / "checkpoints"))
    k = _step(last)
    killed_state = ckpt.load_checkpoint(last)       # the last checkpoint is complete and loadable
    target = k + 25

    res = _cli("--out", str(killed), "--resume", "--steps", str(target), *COMMON)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {last} at step {k}" in res.stderr
    ref = _cli("--out", str(tmp_path / "ref"), "--steps", str(target), *COMMON)
    assert ref.returncode == 0, ref.stderr[-3000:]

    a = ckpt.load_checkpoint(ckpt.latest_checkpoint(str(killed / "checkpoints")))
    b = ckpt.load_checkpoint(ckpt.latest_checkpoint(str(tmp_path / "ref" / "checkpoints")))
    assert a["step"] == b["step"] == target
    for key in b["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"]):
        assert torch.equal(x, y)
    for sid, st in b["optimizer"]["state"].items():
        for name, val in st.items():
            assert torch.equal(a["optimizer"]["state"][sid][name], val), (sid, name)
    assert torch.equal(a["rng"]["generator"][0], b["rng"]["generator"][0])
    # nothing before the kill was lost: the uninterrupted run passed through the same state at step k
    rk = ckpt.load_checkpoint(ckpt.checkpoint_path(str(tmp_path / "ref" / "checkpoints"), k))  # kept: --keep 2
    for key in rk["model"]:
        assert torch.equal(rk["model"][key], killed_state["model"][key])
    # no temporary files left in the resumed run's folder
    assert not [n for n in os.listdir(killed / "checkpoints") if n.endswith(".tmp")]


# ---- bitwise resume of a network that draws from the global RNG (dropout) ----------------------------


class DropoutNet(nn.Module):
    """model(u, t) -> out for 2-D data with dropout: every training step draws from the global CPU RNG."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 32), nn.SiLU(), nn.Dropout(0.3), nn.Linear(32, 2))
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=g))

    def forward(self, u, t):
        return self.net(torch.cat([u, t[:, None].to(u.dtype)], 1))


def _cfg(**kw):
    base = dict(steps=12, batch_size=64, precision="fp32", log_every=4, ckpt_every=6, keep_checkpoints=2,
                quality_figure=False, eval_samples=64, eval_steps=3, sample_count=64, sample_steps=3, sample_every=0)
    base.update(kw)
    return get_preset("toy", **base)


def _toy(**kw):
    from cld_fast.config import get_preset

    base = dict(steps=4, batch_size=16, log_every=1, ckpt_every=1, keep_checkpoints=0, device="cpu",
                precision="fp32", quality_figure=False, eval_samples=50, eval_steps=2, sample_steps=2)
    base.update(kw)
    return get_preset("toy", **base)


def test_resume_with_dropout_is_bitwise_identical(tmp_path):
    cfg = _cfg()
    full = Trainer(cfg, str(tmp_path / "full"), model=DropoutNet(), progress=False, verbose=False)
    full.run()
    part = Trainer(cfg.replace(steps=6), str(tmp_path / "part"), model=DropoutNet(), progress=False, verbose=False)
    part.run()
    torch.manual_seed(12345)  # whatever the process did in between, resume must restore the global RNG
    resumed = Trainer(cfg, str(tmp_path / "part"), model=DropoutNet(), progress=False, verbose=False, resume="latest")
    assert resumed.step == 6
    resumed.run()
    for a, b in zip(full.net.parameters(), resumed.net.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(full.ema.shadow_params, resumed.ema.shadow_params):
        assert torch.equal(a, b)
    # the dropout really matters here: a different global RNG stream gives different weights
    other = Trainer(cfg.replace(steps=6), str(tmp_path / "other"), model=DropoutNet(), progress=False, verbose=False)
    torch.manual_seed(999)
    for _ in range(6):
        other.train_step()
    assert not all(torch.equal(a, b) for a, b in zip(other.net.parameters(), part.net.parameters()))


def test_resume_from_an_older_checkpoint_makes_its_run_the_newest(tmp_path):
    from cld_fast.train import train

    run = str(tmp_path / "run")
    cdir = os.path.join(run, "checkpoints")
    train(_toy(), run, progress=False, verbose=False)
    old4 = torch.load(ckpt.checkpoint_path(cdir, 4), weights_only=True)
    res = train(_toy(steps=3, lr=5e-3), run, resume=ckpt.checkpoint_path(cdir, 2), progress=False, verbose=False)
    # the folder's newest checkpoint (what --resume and `cld-fast sample RUN` pick) is the resumed run's
    assert ckpt.latest_checkpoint(cdir) == res.checkpoint == ckpt.checkpoint_path(cdir, 3)
    assert ckpt.resolve_resume("latest", run) == res.checkpoint
    # the newer checkpoints of the abandoned line are kept, moved aside, unchanged
    aside = [d for d in os.listdir(cdir) if d.startswith("superseded-")]
    assert len(aside) == 1 and aside[0].endswith("resumed-at-0000002")
    moved = sorted(os.listdir(os.path.join(cdir, aside[0])))
    assert moved == ["ckpt_0000003.pt", "ckpt_0000004.pt"]
    kept = torch.load(os.path.join(cdir, aside[0], "ckpt_0000004.pt"), weights_only=True)
    assert torch.equal(kept["model"]["main.0.weight"], old4["model"]["main.0.weight"])
    assert torch.load(res.checkpoint, weights_only=True)["config"]["lr"] == 5e-3


def test_resume_refuses_a_different_architecture_naming_the_flag(tmp_path):
    from cld_fast.train import train

    run = str(tmp_path / "run")
    train(_toy(steps=2), run, progress=False, verbose=False)
    with pytest.raises(ckpt.CheckpointError, match="--model-opt cannot change"):
        train(_toy(steps=3, model_overrides={"hidden_dim": 64}), run, resume="latest", progress=False, verbose=False)
    with pytest.raises(ckpt.CheckpointError, match="--sde cannot change"):
        train(_toy(steps=3, sde="vpsde", sample_method="em"), run, resume="latest", progress=False, verbose=False)


def test_resume_and_sample_a_checkpoint_with_wrapper_prefixes(tmp_path):
    from cld_fast.train import load_for_sampling, train

    run = str(tmp_path / "run")
    res = train(_toy(steps=2), run, progress=False, verbose=False)
    state = torch.load(res.checkpoint, weights_only=True)
    state["model"] = {"module." + k: v for k, v in state["model"].items()}  # a DDP-wrapped state_dict
    torch.save(state, res.checkpoint)
    net, *_ = load_for_sampling(res.checkpoint, use_ema=False)
    assert torch.equal(net.state_dict()["main.0.weight"], state["model"]["module.main.0.weight"])
    again = train(_toy(steps=3), run, resume="latest", progress=False, verbose=False)
    assert again.step == 3
