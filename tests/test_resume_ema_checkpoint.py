"""Resume, EMA and checkpoint durability cases the audit of issue 15 found untested:
the EMA decay cap far past the warm-up, bitwise resume of a network that draws from the global CPU
RNG (dropout), and a crash between the checkpoint write and its rename (fsync order included)."""
import os
import stat

import pytest
import torch
import torch.nn as nn

from cld_fast import checkpoint as ckpt
from cld_fast.config import get_preset
from cld_fast.ema import ExponentialMovingAverage
from cld_fast.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- EMA ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decay", [0.9999, 0.999])
def test_ema_decay_is_capped_after_warmup(decay):
    """Update n uses min(decay, (1 + n) / (10 + n)); at n = 10**6 the warm-up term is 0.999991 > decay."""
    p = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    ema = ExponentialMovingAverage([p], decay=decay)
    ema.load_state_dict({"decay": decay, "num_updates": 10 ** 6 - 1, "shadow_params": [torch.ones(4, dtype=torch.float64)]})
    assert ema.current_decay() == decay
    assert ema.current_decay(10 ** 6) == decay
    assert ema.current_decay(5) == pytest.approx(6 / 15, rel=1e-15)  # still warming up
    with torch.no_grad():
        p.fill_(3.0)
    ema.update([p])
    assert ema.num_updates == 10 ** 6
    want = 1.0 - (1.0 - decay) * (1.0 - 3.0)  # shadow -= (1 - decay) (shadow - param)
    torch.testing.assert_close(ema.shadow_params[0], torch.full((4,), want, dtype=torch.float64), rtol=1e-14, atol=0)


def test_ema_without_num_updates_uses_the_decay_from_the_first_update():
    p = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    ema = ExponentialMovingAverage([p], decay=0.9, use_num_updates=False)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update([p])
    torch.testing.assert_close(ema.shadow_params[0], torch.full((2,), 0.1, dtype=torch.float64), rtol=1e-14, atol=0)


# ---- bitwise resume with dropout -------------------------------------------------------------------------
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


# ---- crash between write and rename ---------------------------------------------------------------------
class Crash(BaseException):
    """Stands for the process dying (not an Exception, so nothing catches it by accident)."""


def _state(step_value):
    return {"model": {"w": torch.full((3,), float(step_value))}, "rng": {}, "ema": {}}


def test_crash_before_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    d = str(tmp_path)
    first = ckpt.save_checkpoint(_state(1), d, 1)

    def crash(src, dst):
        raise Crash()

    monkeypatch.setattr(ckpt.os, "replace", crash)
    with pytest.raises(Crash):
        ckpt.save_checkpoint(_state(2), d, 2)
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(d) == first
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(d))
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.full((3,), 1.0))


def test_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """torch.save dies after writing part of the file: the target name never holds the partial file."""
    d = str(tmp_path)
    ckpt.save_checkpoint(_state(1), d, 1)
    real_save = torch.save

    def partial_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04partial")
        raise Crash()

    monkeypatch.setattr(torch, "save", partial_save)
    with pytest.raises(Crash):
        ckpt.save_checkpoint(_state(2), d, 2)
    monkeypatch.setattr(torch, "save", real_save)
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(d))
    assert state["step"] == 1
    # the trainer removes the dead writer's temporary files when it starts
    ckpt.clean_stale_temp(d)
    assert sorted(os.listdir(d)) == ["ckpt_0000001.pt"]


def test_file_and_directory_are_fsynced_around_the_rename(tmp_path, monkeypatch):
    """Data reach the disk before the rename makes them visible (file fsync), and the rename itself
    is made durable afterwards (directory fsync)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        mode = os.fstat(fd).st_mode
        events.append(("fsync-dir" if stat.S_ISDIR(mode) else "fsync-file", os.fstat(fd).st_ino))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.stat(src).st_ino))
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "fsync", fsync)
    monkeypatch.setattr(ckpt.os, "replace", replace)
    path = ckpt.atomic_save({"a": torch.ones(2)}, str(tmp_path / "x.pt"))
    monkeypatch.undo()
    kinds = [e[0] for e in events]
    assert "replace" in kinds
    r = kinds.index("replace")
    file_syncs = [e for e in events[:r] if e[0] == "fsync-file"]
    assert file_syncs and file_syncs[-1][1] == events[r][1], events  # the renamed file was fsynced before
    assert ("fsync-dir", os.stat(str(tmp_path)).st_ino) in events[r + 1:], events
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))


@pytest.mark.parametrize("keep, left", [(3, [3, 4, 5]), (1, [5]), (0, [1, 2, 3, 4, 5])])
def test_keep_last_n_checkpoints(tmp_path, keep, left):
    d = str(tmp_path)
    for step in range(1, 6):
        ckpt.save_checkpoint(_state(step), d, step, keep=keep)
    assert [int(os.path.basename(p)[5:12]) for p in ckpt.list_checkpoints(d)] == left
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(d))["step"] == 5
