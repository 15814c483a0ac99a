"""Checkpoints: atomic writes, keep-last-N, weights_only loading, resume resolution."""
import os

import pytest
import torch

from cld_fast import checkpoint as ckpt
import stat
from cli_helpers import cli, copy_run, one_line_error, poison, toy_config


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one intra-op thread is fastest


def _state(value):
    return {"model": {"w": torch.full((4,), float(value))}, "config": {"lr": 1e-3, "betas": [0.9, 0.999], "name": "x"},
            "rng": {"torch_cpu": torch.get_rng_state()}, "ema": {"decay": 0.9999, "num_updates": 3, "shadow_params": [torch.ones(2)]}}


def test_save_load_roundtrip_plain_types(tmp_path):
    path = ckpt.save_checkpoint(_state(1), str(tmp_path), step=7)
    assert os.path.basename(path) == "ckpt_0000007.pt"
    state = ckpt.load_checkpoint(path)
    assert state["step"] == 7 and state["format"] == ckpt.FORMAT
    assert torch.equal(state["model"]["w"], torch.ones(4))
    assert state["config"]["betas"] == [0.9, 0.999]
    # plain weights-only unpickling works on the raw file too
    raw = torch.load(path, weights_only=True)
    assert raw["ema"]["num_updates"] == 3


def test_load_uses_weights_only(tmp_path, monkeypatch):
    path = ckpt.save_checkpoint(_state(1), str(tmp_path), step=1)
    seen = {}
    orig = torch.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return orig(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    ckpt.load_checkpoint(path)
    assert seen.get("weights_only") is True


class _Evil:
    """Stands for any pickled object that weights_only loading must refuse."""


def test_load_rejects_arbitrary_objects(tmp_path):
    path = tmp_path / "ckpt_0000001.pt"
    torch.save({"format": ckpt.FORMAT, "obj": _Evil()}, path)
    with pytest.raises(ckpt.CheckpointError, match="could not load"):
        ckpt.load_checkpoint(str(path))


def test_load_rejects_foreign_files(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"model": {}}, path)
    with pytest.raises(ckpt.CheckpointError, match="not a cld_fast training checkpoint"):
        ckpt.load_checkpoint(str(path))
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        ckpt.load_checkpoint(str(tmp_path / "missing.pt"))
    (tmp_path / "garbage.pt").write_bytes(b"not a zip file at all")
    with pytest.raises(ckpt.CheckpointError, match="could not load"):
        ckpt.load_checkpoint(str(tmp_path / "garbage.pt"))


