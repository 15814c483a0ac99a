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
import errno
import shutil
from cld_fast import checkpoint as ckpt
from cli_helpers import cli, one_line_error

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


@pytest.mark.long
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
    assert "SDE: CLD(beta0=4, beta1=0, m_inv=4, gamma=0.04, numerical_eps=1e-09), mixed_score=True, " \
           "objective=hsm (from the checkpoint)" in res.stdout
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


def test_train_official_options_then_sample_uses_the_objective(tmp_path):
    out = tmp_path / "dsm"
    res = _run("train", "--steps", "5", "--out", str(out), "--objective", "dsm", "--weighting", "reweightedv1",
               "--optimizer", "adamax", "--eval-samples", "100", "--eval-steps", "5", "--no-progress",
               "--no-quality-figure")
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = json.load(open(out / "config.json"))
    assert (cfg["objective"], cfg["weighting"], cfg["optimizer"]) == ("dsm", "reweightedv1", "adamax")
    res = _run("sample", _wrote(res.stdout)["checkpoint"], "--steps", "5", "--n", "50")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "mixed_score=True, objective=dsm (from the checkpoint)" in res.stdout
    res = _run("train", "--steps", "5", "--out", str(tmp_path / "vp"), "--sde", "vpsde", "--objective", "dsm")
    assert res.returncode == 2 and "CLD options" in res.stderr and len(res.stderr.strip().splitlines()) == 1


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


# --- cld-fast sample reads the SDE of an official config (numerical_eps, beta0/1, m_inv, gamma, ...) ---------
def _official_sde_config(tmp_path, **sde_keys):
    cfg = json.load(open(os.path.join(FIXTURES, "official_small_config.json")))
    cfg.update(sde_keys)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return cfg, str(path)


