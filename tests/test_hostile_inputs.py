"""Hostile-user findings of issue 16: NaN checkpoints, one-line CLI errors, the ODE budget, non-finite
samples, corrupt image folders and the smaller items of finding 9. (The run-folder lock and signals
are tests/test_runlock.py; out-of-range steps are tests/test_ops_contract.py.)"""
import errno
import json
import os
import shutil
import stat

import numpy as np
import pytest
import torch

import cld_fast as cf
from cld_fast import checkpoint as ckpt
from cld_fast.cli import main
from cld_fast.config import get_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "official_cld_sgm")

pytestmark = pytest.mark.usefixtures("one_thread")


def _toy(**kw):
    base = dict(steps=4, batch_size=16, log_every=1, ckpt_every=2, keep_checkpoints=5, device="cpu", precision="fp32",
                quality_figure=False, eval_samples=50, eval_steps=2, sample_steps=2, sample_every=0)
    base.update(kw)
    return get_preset("toy", **base)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished toy run with checkpoints at steps 2 and 4."""
    from cld_fast.train import train

    out = str(tmp_path_factory.mktemp("run"))
    train(_toy(), out, progress=False, verbose=False)
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(os.path.join(out, "checkpoints"))] == [
        "ckpt_0000002.pt", "ckpt_0000004.pt"]
    return out


def _copy_run(run_dir, tmp_path):
    dst = str(tmp_path / "run")
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def _poison(path, where="model"):
    state = torch.load(path, weights_only=True)
    if where == "model":
        state["model"]["main.0.weight"][0, 0] = float("nan")
    else:
        state["ema"]["shadow_params"][2].fill_(float("inf"))
    torch.save(state, path)


def _cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(rc, err, *needles):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error:" in lines[0]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ---- finding 4: non-finite checkpoints -------------------------------------------------------------


def test_nan_checkpoint_is_refused_for_sampling_naming_the_tensor(run_dir, tmp_path, capsys):
    run = _copy_run(run_dir, tmp_path)
    newest = ckpt.latest_checkpoint(os.path.join(run, "checkpoints"))
    _poison(newest)
    with pytest.raises(ckpt.CheckpointError, match=r"model\['main.0.weight'\].*ckpt_0000002.pt"):
        ckpt.load_checkpoint(newest)
    from cld_fast.train import load_for_sampling

    with pytest.raises(ckpt.CheckpointError, match="NaN or inf"):
        load_for_sampling(newest)
    rc, _, err = _cli(capsys, "sample", newest, "--steps", "3", "--n", "4", "--out", str(tmp_path / "s"))
    _one_line_error(rc, err, "main.0.weight", "cannot be sampled from or resumed")
    assert not os.path.exists(tmp_path / "s")


def test_nan_checkpoint_is_refused_for_resume_and_never_called_good(run_dir, tmp_path, capsys):
    run = _copy_run(run_dir, tmp_path)
    older, newest = ckpt.list_checkpoints(os.path.join(run, "checkpoints"))
    _poison(newest, where="ema")
    rc, _, err = _cli(capsys, "train", "--out", run, "--resume", "--steps", "6", "--no-progress")
    line = _one_line_error(rc, err, "ema['shadow_params'][2]", f"the newest finite checkpoint before it is {older}")
    assert "good" not in line
    from cld_fast.train import Trainer

    with pytest.raises(ckpt.CheckpointError, match="shadow_params"):
        Trainer(_toy(steps=6), run, progress=False, verbose=False, resume="latest")
    _poison(older)  # now no finite checkpoint is left
    rc, _, err = _cli(capsys, "train", "--out", run, "--resume", newest, "--steps", "6", "--no-progress")
    _one_line_error(rc, err, "no earlier checkpoint in its folder is finite")
    # the older one named as the way out is itself refused when it is bad
    with pytest.raises(ckpt.CheckpointError, match=r"main.0.weight.*no earlier checkpoint"):
        ckpt.load_checkpoint(older)
    assert ckpt.last_finite_checkpoint(os.path.join(run, "checkpoints")) is None


def test_official_loader_refuses_nan_weights(tmp_path):
    from cld_fast.models import build_model, load_official_checkpoint

    torch.manual_seed(0)
    net = build_model("toy2d")
    state = {"model": {f"module.{k}": v.clone() for k, v in net.state_dict().items()},
             "ema": {"decay": 0.999, "num_updates": 1, "shadow_params": [p.detach().clone() for p in net.parameters()]},
             "step": 1}
    load_official_checkpoint(state, config="toy2d")  # finite: loads
    state["ema"]["shadow_params"][1][0] = float("nan")
    with pytest.raises(ValueError, match=r"ema shadow_params\[1\] holds NaN"):
        load_official_checkpoint(state, config="toy2d")
    load_official_checkpoint(state, config="toy2d", use_ema=False)  # the raw weights are finite
    state["model"]["module.main.2.bias"][0] = float("inf")
    with pytest.raises(ValueError, match=r"model\['main.2.bias'\] holds NaN or inf"):
        load_official_checkpoint(state, config="toy2d", use_ema=False)


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


# ---- finding 5: one-line CLI errors, rc 2 --------------------------------------------------------


def test_sample_user_errors_are_one_line(run_dir, tmp_path, capsys):
    ck = ckpt.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    out = str(tmp_path / "s")
    rc, _, err = _cli(capsys, "sample", ck, "--steps", "0", "--out", out)
    _one_line_error(rc, err, "steps must be >= 1")
    rc, _, err = _cli(capsys, "sample", ck, "--eps", "2", "--out", out)
    _one_line_error(rc, err, "eps must lie in (0, 1)")
    rc, _, err = _cli(capsys, "sample", ck, "--n", "0", "--out", out)
    _one_line_error(rc, err, "--n must be >= 1")
    rc, _, err = _cli(capsys, "sample", ck, "--name", "../..", "--steps", "2", "--n", "3", "--out", out)
    _one_line_error(rc, err, "--name must be a plain file stem")
    rc, _, err = _cli(capsys, "sample", ck, "--name", "a/b", "--out", out)
    _one_line_error(rc, err, "--name")
    (tmp_path / "afile").write_text("x")
    rc, _, err = _cli(capsys, "sample", ck, "--out", str(tmp_path / "afile"))
    _one_line_error(rc, err, "exists and is not a folder")
    rc, _, err = _cli(capsys, "sample", ck, "--out", str(tmp_path / "afile" / "sub"))
    _one_line_error(rc, err, "is not a folder")
    rc, _, err = _cli(capsys, "sample", ck, "--device", "nonsense:x")
    _one_line_error(rc, err, "--device 'nonsense:x' is not a device name")
    assert not os.path.exists(out)
    rc, out_text, err = _cli(capsys, "sample", ck, "--steps", "2", "--n", "3", "--name", "ok", "--out", out)
    assert rc == 0 and os.path.isfile(os.path.join(out, "ok.npz")), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_gpu(run_dir, capsys):
    ck = ckpt.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    rc, _, err = _cli(capsys, "sample", ck, "--device", "cuda")
    _one_line_error(rc, err, "no CUDA GPU is available")
    rc, _, err = _cli(capsys, "train", "--device", "cuda", "--out", "/tmp/never-created-cld-fast")
    _one_line_error(rc, err, "no CUDA GPU is available")


def test_read_only_out_folder(run_dir, tmp_path, capsys, monkeypatch):
    ck = ckpt.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    real_access = os.access
    if os.geteuid() == 0:  # root ignores the mode bits: answer as the kernel would for a normal user
        monkeypatch.setattr(os, "access", lambda p, m: False if os.path.abspath(p) == str(ro) else real_access(p, m))
    rc, _, err = _cli(capsys, "sample", ck, "--out", str(ro / "samples"))
    _one_line_error(rc, err, f"the folder {ro} is not writable")
    rc, _, err = _cli(capsys, "train", "--out", str(ro / "run"))
    _one_line_error(rc, err, "is not writable")
    monkeypatch.setattr(os, "access", real_access)
    # a write that still fails (here: the permission error injected) is one line too
    monkeypatch.setattr(np, "savez", lambda *a, **k: (_ for _ in ()).throw(PermissionError(
        errno.EACCES, "Permission denied", str(tmp_path / "w" / "x.npz"))))
    rc, _, err = _cli(capsys, "sample", ck, "--steps", "2", "--n", "3", "--out", str(tmp_path / "w"))
    _one_line_error(rc, err, "Permission denied: " + str(tmp_path / "w" / "samples_sscs_2.npz"))


def test_disk_full_names_the_disk(tmp_path, capsys, monkeypatch):
    from cld_fast.cli import _disk_of

    def full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    run = str(tmp_path / "run")
    rc, _, err = _cli(capsys, "train", "--out", run, "--steps", "2", "--batch-size", "8", "--ckpt-every", "1",
                      "--no-progress", "--device", "cpu")
    line = err.strip().splitlines()[-1]
    assert rc == 2 and "Traceback" not in err
    assert f"the disk is full: no space left on {_disk_of(run)}" in line
    assert "ckpt_0000001.pt" in line and "MiB free" in line
    assert not [n for n in os.listdir(os.path.join(run, "checkpoints")) if n.endswith(".tmp")]

    # torch.save's own failure on a full disk is a bare RuntimeError ("unexpected pos"): recognised too
    def bare(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4048")

    monkeypatch.setattr(torch, "save", bare)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100 << 30, 100 << 30, 0))
    with pytest.raises(OSError) as info:
        ckpt.atomic_save({"x": 1}, str(tmp_path / "a.pt"))
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "a.pt")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100 << 30, 1 << 30, 99 << 30))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # plenty of space: not called a full disk
        ckpt.atomic_save({"x": 1}, str(tmp_path / "a.pt"))


def test_checkpoint_without_ema_or_of_another_config(run_dir, tmp_path, capsys):
    ck = ckpt.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    state = torch.load(ck, weights_only=True)
    no_ema = dict(state)
    del no_ema["ema"]
    p1 = str(tmp_path / "ckpt_0000001.pt")
    torch.save(no_ema, p1)
    rc, _, err = _cli(capsys, "sample", p1, "--steps", "2", "--n", "3", "--out", str(tmp_path / "s"))
    _one_line_error(rc, err, "has no 'ema' entry", "--no-ema")
    rc, _, err = _cli(capsys, "sample", p1, "--steps", "2", "--n", "3", "--no-ema", "--out", str(tmp_path / "s"))
    assert rc == 0, err
    other = dict(state)
    other["config"] = dict(state["config"], model_overrides={"hidden_dim": 64})
    p2 = str(tmp_path / "ckpt_0000002.pt")
    torch.save(other, p2)
    rc, _, err = _cli(capsys, "sample", p2, "--steps", "2", "--n", "3", "--out", str(tmp_path / "s"))
    _one_line_error(rc, err, "does not fit the network its config describes")
    # an official checkpoint under the wrong --config
    rc, _, err = _cli(capsys, "sample", os.path.join(FIXTURES, "official_small_checkpoint.pth"), "--config", "toy2d",
                      "--steps", "2", "--n", "2", "--out", str(tmp_path / "s"))
    _one_line_error(rc, err, "checkpoint does not match the network built from the config")


def test_bad_backend_variable_and_debug_tracebacks(capsys, monkeypatch):
    monkeypatch.setenv("CLD_FAST_BACKEND", "bogus")
    rc, out, err = _cli(capsys, "info")
    _one_line_error(rc, err, "CLD_FAST_BACKEND='bogus' is not a backend")
    assert out == ""
    rc, _, err = _cli(capsys, "info", "--debug")
    assert rc == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("cld-fast info: error:")
    monkeypatch.setenv("CLD_FAST_DEBUG", "1")
    rc, _, err = _cli(capsys, "info")
    assert rc == 2 and "Traceback" in err
    monkeypatch.delenv("CLD_FAST_BACKEND")
    monkeypatch.delenv("CLD_FAST_DEBUG")
    rc, out, err = _cli(capsys, "info")
    assert rc == 0 and "backends" in out


def test_train_option_errors_are_one_line(tmp_path, capsys):
    out = str(tmp_path / "r")
    rc, _, err = _cli(capsys, "train", "--out", out, "--grad-clip", "nan")
    _one_line_error(rc, err, "grad_clip must be a finite number")
    rc, _, err = _cli(capsys, "train", "--out", out, "--lr", "inf")
    _one_line_error(rc, err, "lr must be a finite number")
    rc, _, err = _cli(capsys, "train", "--out", out, "--model-opt", "hiden_dim=64")
    _one_line_error(rc, err, "unknown model option(s) ['hiden_dim']", "hidden_dim")
    rc, _, err = _cli(capsys, "train", "--out", out, "--model-opt", "oops")
    _one_line_error(rc, err, "--model-opt expects KEY=VALUE")
    assert not os.path.exists(out)


# ---- finding 6: the ODE budget, huge step counts, non-finite samples ------------------------------


def _stiff(u, t):
    return -1e6 * u[:, u.shape[1] // 2:]


def _nan_score(u, t):
    return torch.full((u.shape[0], u.shape[1] // 2), float("nan"), dtype=u.dtype)


def test_ode_max_nfe_names_the_time_reached(sde):
    calls = []

    def counted(u, t):
        calls.append(float(t[0]))
        return _stiff(u, t)

    with pytest.raises(cf.NFEBudgetError, match=r"max_nfe = 60 score evaluations used up at t = 0\.9") as info:
        cf.sample(counted, (4, 2), sde, method="ode", max_nfe=60, generator=torch.Generator().manual_seed(0))
    assert len(calls) <= 60 and info.value.nfe == len(calls)
    assert 0.9 < info.value.t < 1.0
    # the default budget (10,000) holds for a stiff score too
    from cld_fast.sampling import ODE_MAX_NFE

    assert ODE_MAX_NFE == 10_000
    calls.clear()
    with pytest.raises(cf.NFEBudgetError, match="max_nfe = 10000"):
        cf.sample(counted, (2, 2), sde, method="ode", generator=torch.Generator().manual_seed(0))
    assert len(calls) <= 10_000
    # a well-behaved score finishes within a small budget and reports its evaluations
    res = cf.sample(lambda u, t: -4.0 * u[:, 2:], (4, 2), sde, method="ode", max_nfe=500,
                    generator=torch.Generator().manual_seed(0))
    assert res.nfe <= 500 and bool(torch.isfinite(res.u).all())
    with pytest.raises(ValueError, match="max_nfe= bounds the adaptive ODE solver"):
        cf.sample(_stiff, (4, 2), sde, method="sscs", max_nfe=100)
    with pytest.raises(ValueError, match="max_nfe must be an int >= 8"):
        cf.sample(_stiff, (4, 2), sde, method="ode", max_nfe=0)


def test_absurd_step_count_is_a_clear_error(sde):
    with pytest.raises(ValueError, match=r"steps = 100000000 is more than cld_fast supports \(1,000,000"):
        cf.sample(_nan_score, (4, 2), sde, steps=10**8)


@pytest.mark.parametrize("method", ["sscs", "em", "gddim"])
def test_non_finite_samples_raise_once_at_the_end(method, sde):
    calls = []

    def nan_after_two(u, t):
        calls.append(1)
        y = -4.0 * u[:, u.shape[1] // 2:]
        return y * float("nan") if len(calls) > 2 else y

    with pytest.raises(cf.NonFiniteSamplesError, match=rf"{method}: 16 of 16 values .* after 6 score evaluations") as info:
        cf.sample(nan_after_two, (4, 2), sde, steps=6, method=method, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 6  # the loop ran to the end: no check (host sync) inside it
    assert info.value.result.nfe == 6 and not bool(torch.isfinite(info.value.result.u).any())
    assert isinstance(info.value, cf.SamplingError)


def test_vp_sde_nan_samples_raise(sde):
    with pytest.raises(cf.NonFiniteSamplesError, match="em:"):
        cf.sample(lambda x, t: x * float("nan"), (4, 2), cf.VPSDE(), steps=3, method="em")


# ---- finding 8: corrupt images found before training ----------------------------------------------


def _image_folder(root, n=4, size=12):
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def test_corrupt_image_fails_before_training_naming_the_file(tmp_path, capsys):
    from cld_fast import data as D

    root = _image_folder(tmp_path / "imgs")
    good = (root / "0.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])  # a valid header, cut short
    (root / "junk.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(D.DataError, match=r"could not decode image '.*junk.jpg'.*\(and 1 more bad file\(s\)\).*--bad-images skip"):
        D.ImageFolder(str(root), size=8)
    with pytest.warns(RuntimeWarning, match="skipping 2 unreadable image"):
        ds = D.ImageFolder(str(root), size=8, bad_images="skip")
    assert len(ds) == 4 and sorted(os.path.basename(f) for f, _ in ds.skipped) == ["junk.jpg", "truncated.png"]
    with pytest.raises(D.DataError, match="bad_images must be one of"):
        D.ImageFolder(str(root), size=8, bad_images="ignore")

    run = str(tmp_path / "run")
    args = ("train", "--data", "folder", "--data-path", str(root), "--image-size", "8", "--model", "tiny",
            "--out", run, "--steps", "1", "--batch-size", "2", "--no-progress", "--device", "cpu")
    rc, _, err = _cli(capsys, *args)
    _one_line_error(rc, err, "junk.jpg")
    assert not os.path.exists(os.path.join(run, "metrics.jsonl"))  # stopped before training
    (root / "junk.jpg").unlink()
    (root / "truncated.png").unlink()
    (root / "empty.png").write_bytes(b"")
    rc, _, err = _cli(capsys, *args)
    _one_line_error(rc, err, "empty.png")


# ---- finding 9 ------------------------------------------------------------------------------------


def _backends_here():
    return [b for b in ("torch", "cpu", "triton") if b in cf.backends()]


@pytest.mark.parametrize("objective", ["hsm", "dsm"])
def test_perturb_never_keeps_x0_graph(objective, sde):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=g, requires_grad=True)
    t = torch.rand(3, generator=g) * 0.9 + 0.1
    for backend in _backends_here():
        u, _ = cf.perturb(x * 2.0, t, sde, objective=objective, backend=backend,
                          generator=torch.Generator().manual_seed(1))
        assert not u.requires_grad and u.grad_fn is None, backend


def test_seed_range_is_the_same_for_perturb_and_the_step_ops(sde):
    g = torch.Generator().manual_seed(0)
    x0, t = torch.randn(4, 3, generator=g), torch.full((4,), 0.5)
    for backend in _backends_here():
        for seed in (-1, 2**62, 2**63 - 1):
            for as_tensor in (False, True):
                s = torch.tensor([seed]) if as_tensor else seed
                with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*62\)"):
                    cf.perturb(x0, t, sde, seed=s, backend=backend)
                with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*62\)"):
                    cf.half_step_(torch.randn(4, 6, generator=g), [1.0, 0.5], sde, seed=s, backend=backend)
                with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*62\)"):
                    cf.em_step_(torch.randn(4, 6, generator=g), torch.randn(4, 3), [1.0, 0.5], sde, seed=s,
                                backend=backend)
        top = 2**62 - 1
        cf.perturb(x0, t, sde, seed=torch.tensor([top]), backend=backend)
        cf.half_step_(torch.randn(4, 6, generator=g), [1.0, 0.5], sde, seed=top, backend=backend)


def test_objective_and_non_finite_explicit_inputs(sde):
    g = torch.Generator().manual_seed(0)
    x0, t = torch.randn(4, 3, generator=g), torch.full((4,), 0.5)
    with pytest.raises(ValueError, match="objective must be one of"):
        cf.perturb(x0, t, sde, objective="bogus")
    with pytest.raises(TypeError, match="coefficients"):  # coefficients come from t and the CLD only
        cf.perturb(x0, t, sde, objective="bogus", coefficients=torch.zeros(4, 7))
    eps = torch.randn(4, 2, 3, generator=g)
    eps[1, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="eps contains NaN"):
        cf.perturb(x0, t, sde, eps=eps)
    table = sde.gddim_table(torch.tensor([1.0, 0.5, 0.1], dtype=torch.float64), 1, "eps")
    u, y = torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)
    hist = cf.gddim_history(u, 1)
    cf.gddim_step_(u.clone(), y, hist, table, step=0)
    table[0, 3] = float("nan")
    with pytest.raises(ValueError, match="table contains NaN"):
        cf.gddim_step_(u.clone(), y, hist, table, step=0)
    with cf.value_checks(False):  # the documented opt-out: no host read
        cf.gddim_step_(u.clone(), y, hist, table, step=0, backend="torch")


def test_build_model_rejects_image_sizes_the_network_cannot_run():
    from cld_fast.models import build_model, get_config

    for size, ch_mult, ok in ((8, "1,2", True), (9, "1,2", False), (12, "1,2,2", True), (6, "1,2,2", False),
                              (4, "1,2,2", True), (2, "1,2,2", False)):
        cfg = dict(get_config("tiny"), image_size=size, ch_mult=ch_mult)
        if ok:
            net = build_model(cfg)
            assert net(torch.randn(1, 6, size, size), torch.full((1,), 0.5)).shape == (1, 3, size, size)
        else:
            with pytest.raises(ValueError, match=f"image_size {size} cannot run through"):
                build_model(cfg)


def test_load_official_checkpoint_accepts_a_json_config_path(tmp_path):
    from cld_fast.models import load_official_checkpoint

    path = os.path.join(FIXTURES, "official_small_checkpoint.pth")
    cfg_path = os.path.join(FIXTURES, "official_small_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    a = load_official_checkpoint(path, config=cfg)
    b = load_official_checkpoint(path, config=cfg_path)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        load_official_checkpoint(path, config=str(tmp_path / "bad.json"))


def test_unknown_model_options_are_rejected():
    from cld_fast.config import TrainConfig

    with pytest.raises(ValueError, match=r"unknown model option\(s\) \['hidn'\]"):
        TrainConfig(model="toy2d", model_overrides={"hidn": 3})
    with pytest.raises(ValueError, match=r"unknown model option\(s\) \['n_channel'\]"):
        TrainConfig(model="tiny", model_overrides={"n_channel": 8})
    assert TrainConfig(model="tiny", model_overrides={"n_channels": 8}).model_overrides == {"n_channels": 8}
    with pytest.raises(ValueError, match="grad_clip must be a finite number"):
        TrainConfig(grad_clip=float("nan"))


# ---- finding 3: Triton loss gradient, float64 state and bf16 network output ------------------------


@pytest.mark.skipif("triton" not in cf.backends(), reason="triton backend unavailable")
@pytest.mark.parametrize("weighting", ["reweightedv2", "likelihood"])
def test_triton_loss_gradient_float64_state_bf16_output(weighting, sde):
    """Public API, triton against torch: the gradient reaches the bf16 output through float32."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.rand(5, generator=g, dtype=torch.float64) * 0.9 + 0.05
    eps = torch.randn(5, 2, 18, generator=g, dtype=torch.float64)
    u, noise = cf.perturb(x0, t, sde, eps=eps, backend="torch")
    base = torch.randn(5, 2, 3, 3, generator=g).to(torch.bfloat16)
    grads = {}
    for backend in ("torch", "triton"):
        out = base.clone().requires_grad_(True)
        cf.hsm_loss(out, u, t, sde, noise, weighting=weighting, backend=backend).backward()
        grads[backend] = out.grad
    assert grads["triton"].dtype == torch.bfloat16
    got, want = grads["triton"].double(), grads["torch"].double()
    assert bool(torch.isfinite(got).all()) and float(got.abs().min()) > 0
    assert torch.allclose(got, want, rtol=1e-2, atol=1e-2 * float(want.abs().max())), (got - want).abs().max()


@pytest.mark.parametrize("method", ["sscs", "em", "gddim"])
def test_final_finite_check_adds_no_sync_inside_the_loop(method, sde):
    """Host reads do not grow with the step count, and the finite check's read follows the last step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    reads = {}
    for steps in (4, 12):
        with Record() as rec:
            cf.sample(lambda u, t: u[:, 2:].neg(), (8, 2), sde, steps=steps, method=method, backend="torch",
                      generator=torch.Generator().manual_seed(0))
        reads[steps] = rec.ops.count("_local_scalar_dense")
        last_read = len(rec.ops) - 1 - rec.ops[::-1].index("_local_scalar_dense")
        assert rec.ops[last_read - 2:last_read + 1] == ["bitwise_not", "sum", "_local_scalar_dense"], rec.ops[-8:]
        assert last_read == len(rec.ops) - 1  # nothing runs after the check
    assert reads[4] == reads[12]