def test_atomic_write_failure_keeps_the_good_checkpoint(tmp_path, monkeypatch):
    good = ckpt.save_checkpoint(_state(1), str(tmp_path), step=5)
    before = open(good, "rb").read()

    def failing_replace(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        ckpt.atomic_save(_state(2), good)
    monkeypatch.undo()
    assert open(good, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt_0000005.pt"]  # no temp file left behind
    assert torch.equal(ckpt.load_checkpoint(good)["model"]["w"], torch.ones(4))


def test_atomic_write_failure_during_serialisation(tmp_path, monkeypatch):
    good = ckpt.save_checkpoint(_state(1), str(tmp_path), step=5)
    orig = torch.save

    def half_write(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise RuntimeError("killed mid-write (simulated)")

    monkeypatch.setattr(torch, "save", half_write)
    with pytest.raises(RuntimeError, match="simulated"):
        ckpt.save_checkpoint(_state(2), str(tmp_path), step=5)
    monkeypatch.setattr(torch, "save", orig)
    assert sorted(os.listdir(tmp_path)) == ["ckpt_0000005.pt"]
    assert torch.equal(ckpt.load_checkpoint(good)["model"]["w"], torch.ones(4))


def test_stale_temp_files_are_ignored_and_cleaned(tmp_path):
    ckpt.save_checkpoint(_state(1), str(tmp_path), step=3)
    stale = tmp_path / ".ckpt_0000006.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(str(tmp_path))] == ["ckpt_0000003.pt"]
    assert os.path.basename(ckpt.latest_checkpoint(str(tmp_path))) == "ckpt_0000003.pt"
    assert ckpt.clean_stale_temp(str(tmp_path)) == [str(stale)]
    assert not stale.exists()


def test_keep_last_n(tmp_path):
    for step in (10, 20, 30, 40, 50):
        ckpt.save_checkpoint(_state(step), str(tmp_path), step=step, keep=3)
    names = [os.path.basename(p) for p in ckpt.list_checkpoints(str(tmp_path))]
    assert names == ["ckpt_0000030.pt", "ckpt_0000040.pt", "ckpt_0000050.pt"]
    # numeric (not lexicographic) ordering, and keep <= 0 keeps everything
    ckpt.save_checkpoint(_state(1), str(tmp_path), step=1000000, keep=0)
    assert os.path.basename(ckpt.latest_checkpoint(str(tmp_path))) == "ckpt_1000000.pt"
    assert len(ckpt.list_checkpoints(str(tmp_path))) == 4


def test_resolve_resume(tmp_path):
    run = tmp_path / "run"
    assert ckpt.resolve_resume("latest", str(run)) is None
    p1 = ckpt.save_checkpoint(_state(1), str(run / "checkpoints"), step=1)
    p2 = ckpt.save_checkpoint(_state(2), str(run / "checkpoints"), step=2)
    assert ckpt.resolve_resume("latest", str(run)) == p2
    assert ckpt.resolve_resume(str(run), "elsewhere") == p2
    assert ckpt.resolve_resume(p1, "elsewhere") == p1
    with pytest.raises(ckpt.CheckpointError, match="no such file"):
        ckpt.resolve_resume(str(tmp_path / "nope.pt"), str(run))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "empty"), str(run))


def test_rng_state_roundtrip():
    gen = torch.Generator().manual_seed(5)
    states = ckpt.rng_state_tensors(gen)
    a = (torch.rand(3), torch.rand(3, generator=gen))
    ckpt.restore_rng_states(states, gen)
    b = (torch.rand(3), torch.rand(3, generator=gen))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---- non-finite checkpoints, file mode ---------------------------------------------------------------


def test_nan_checkpoint_is_refused_for_sampling_naming_the_tensor(run_dir, tmp_path, capsys):
    run = copy_run(run_dir, tmp_path)
    newest = ckpt.latest_checkpoint(os.path.join(run, "checkpoints"))
    poison(newest)
    with pytest.raises(ckpt.CheckpointError, match=r"model\['main.0.weight'\].*ckpt_0000002.pt"):
        ckpt.load_checkpoint(newest)
    from cld_fast.train import load_for_sampling

    with pytest.raises(ckpt.CheckpointError, match="NaN or inf"):
        load_for_sampling(newest)
    rc, _, err = cli(capsys, "sample", newest, "--steps", "3", "--n", "4", "--out", str(tmp_path / "s"))
    one_line_error(rc, err, "main.0.weight", "cannot be sampled from or resumed")
    assert not os.path.exists(tmp_path / "s")


def test_nan_checkpoint_is_refused_for_resume_and_never_called_good(run_dir, tmp_path, capsys):
    run = copy_run(run_dir, tmp_path)
    older, newest = ckpt.list_checkpoints(os.path.join(run, "checkpoints"))
    poison(newest, where="ema")
    rc, _, err = cli(capsys, "train", "--out", run, "--resume", "--steps", "6", "--no-progress")
    line = one_line_error(rc, err, "ema['shadow_params'][2]", f"the newest finite checkpoint before it is {older}")
    assert "good" not in line
    from cld_fast.train import Trainer

    with pytest.raises(ckpt.CheckpointError, match="shadow_params"):
        Trainer(toy_config(steps=6), run, progress=False, verbose=False, resume="latest")
    poison(older)  # now no finite checkpoint is left
    rc, _, err = cli(capsys, "train", "--out", run, "--resume", newest, "--steps", "6", "--no-progress")
    one_line_error(rc, err, "no earlier checkpoint in its folder is finite")
    # the older one named as the way out is itself refused when it is bad
    with pytest.raises(ckpt.CheckpointError, match=r"main.0.weight.*no earlier checkpoint"):
        ckpt.load_checkpoint(older)
    assert ckpt.last_finite_checkpoint(os.path.join(run, "checkpoints")) is None


def test_checkpoints_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = ckpt.save_checkpoint({"x": torch.zeros(2)}, str(tmp_path), 1)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
        os.umask(0o077)
        path = ckpt.save_checkpoint({"x": torch.zeros(2)}, str(tmp_path), 2)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        os.umask(old)


# ---- atomic writes: a crash before the rename keeps the previous checkpoint --------------------------


class Crash(BaseException):
    """Stands for the process dying (not an Exception, so nothing catches it by accident)."""


def _small_state(step_value):
    return {"model": {"w": torch.full((3,), float(step_value))}, "rng": {}, "ema": {}}


def test_crash_before_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    d = str(tmp_path)
    first = ckpt.save_checkpoint(_small_state(1), d, 1)

    def crash(src, dst):
        raise Crash()

    monkeypatch.setattr(ckpt.os, "replace", crash)
    with pytest.raises(Crash):
        ckpt.save_checkpoint(_small_state(2), d, 2)
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(d) == first
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(d))
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.full((3,), 1.0))