def test_sample_official_reads_the_sde_from_the_config_json(tmp_path, capsys):
    import cld_fast as cf
    from cld_fast.models import load_official_checkpoint

    ckpt = os.path.join(FIXTURES, "official_small_checkpoint.pth")
    cfg, path = _official_sde_config(tmp_path, numerical_eps=1e-6, beta0=3.0, beta1=2.0, m_inv=4.0, gamma=0.04,
                                     mixed_score=True, cld_objective="hsm", sde="cld", beta_type="linear")
    assert main(["sample", ckpt, "--config", path, "--steps", "3", "--n", "2", "--seed", "7",
                 "--out", str(tmp_path / "a"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert ("SDE: CLD(beta0=3, beta1=2, m_inv=4, gamma=0.04, numerical_eps=1e-06), mixed_score=True, "
            "objective=hsm") in out
    assert "from --config" in out and "numerical_eps" in out.split("from --config")[1]
    z = np.load(tmp_path / "a" / "samples_sscs_3.npz")

    net = load_official_checkpoint(ckpt, config=cfg)
    def run(sde):
        res = cf.sample(cf.score_fn(net, sde), (2, 3, 16, 16), sde, steps=3, method="sscs", eps=1e-3,
                        generator=torch.Generator("cpu").manual_seed(7), device="cpu")
        return res.x.numpy(), res.v.numpy()
    expected = run(cf.CLD(beta0=3.0, beta1=2.0, m_inv=4.0, gamma=0.04, numerical_eps=1e-6))
    np.testing.assert_allclose(z["x"], expected[0], rtol=0, atol=1e-6)  # float32, same code path
    np.testing.assert_allclose(z["v"], expected[1], rtol=0, atol=1e-5)
    old = run(cf.CLD(beta0=3.0, beta1=2.0, m_inv=4.0, gamma=0.04))  # numerical_eps dropped (the old CLI)
    # the final denoising step at t = 1e-3 is where numerical_eps matters: v moves, x barely
    assert np.abs(z["v"] - old[1]).max() > 1e-2 * np.abs(old[1]).max()

    # a flag overrides the config, and the printout says where each value came from
    assert main(["sample", ckpt, "--config", path, "--steps", "2", "--n", "1", "--numerical-eps", "1e-9",
                 "--out", str(tmp_path / "b"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "numerical_eps=1e-09" in out and "from the command line: numerical_eps" in out


def test_sample_official_celebahq_config_uses_its_sde(tmp_path, capsys):
    from cld_fast.models import build_model, get_config

    # a checkpoint of a (reduced-width) celebahq256 network: the preset's SDE keys must be used
    cfg = dict(get_config("celebahq256"), n_channels=8, image_size=64, ch_mult="1,2", n_resblocks=1,
               attn_resolutions="4")
    torch.manual_seed(0)
    net = build_model(cfg)
    ckpt = tmp_path / "c.pth"
    torch.save({"model": {"module." + k: v for k, v in net.state_dict().items()}}, ckpt)
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    assert main(["sample", str(ckpt), "--config", str(tmp_path / "c.json"), "--no-ema", "--steps", "2", "--n", "1",
                 "--out", str(tmp_path / "o"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "CLD(beta0=0.1, beta1=6.9, m_inv=4, gamma=0.04, numerical_eps=1e-06)" in out


@pytest.mark.parametrize("keys,needle", [({"cld_objective": "dsm"}, "cld_objective"),
                                         ({"mixed_score": False}, "mixed_score")])
def test_sample_official_dsm_or_non_mixed_uses_and_prints_them(tmp_path, capsys, keys, needle):
    ckpt = os.path.join(FIXTURES, "official_small_checkpoint.pth")
    _, path = _official_sde_config(tmp_path, **keys)
    code = main(["sample", ckpt, "--config", path, "--steps", "2", "--n", "1", "--out", str(tmp_path / "o"),
                 "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0 and {"cld_objective": "objective=dsm", "mixed_score": "mixed_score=False"}[needle] in captured.out


def test_sample_official_rejects_unsupported_sde_keys(tmp_path, capsys):
    ckpt = os.path.join(FIXTURES, "official_small_checkpoint.pth")
    for keys, needle in (({"beta_type": "cosine"}, "beta_type"), ({"sde": "vpsde"}, "sde"),
                         ({"numerical_eps": "abc"}, "numerical_eps")):
        _, path = _official_sde_config(tmp_path, **keys)
        assert main(["sample", ckpt, "--config", path, "--steps", "2", "--n", "1", "--device", "cpu"]) == 2
        assert needle in capsys.readouterr().err


# ---- user errors: one line on stderr, exit status 2 --------------------------------------------------


def test_sample_user_errors_are_one_line(run_dir, tmp_path, capsys):
    ck = ckpt.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    out = str(tmp_path / "s")
    rc, _, err = cli(capsys, "sample", ck, "--steps", "0", "--out", out)
    one_line_error(rc, err, "steps must be >= 1")
    rc, _, err = cli(capsys, "sample", ck, "--eps", "2", "--out", out)
    one_line_error(rc, err, "eps must lie in (0, 1)")
    rc, _, err = cli(capsys, "sample", ck, "--n", "0", "--out", out)
    one_line_error(rc, err, "--n must be >= 1")
    rc, _, err = cli(capsys, "sample", ck, "--name", "../..", "--steps", "2", "--n", "3", "--out", out)
    one_line_error(rc, err, "--name must be a plain file stem")
    rc, _, err = cli(capsys, "sample", ck, "--name", "a/b", "--out", out)
    one_line_error(rc, err, "--name")
    (tmp_path / "afile").write_text("x")
    rc, _, err = cli(capsys, "sample", ck, "--out", str(tmp_path / "afile"))
    one_line_error(rc, err, "exists and is not a folder")
    rc, _, err = cli(capsys, "sample", ck, "--out", str(tmp_path / "afile" / "sub"))
    one_line_error(rc, err, "is not a folder")
    rc, _, err = cli(capsys, "sample", ck, "--device", "nonsense:x")
    one_line_error(rc, err, "--device 'nonsense:x' is not a device name")
    assert not os.path.exists(out)
    rc, out_text, err = cli(capsys, "sample", ck, "--steps", "2", "--n", "3", "--name", "ok", "--out", out)
    assert rc == 0 and os.path.isfile(os.path.join(out, "ok.npz")), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_gpu(run_dir, capsys):
    ck = ckpt.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    rc, _, err = cli(capsys, "sample", ck, "--device", "cuda")
    one_line_error(rc, err, "no CUDA GPU is available")
    rc, _, err = cli(capsys, "train", "--device", "cuda", "--out", "/tmp/never-created-cld-fast")
    one_line_error(rc, err, "no CUDA GPU is available")


def test_read_only_out_folder(run_dir, tmp_path, capsys, monkeypatch):
    ck = ckpt.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    real_access = os.access
    if os.geteuid() == 0:  # root ignores the mode bits: answer as the kernel would for a normal user
        monkeypatch.setattr(os, "access", lambda p, m: False if os.path.abspath(p) == str(ro) else real_access(p, m))
    rc, _, err = cli(capsys, "sample", ck, "--out", str(ro / "samples"))
    one_line_error(rc, err, f"the folder {ro} is not writable")
    rc, _, err = cli(capsys, "train", "--out", str(ro / "run"))
    one_line_error(rc, err, "is not writable")
    monkeypatch.setattr(os, "access", real_access)
    # a write that still fails (here: the permission error injected) is one line too
    monkeypatch.setattr(np, "savez", lambda *a, **k: (_ for _ in ()).throw(PermissionError(
        errno.EACCES, "Permission denied", str(tmp_path / "w" / "x.npz"))))
    rc, _, err = cli(capsys, "sample", ck, "--steps", "2", "--n", "3", "--out", str(tmp_path / "w"))
    one_line_error(rc, err, "Permission denied: " + str(tmp_path / "w" / "samples_sscs_2.npz"))


def test_disk_full_names_the_disk(tmp_path, capsys, monkeypatch):
    from cld_fast.cli import _disk_of

    def full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    run = str(tmp_path / "run")
    rc, _, err = cli(capsys, "train", "--out", run, "--steps", "2", "--batch-size", "8", "--ckpt-every", "1",
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
    rc, _, err = cli(capsys, "sample", p1, "--steps", "2", "--n", "3", "--out", str(tmp_path / "s"))
    one_line_error(rc, err, "has no 'ema' entry", "--no-ema")
    rc, _, err = cli(capsys, "sample", p1, "--steps", "2", "--n", "3", "--no-ema", "--out", str(tmp_path / "s"))
    assert rc == 0, err
    other = dict(state)
    other["config"] = dict(state["config"], model_overrides={"hidden_dim": 64})
    p2 = str(tmp_path / "ckpt_0000002.pt")
    torch.save(other, p2)
    rc, _, err = cli(capsys, "sample", p2, "--steps", "2", "--n", "3", "--out", str(tmp_path / "s"))
    one_line_error(rc, err, "does not fit the network its config describes")
    # an official checkpoint under the wrong --config
    rc, _, err = cli(capsys, "sample", os.path.join(FIXTURES, "official_small_checkpoint.pth"), "--config", "toy2d",
                      "--steps", "2", "--n", "2", "--out", str(tmp_path / "s"))
    one_line_error(rc, err, "checkpoint does not match the network built from the config")


def test_bad_backend_variable_and_debug_tracebacks(capsys, monkeypatch):
    monkeypatch.setenv("CLD_FAST_BACKEND", "bogus")
    rc, out, err = cli(capsys, "info")
    one_line_error(rc, err, "CLD_FAST_BACKEND='bogus' is not a backend")
    assert out == ""
    rc, _, err = cli(capsys, "info", "--debug")
    assert rc == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("cld-fast info: error:")
    monkeypatch.setenv("CLD_FAST_DEBUG", "1")
    rc, _, err = cli(capsys, "info")
    assert rc == 2 and "Traceback" in err
    monkeypatch.delenv("CLD_FAST_BACKEND")
    monkeypatch.delenv("CLD_FAST_DEBUG")
    rc, out, err = cli(capsys, "info")
    assert rc == 0 and "backends" in out


def test_train_option_errors_are_one_line(tmp_path, capsys):
    out = str(tmp_path / "r")
    rc, _, err = cli(capsys, "train", "--out", out, "--grad-clip", "nan")
    one_line_error(rc, err, "grad_clip must be a finite number")
    rc, _, err = cli(capsys, "train", "--out", out, "--lr", "inf")
    one_line_error(rc, err, "lr must be a finite number")
    rc, _, err = cli(capsys, "train", "--out", out, "--model-opt", "hiden_dim=64")
    one_line_error(rc, err, "unknown model option(s) ['hiden_dim']", "hidden_dim")
    rc, _, err = cli(capsys, "train", "--out", out, "--model-opt", "oops")
    one_line_error(rc, err, "--model-opt expects KEY=VALUE")
    assert not os.path.exists(out)


# ---- user errors: one line on stderr naming the flag, file or key; exit 2 ----------------------------


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A finished 4-step toy run with checkpoints at steps 2 and 4."""
    from cld_fast.config import get_preset
    from cld_fast.train import train

    out = str(tmp_path_factory.mktemp("toy_run"))
    train(get_preset("toy", steps=4, batch_size=16, log_every=1, ckpt_every=2, keep_checkpoints=5, device="cpu",
                     precision="fp32", quality_figure=False, eval_samples=50, eval_steps=2, sample_steps=2),
          out, progress=False, verbose=False)
    return out


def _main(capsys, *argv):
    try:
        rc = main(list(argv))
    except SystemExit as exc:  # argparse
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line(rc, err, *needles, code=2):
    # progress notes ("[cld-fast] run dir ...") may come first; the error itself is one line
    lines = [line for line in err.strip().splitlines() if line.strip() and not line.startswith("[cld-fast]")]
    assert rc == code and len(lines) == 1 and "Traceback" not in err, (rc, err)
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


Q = ["--batch-size", "16", "--no-progress", "--device", "cpu", "--steps", "2", "--eval-samples", "50",
     "--eval-steps", "2", "--sample-steps", "2", "--no-quality-figure"]


@pytest.mark.parametrize("argv, needles", [
    (["--model-opt", "hidden_dim=-5"], ["--model-opt hidden_dim=-5"]),
    (["--model-opt", "hidden_dim=abc"], ["--model-opt hidden_dim='abc'"]),
    (["--device", "mps"], ["--device mps"]),
    (["--eval-samples", "0"], ["--eval-samples"]),
    (["--eval-samples", "1"], ["--eval-samples"]),
    (["--lr", "-1e-3"], ["lr must be a finite number > 0"]),
    (["--seed", str(2**70)], ["--seed"]),
    (["--keep", "-1"], ["--keep"]),
    (["--bogus"], ["unrecognized arguments: --bogus"]),
])
def test_train_user_errors_are_one_line_before_training(tmp_path, capsys, argv, needles):
    out = str(tmp_path / "r")
    rc, _, err = _main(capsys, "train", "--out", out, *Q, *argv)
    _one_line(rc, err, *needles)
    assert not os.path.exists(os.path.join(out, "checkpoints")) or not os.listdir(os.path.join(out, "checkpoints"))


def test_train_out_must_not_be_empty(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = _main(capsys, "train", "--out", "", *Q)
    _one_line(rc, err, "--out must not be empty")
    assert not os.path.exists(tmp_path / "runs")


def test_backend_variable_naming_an_unavailable_backend(tmp_path, capsys, monkeypatch):
    from cld_fast import backends

    missing = [n for n in backends.BACKEND_NAMES if not backends.get(n).is_available()]
    if not missing:
        pytest.skip("every backend runs here")
    monkeypatch.setenv("CLD_FAST_BACKEND", missing[0])
    rc, _, err = _main(capsys, "train", "--out", str(tmp_path / "r"), *Q)
    _one_line(rc, err, f"CLD_FAST_BACKEND={missing[0]} can't run here")


def test_tensorboard_without_the_package(tmp_path, capsys, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_tb(name, *a, **k):
        if name.startswith("torch.utils.tensorboard") or name == "tensorboard":
            raise ImportError("No module named 'tensorboard'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tb)
    rc, _, err = _main(capsys, "train", "--out", str(tmp_path / "r"), *Q, "--tensorboard")
    _one_line(rc, err, "pip install")


def test_batch_size_beyond_memory_names_the_flag(tmp_path, capsys):
    rc, _, err = _main(capsys, "train", "--out", str(tmp_path / "r"), *Q, "--batch-size", "100000000000")
    _one_line(rc, err, "out of memory with --batch-size 100000000000", "lower --batch-size")


def test_resume_with_another_architecture_names_the_flag(toy_run, tmp_path, capsys):
    import shutil

    run = str(tmp_path / "run")
    shutil.copytree(toy_run, run)
    rc, _, err = _main(capsys, "train", "--out", run, "--resume", *Q, "--model-opt", "hidden_dim=64")
    _one_line(rc, err, "--model-opt cannot change")
    rc, _, err = _main(capsys, "train", "--out", run, "--resume", *Q, "--sde", "vpsde")
    _one_line(rc, err, "--sde cannot change")


def test_sample_user_errors_name_the_flag_or_file(toy_run, tmp_path, capsys):
    ck = ckpt_path = os.path.join(toy_run, "checkpoints", "ckpt_0000004.pt")
    out = str(tmp_path / "s")
    rc, _, err = _main(capsys, "sample", ck, "--beta0", "100", "--out", out)
    _one_line(rc, err, "--beta0", "only for official")
    rc, _, err = _main(capsys, "sample", ck, "--config", "cifar10", "--out", out)
    _one_line(rc, err, "--config", "only for official")
    rc, _, err = _main(capsys, "sample", ck, "--seed", str(2**70), "--out", out)
    _one_line(rc, err, "--seed")
    rc, _, err = _main(capsys, "sample", ck, "--out", "")
    _one_line(rc, err, "--out must not be empty")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "bad.json").write_text("{bad")
    official = os.path.join(FIXTURES, "official_small_checkpoint.pth")
    rc, _, err = _main(capsys, "sample", official, "--config", str(tmp_path / "list.json"), "--out", out)
    _one_line(rc, err, f"--config {tmp_path / 'list.json'} must hold a JSON object")
    rc, _, err = _main(capsys, "sample", official, "--config", str(tmp_path / "bad.json"), "--out", out)
    _one_line(rc, err, f"--config {tmp_path / 'bad.json'} is not valid JSON")
    # another version's checkpoint: named as such, not read as an official one ("missing keys ...")
    state = torch.load(ckpt_path, weights_only=True)
    state["format"] = "cld_fast.train/0"
    old = str(tmp_path / "old.pt")
    torch.save(state, old)
    rc, _, err = _main(capsys, "sample", old, "--out", out)
    _one_line(rc, err, "old.pt was written by another cld_fast version")
    # a checkpoint without its config entry names the file and the key
    del state["config"]
    state["format"] = "cld_fast.train/1"
    torch.save(state, old)
    rc, _, err = _main(capsys, "sample", old, "--out", out)
    _one_line(rc, err, "old.pt has no 'config' entry")
    assert not os.path.exists(out)


def test_sample_run_folder_with_a_folder_named_like_a_checkpoint(toy_run, tmp_path, capsys):
    import shutil

    run = str(tmp_path / "run")
    shutil.copytree(toy_run, run)
    os.mkdir(os.path.join(run, "checkpoints", "ckpt_0000009.pt"))
    rc, out, err = _main(capsys, "sample", run, "--steps", "2", "--n", "3", "--out", str(tmp_path / "s"))
    assert rc == 0, err


def test_sample_unwritable_out_fails_before_sampling(toy_run, tmp_path, capsys, monkeypatch):
    import errno
    import tempfile

    import cld_fast.sampling

    calls = []
    monkeypatch.setattr(cld_fast.sampling, "sample", lambda *a, **k: calls.append(1))
    real = tempfile.TemporaryFile
    ro = os.path.join(toy_run, "samples")

    def read_only(*a, dir=None, **k):
        if dir is not None and os.path.abspath(dir) == os.path.abspath(ro):
            raise OSError(errno.EROFS, "Read-only file system", dir)
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    rc, _, err = _main(capsys, "sample", toy_run, "--steps", "2", "--n", "3")  # default out: RUN/samples
    _one_line(rc, err, f"the samples folder {ro} is not writable", "Read-only file system", "mount ")
    assert calls == []


def test_sample_over_a_full_disk_keeps_the_old_file_and_names_the_mount(toy_run, tmp_path, capsys, monkeypatch):
    import errno

    from cld_fast.fileio import mount_of

    out = tmp_path / "s"
    rc, _, err = _main(capsys, "sample", toy_run, "--steps", "2", "--n", "3", "--name", "s", "--out", str(out))
    assert rc == 0, err
    before = (out / "s.npz").read_bytes()

    def full(file, **arrays):  # writes part of the file, then the disk is full (zipfile's error has no path)
        f = file if hasattr(file, "write") else open(file, "wb")
        f.write(before[:100])
        f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    rc, _, err = _main(capsys, "sample", toy_run, "--steps", "2", "--n", "3", "--name", "s", "--out", str(out))
    line = _one_line(rc, err, "the disk is full", f"on {mount_of(str(out))}", f"while writing {out / 's.npz'}")
    assert (out / "s.npz").read_bytes() == before  # the old file is intact: the write was atomic
    assert sorted(os.listdir(out)) == ["s.npz", "s.png"]  # no temporary file left
    assert line


def test_mount_of_follows_links_to_the_failing_disk(tmp_path):
    from cld_fast.fileio import mount_of

    other = "/dev/shm"
    if not (os.path.isdir(other) and os.path.ismount(other)) or mount_of(str(tmp_path)) == other:
        pytest.skip("needs /dev/shm as a mount of its own")
    target = tempfile_dir = os.path.join(other, f"cld_fast_test_{os.getpid()}")
    os.makedirs(target, exist_ok=True)
    try:
        os.symlink(target, tmp_path / "link")
        assert mount_of(str(tmp_path / "link" / "x" / "y.npz")) == other
    finally:
        os.rmdir(tempfile_dir)


def test_internal_errors_say_they_are_a_bug(capsys, monkeypatch):
    import cld_fast.cli as cli

    def boom(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli, "_dispatch", lambda parser, args: boom(args))
    rc, _, err = _main(capsys, "info")
    _one_line(rc, err, "internal error (a bug in cld_fast", "ZeroDivisionError", "--debug", "report", code=1)


def test_resume_of_a_checkpoint_from_a_newer_version_names_it(toy_run, tmp_path, capsys):
    state = torch.load(os.path.join(toy_run, "checkpoints", "ckpt_0000004.pt"), weights_only=True)
    state["config"]["an_option_of_a_newer_version"] = 1
    newer = str(tmp_path / "newer.pt")
    torch.save(state, newer)
    rc, _, err = _main(capsys, "train", "--out", str(tmp_path / "r"), "--resume", newer, *Q, "--steps", "6")
    _one_line(rc, err, f"--resume {newer}", "an_option_of_a_newer_version")
    rc, _, err = _main(capsys, "sample", newer, "--out", str(tmp_path / "s"))
    _one_line(rc, err, newer, "an_option_of_a_newer_version")


def test_sample_count_beyond_memory_names_the_flag(toy_run, tmp_path, capsys):
    rc, _, err = _main(capsys, "sample", toy_run, "--n", "100000000000", "--out", str(tmp_path / "s"))
    _one_line(rc, err, "out of memory with --n 100000000000", "lower --n")


def test_sample_errors_do_not_suggest_train_only_flags(toy_run, tmp_path, capsys):
    state = torch.load(os.path.join(toy_run, "checkpoints", "ckpt_0000004.pt"), weights_only=True)
    state["config"]["model"] = "tiny"  # an image network for 2-D data: the checkpoint's own config is at fault
    bad = str(tmp_path / "bad.pt")
    torch.save(state, bad)
    line = _one_line(*_main(capsys, "sample", bad, "--out", str(tmp_path / "s"))[::2], bad, "needs an MLP model")
    assert "--model" not in line


def test_sample_of_a_folder_without_checkpoints_names_no_train_flag(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    rc, _, err = _main(capsys, "sample", str(tmp_path / "run"), "--out", str(tmp_path / "s"))
    line = _one_line(rc, err, f"checkpoint folder {tmp_path / 'run'}: no checkpoint")
    assert "--resume" not in line


def test_selftest_out_is_checked_before_the_checks_run(tmp_path, capsys, monkeypatch):
    import cld_fast.selftest

    monkeypatch.setattr(cld_fast.selftest, "run_selftest", lambda **k: pytest.fail("ran before --out was checked"))
    rc, _, err = _main(capsys, "selftest", "--out", str(tmp_path))
    _one_line(rc, err, f"--out {tmp_path} is a folder")
    (tmp_path / "f").write_text("x")
    rc, _, err = _main(capsys, "selftest", "--out", str(tmp_path / "f" / "t.md"))
    _one_line(rc, err, "--out")

