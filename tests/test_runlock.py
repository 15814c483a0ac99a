"""The run-folder lock and signal handling of the trainer, with real processes."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from cld_fast import checkpoint as ckpt
from cld_fast.runlock import LOCK_NAME, RunLock, RunLockedError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
QUICK = ["--batch-size", "32", "--log-every", "5", "--ckpt-every", "0", "--no-progress", "--no-quality-figure",
         "--device", "cpu", "--eval-samples", "100", "--eval-steps", "3", "--sample-steps", "3"]


def _cli(*args):
    return [sys.executable, "-m", "cld_fast.cli", *args]


def _wait_for(cond, what, timeout=120.0, proc=None):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _metrics_lines(run):
    path = os.path.join(run, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for _ in f)


def _start_training(run, *extra):
    """A real `cld-fast train` process that runs (practically) forever, once it has logged a loss."""
    proc = subprocess.Popen(_cli("train", "--out", run, "--steps", "10000000", *QUICK, *extra), cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    before = _metrics_lines(run)
    _wait_for(lambda: _metrics_lines(run) > before, "the first logged loss", proc=proc)
    return proc


def _last_line(text):
    return [line for line in text.splitlines() if line.strip()][-1]


@pytest.mark.slow
def test_two_trainers_one_folder_signals_and_resume(tmp_path):
    run = str(tmp_path / "run")
    first = _start_training(run)
    try:
        with open(os.path.join(run, LOCK_NAME)) as f:
            assert f.read().split()[0] == str(first.pid)
        # a second trainer on the same --out refuses, naming the holder, in one line with rc 2
        second = subprocess.run(_cli("train", "--out", run, "--steps", "50", "--seed", "1", *QUICK), cwd=ROOT,
                                env=ENV, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert f"in use by process {first.pid}" in second.stderr and "Traceback" not in second.stderr
        assert ckpt.list_checkpoints(os.path.join(run, "checkpoints")) == []  # the second wrote nothing
        # SIGTERM: checkpoint at the next step boundary, one line, exit 143
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 143, err
    line = _last_line(err)
    m = re.search(r"interrupted by SIGTERM at step (\d+): saved (\S+); continue with --resume", line)
    assert m, err
    step, path = int(m.group(1)), m.group(2)
    assert "Traceback" not in err and os.path.isfile(path)
    assert ckpt.load_checkpoint(path)["step"] == step

    # resume from it, then SIGINT: exit 130 with a newer checkpoint
    resumed = _start_training(run, "--resume")
    try:
        resumed.send_signal(signal.SIGINT)
        _, err = resumed.communicate(timeout=120)
    finally:
        if resumed.poll() is None:
            resumed.kill()
    assert resumed.returncode == 130, err
    assert f"resumed from {path} at step {step}" in err
    m = re.search(r"interrupted by SIGINT at step (\d+): saved (\S+)", _last_line(err))
    assert m and int(m.group(1)) > step and "KeyboardInterrupt" not in err, err
    step2 = int(m.group(1))

    # the lock is free again: finish the run from the SIGINT checkpoint
    done = subprocess.run(_cli("train", "--out", run, "--resume", "--steps", str(step2 + 5), *QUICK), cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"at step {step2}" in done.stderr
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(os.path.join(run, "checkpoints")))["step"] == step2 + 5


def test_stale_lock_of_a_killed_holder_is_taken_over(tmp_path):
    run = str(tmp_path / "run")
    code = ("import sys, time; from cld_fast.runlock import RunLock; lock = RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, run], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"in use by process {holder.pid}") as info:
            RunLock(run).acquire()
        assert info.value.pid == holder.pid
        holder.kill()  # SIGKILL: no cleanup runs, the file stays with the dead PID in it
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    with open(os.path.join(run, LOCK_NAME)) as f:
        assert f.read().split()[0] == str(holder.pid)
    with RunLock(run) as lock:  # the kernel dropped the flock: the stale file means nothing
        assert lock.held
        with open(lock.path) as f:
            assert f.read().split()[0] == str(os.getpid())
    assert not lock.held


def test_lock_is_exclusive_within_a_process_and_released(tmp_path):
    first = RunLock(str(tmp_path)).acquire()
    with pytest.raises(RunLockedError, match=str(os.getpid())):
        RunLock(str(tmp_path)).acquire()
    first.release()
    RunLock(str(tmp_path)).acquire().release()


def test_trainer_holds_the_lock_until_run_ends(tmp_path):
    from cld_fast.config import get_preset
    from cld_fast.train import Trainer

    cfg = get_preset("toy", steps=3, batch_size=16, log_every=1, ckpt_every=0, device="cpu", precision="fp32",
                     quality_figure=False, eval_samples=50, eval_steps=2, sample_steps=2)
    tr = Trainer(cfg, str(tmp_path), progress=False, verbose=False)
    with pytest.raises(RunLockedError):
        Trainer(cfg, str(tmp_path), progress=False, verbose=False)
    tr.run()
    # released by run(): a resumed trainer takes it
    again = Trainer(cfg.replace(steps=4), str(tmp_path), progress=False, verbose=False, resume="latest")
    assert again.step == 3
    again.close()


def test_trainer_releases_the_lock_when_setup_fails(tmp_path):
    from cld_fast.config import get_preset
    from cld_fast.data import DataError
    from cld_fast.train import Trainer

    bad = get_preset("toy", data="npz", data_path=str(tmp_path / "missing.npz"), device="cpu")
    with pytest.raises(DataError):
        Trainer(bad, str(tmp_path), progress=False, verbose=False)
    RunLock(str(tmp_path)).acquire().release()  # not left held by the failed trainer


def test_a_symlink_at_the_lock_name_is_never_followed(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(str(notes), str(run / LOCK_NAME))
    with RunLock(str(run)) as lock:
        assert not os.path.islink(lock.path)  # replaced by the PID file, not written through
    assert notes.read_text() == "precious\n"


@pytest.mark.parametrize("how", ["delete", "replace", "symlink"])
def test_a_deleted_or_replaced_lock_file_does_not_let_a_second_holder_in(tmp_path, how):
    run = str(tmp_path / "run")
    first = RunLock(run).acquire()
    try:
        os.unlink(first.path)
        if how == "replace":
            with open(first.path, "w") as f:
                f.write("1\n")
        elif how == "symlink":
            os.symlink(str(tmp_path / "elsewhere"), first.path)
        with pytest.raises(RunLockedError):
            RunLock(run).acquire()
        first.check()  # the folder itself is still the locked one
    finally:
        first.release()
    RunLock(run).acquire().release()


def test_a_removed_or_swapped_run_folder_is_detected(tmp_path):
    from cld_fast.runlock import RunFolderGoneError

    run = tmp_path / "run"
    lock = RunLock(str(run)).acquire()
    try:
        os.rename(str(run), str(tmp_path / "moved"))
        run.mkdir()  # a new folder at the same path is not the locked one
        with pytest.raises(RunFolderGoneError, match="deleted or replaced"):
            lock.check()
        run.rmdir()
        with pytest.raises(RunFolderGoneError):
            lock.check()
    finally:
        lock.release()


def test_trainer_stops_when_its_folder_is_deleted_mid_run(tmp_path, capsys):
    import shutil

    from cld_fast.config import get_preset
    from cld_fast.runlock import RunFolderGoneError
    from cld_fast.train import Trainer

    run = str(tmp_path / "run")
    cfg = get_preset("toy", steps=6, batch_size=16, log_every=1, ckpt_every=2, device="cpu", precision="fp32",
                     quality_figure=False, eval_samples=50, eval_steps=2, sample_steps=2)
    tr = Trainer(cfg, run, progress=False, verbose=False)
    inner, calls = tr.loss_fn, []

    def loss_then_delete(model, x0, gen):
        calls.append(1)
        if len(calls) == 3:
            shutil.rmtree(run)
        return inner(model, x0, gen)

    tr.loss_fn = loss_then_delete
    with pytest.raises(RunFolderGoneError, match=re.escape(run)):
        tr.run()
    tr.close()
    assert not os.path.exists(run)  # not silently re-created without its lock and metrics


@pytest.mark.parametrize("phase", ["snapshot", "evaluation"])
def test_sigterm_during_the_final_evaluation_stops_at_once(tmp_path, phase):
    from cld_fast.config import get_preset
    from cld_fast.train import Trainer, TrainingInterrupted

    cfg = get_preset("toy", steps=3, batch_size=16, log_every=1, ckpt_every=0, device="cpu", precision="fp32",
                     quality_figure=False, eval_samples=50, eval_steps=2, sample_steps=2)
    tr = Trainer(cfg, str(tmp_path), progress=False, verbose=False)
    target = "snapshot" if phase == "snapshot" else "_evaluate_toy"
    real = getattr(tr, target)

    def slow(*a, **k):  # the signal arrives while the final work runs, which then takes 30 s
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        return real(*a, **k)

    setattr(tr, target, slow)
    t0 = time.time()
    try:
        with pytest.raises(TrainingInterrupted, match="after training finished") as info:
            tr.run()
    finally:
        tr.close()
    assert time.time() - t0 < 20
    assert info.value.exit_code == 143 and info.value.step == 3
    assert ckpt.load_checkpoint(info.value.checkpoint)["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or not callable(signal.getsignal(signal.SIGTERM)) \
        or signal.getsignal(signal.SIGTERM).__name__ != "handler"  # handlers restored


def test_lock_release_at_interpreter_exit_is_silent(tmp_path):
    code = ("import sys; from cld_fast.runlock import RunLock; lock = RunLock(sys.argv[1]).acquire(); "
            "sys.modules['stat'] = None")  # modules torn down before the lock's __del__ runs
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True,
                         cwd=ROOT, env=ENV, timeout=120)
    assert res.returncode == 0 and "Traceback" not in res.stderr and "ignored" not in res.stderr, res.stderr