def test_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """torch.save dies after writing part of the file: the target name never holds the partial file."""
    d = str(tmp_path)
    ckpt.save_checkpoint(_small_state(1), d, 1)
    real_save = torch.save

    def partial_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04partial")
        raise Crash()

    monkeypatch.setattr(torch, "save", partial_save)
    with pytest.raises(Crash):
        ckpt.save_checkpoint(_small_state(2), d, 2)
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
        ckpt.save_checkpoint(_small_state(step), d, step, keep=keep)
    assert [int(os.path.basename(p)[5:12]) for p in ckpt.list_checkpoints(d)] == left
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(d))["step"] == 5


@pytest.mark.parametrize("step", [-5, 1.5, "3", None])
def test_a_step_that_is_not_a_count_is_refused_naming_file_and_key(tmp_path, step):
    path = str(tmp_path / "ckpt_0000001.pt")
    state = dict(_state(1), format=ckpt.FORMAT)
    if step is not None:
        state["step"] = step
    torch.save(state, path)
    with pytest.raises(ckpt.CheckpointError, match=r"ckpt_0000001\.pt.*'step' must be an int >= 0"):
        ckpt.load_checkpoint(path)


def test_missing_entries_and_other_versions_name_the_file(tmp_path):
    path = str(tmp_path / "ckpt_0000001.pt")
    state = dict(_state(1), format=ckpt.FORMAT, step=1)
    del state["config"]
    torch.save(state, path)
    loaded = ckpt.load_checkpoint(path)  # a checkpoint needs its model; who needs the config checks for it
    with pytest.raises(ckpt.CheckpointError, match=r"ckpt_0000001\.pt has no 'config' entry"):
        ckpt.check_entries(loaded, path, ("config", "model"))
    del state["model"]
    torch.save(state, path)
    with pytest.raises(ckpt.CheckpointError, match=r"ckpt_0000001\.pt has no 'model' entry"):
        ckpt.load_checkpoint(path)
    torch.save(dict(_state(1), format="cld_fast.train/0", step=1), path)
    with pytest.raises(ckpt.CheckpointError, match=r"ckpt_0000001\.pt was written by another cld_fast version"):
        ckpt.load_checkpoint(path)
    torch.save({"model": {"w": torch.ones(1)}}, path)
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_checkpoint(path)
    assert "--official" not in str(info.value) and "--config" in str(info.value)  # a flag that exists


def test_nan_hint_names_the_newest_finite_checkpoint(tmp_path):
    d = str(tmp_path)
    for step in (2, 4, 6, 8):
        ckpt.save_checkpoint(_state(step), d, step, keep=0)
    bad = torch.load(ckpt.checkpoint_path(d, 8), weights_only=True)
    bad["model"]["w"][0] = float("nan")
    torch.save(bad, ckpt.checkpoint_path(d, 8))
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load_checkpoint(ckpt.checkpoint_path(d, 8))
    assert f"--resume {ckpt.checkpoint_path(d, 6)}" in str(info.value)
    assert ckpt.last_finite_checkpoint(d) == ckpt.checkpoint_path(d, 6)


def test_a_folder_named_like_a_checkpoint_is_not_one(tmp_path):
    ckpt.save_checkpoint(_state(1), str(tmp_path), 3)
    os.mkdir(tmp_path / "ckpt_0000009.pt")
    assert ckpt.latest_checkpoint(str(tmp_path)) == ckpt.checkpoint_path(str(tmp_path), 3)


def test_wrapper_prefixes_are_stripped():
    sd = {"module.a.w": 1, "_orig_mod.b": 2, "module._orig_mod.c": 3, "d": 4}
    assert ckpt.bare_state_dict(sd) == {"a.w": 1, "b": 2, "c": 3, "d": 4}


def test_a_fifo_is_refused_without_reading_it(tmp_path):
    import threading

    fifo = str(tmp_path / "ckpt_0000001.pt")
    os.mkfifo(fifo)
    got = {}

    def load():
        try:
            ckpt.load_checkpoint(fifo)
        except ckpt.CheckpointError as exc:
            got["exc"] = exc

    th = threading.Thread(target=load, daemon=True)
    th.start()
    th.join(20)
    if th.is_alive():
        with open(fifo, "wb"):
            pass
        pytest.fail("load_checkpoint blocked reading a FIFO")
    assert "not a regular file" in str(got["exc"]) and fifo in str(got["exc"])
    assert ckpt.latest_checkpoint(str(tmp_path)) is None


def test_long_runs_prune_by_step_across_digit_counts(tmp_path):
    d = str(tmp_path)
    for step in (9999998, 9999999, 10000000, 10000001):
        ckpt.save_checkpoint(_state(step), d, step, keep=2)
    assert sorted(os.listdir(d)) == ["ckpt_10000000.pt", "ckpt_10000001.pt"]
    assert ckpt.latest_checkpoint(d) == ckpt.checkpoint_path(d, 10000001)
