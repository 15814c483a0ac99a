"""Trainer: fused loss vs. an independent plain-torch reference, exact resume, NaN handling, EMA, VP-SDE, images."""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from cld_fast import checkpoint as ckpt
from cld_fast.config import TrainConfig, get_preset
from cld_fast.ema import ExponentialMovingAverage
from cld_fast.train import NonFiniteLossError, Trainer, resolve_precision, train


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one intra-op thread is fastest


def _toy(**kw):
    base = dict(steps=1, batch_size=64, precision="fp32", log_every=1, ckpt_every=0, quality_figure=False,
                eval_samples=64, eval_steps=5, sample_count=64, sample_steps=5)
    base.update(kw)
    return get_preset("toy", **base)


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


# ----------------------------------------------------------------------------------------------
# The reference HSM loss, written from the formulas of the spec (float64 coefficients, textbook form).
# ----------------------------------------------------------------------------------------------
def _reference_kernel(t, beta0=4.0, beta1=0.0, m_inv=4.0, gamma=0.04, num_eps=1e-9):
    t = t.double()
    g = math.sqrt(m_inv) / 2.0
    b = beta0 * t + 0.5 * beta1 * t * t
    c = torch.exp(-2.0 * g * b)
    m = torch.exp(-4.0 * g * b)
    s0x, s0v = 0.0, gamma / m_inv
    a_xx = c * (1.0 + 2.0 * g * b)
    a_vx = -c * b
    s_xx = m * (s0x + 1.0 / m - 1.0 + 4.0 * g * b * (s0x - 1.0) + 4.0 * g**2 * b**2 * (s0x - 2.0)
                + 16.0 * g**4 * b**2 * s0v) + num_eps
    s_xv = m * (-s0x * b + 4.0 * g**2 * b * s0v - 2.0 * g * b**2 * (s0x - 2.0) - 8.0 * g**3 * b**2 * s0v)
    Gamma = 2.0 / math.sqrt(m_inv)
    s_vv = m * (Gamma**2 * (1.0 / m - 1.0) / 4.0 + Gamma * b - 4.0 * g * b * s0v + 4.0 * g**2 * b**2 * s0v + s0v
                + b**2 * (s0x - 2.0)) + num_eps
    l11 = torch.sqrt(s_xx)
    l21 = s_xv / l11
    l22 = torch.sqrt(s_vv - l21**2)
    beta = beta0 + beta1 * t
    return a_xx, a_vx, l11, l21, l22, s_vv, beta, Gamma


def _reference_loss(weighting):
    def loss_fn(model, x0, gen):
        b, d = x0.shape
        # t ~ U(loss_eps, 1) drawn on the host in float64, as Trainer._host_times draws it
        t = (torch.rand(b, generator=gen, dtype=torch.float64) * (1.0 - 1e-5) + 1e-5).float()
        torch.randint(0, 2 ** 62, (1,), generator=gen)                # the Philox seed _host_times draws
        eps = torch.randn((b, 2, d), generator=gen)                  # (eps_x, eps_v), as perturb draws them
        a_xx, a_vx, l11, l21, l22, s_vv, beta, Gamma = _reference_kernel(t)
        col = lambda c: c[:, None]  # noqa: E731
        x0d, ex, ev = x0.double(), eps[:, 0].double(), eps[:, 1].double()
        x = col(a_xx) * x0d + col(l11) * ex
        v = col(a_vx) * x0d + col(l21) * ex + col(l22) * ev
        u = torch.cat([x, v], dim=1).float()
        out = model(u, t)
        vf = u[:, d:]
        if weighting in ("reweightedv2", "reweightedv1"):
            per = (out + vf * col(l22 / s_vv).float() - eps[:, 1]).pow(2).sum(1)
            if weighting == "reweightedv1":  # the official reweightedv1: times beta(t) Gamma
                per = per * (beta * Gamma).float()
        else:
            score = -vf / col(s_vv).float() - out / col(l22).float()
            per = (score + eps[:, 1] / col(l22).float()).pow(2).sum(1) * (beta * Gamma).float()
        return per.mean()

    return loss_fn


@pytest.mark.parametrize("weighting", ["reweightedv2", "likelihood", "reweightedv1"])
def test_fused_step_matches_plain_torch_reference(tmp_path, weighting):
    cfg = _toy(weighting=weighting, grad_clip=0.0)
    fused = Trainer(cfg, str(tmp_path / "fused"), progress=False, verbose=False)
    ref = Trainer(cfg, str(tmp_path / "ref"), progress=False, verbose=False, loss_fn=_reference_loss(weighting))
    for a, b in zip(fused.net.parameters(), ref.net.parameters()):
        assert torch.equal(a, b)
    before = _params(fused.net)
    lf = fused.train_step()
    lr = ref.train_step()
    torch.testing.assert_close(lf.detach().float(), lr.detach().float(), rtol=1e-5, atol=1e-6)
    # The gradients of the step agree to float32 rounding ...
    gscale = max(float(p.grad.abs().max()) for p in ref.net.parameters())
    for a, b in zip(fused.net.parameters(), ref.net.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6 * gscale)
    # ... and so do the parameters after the Adam step (Adam's first step is ~lr * sign(grad), so a
    # rounding-level difference of a near-zero gradient moves a weight by at most a tiny part of lr).
    moved = 0.0
    for p0, a, b in zip(before, fused.net.parameters(), ref.net.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-2 * cfg.lr)
        moved = max(moved, float((a.detach() - p0).abs().max()))
    assert moved > 0.5 * cfg.lr  # the step did move the weights


def test_dsm_objective_reaches_perturb_and_loss(tmp_path):
    """objective="dsm": the trainer's loss is the public DSM perturb + loss on the same draws (the DSM
    math itself is checked against the official formulas in test_official_parity.py)."""
    import cld_fast as cf
    from cld_fast.train import network_score

    tr = Trainer(_toy(objective="dsm"), str(tmp_path / "dsm"), progress=False, verbose=False)
    ref = Trainer(_toy(objective="dsm"), str(tmp_path / "ref"), progress=False, verbose=False)
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(3))
    got = tr.cld_loss(tr.net, x0, torch.Generator().manual_seed(4))
    t, _ = ref._host_times(64, x0.dtype)  # the same host time stream as tr's first call
    gen = torch.Generator().manual_seed(4)
    eps = torch.randn((64, 2, 2), generator=gen)
    u, noise = cf.perturb(x0, t, ref.sde, objective="dsm", eps=eps, generator=gen)
    with torch.no_grad():
        want = cf.hsm_loss(ref.net(u, t), u, t, ref.sde, noise, objective="dsm")
        u_h, noise_h = cf.perturb(x0, t, ref.sde, eps=eps)
        hsm = cf.hsm_loss(ref.net(u_h, t), u_h, t, ref.sde, noise_h)
    torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=0)
    assert abs(float(got.detach()) - float(hsm)) > 1e-3 * abs(float(hsm))
    assert torch.isfinite(tr.train_step())
    assert network_score(tr.net, tr.sde, tr.config).objective == "dsm"
    assert torch.isfinite(tr.sample(16, 5, "sscs", seed=0).x).all()


@pytest.mark.parametrize("name,cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                      ("adamax", torch.optim.Adamax)])
def test_optimizer_choice(tmp_path, name, cls):
    cfg = _toy(optimizer=name, weight_decay=0.01)
    tr = Trainer(cfg, str(tmp_path / name), progress=False, verbose=False)
    assert type(tr.optimizer) is cls
    before = _params(tr.net)
    tr.train_step()
    assert any(not torch.equal(p0, p) for p0, p in zip(before, tr.net.parameters()))


@pytest.mark.parametrize("kw,needle", [(dict(optimizer="sgd"), "optimizer"), (dict(objective="x"), "objective"),
                                       (dict(sde="vpsde", weighting="reweightedv1"), "CLD options"),
                                       (dict(sde="vpsde", objective="dsm"), "CLD options")])
def test_objective_weighting_optimizer_errors(kw, needle):
    with pytest.raises(ValueError, match=needle):
        _toy(**kw)


def test_loss_scale_matches_reference_with_bf16_autocast(tmp_path):
    """bf16 autocast on the CPU runs and stays close to fp32 (loss to ~1e-2)."""
    cfg = _toy(precision="bf16", batch_size=256)
    tr = Trainer(cfg, str(tmp_path / "bf16"), progress=False, verbose=False)
    assert tr.autocast_dtype == torch.bfloat16
    ref = Trainer(_toy(batch_size=256), str(tmp_path / "fp32"), progress=False, verbose=False)
    a, b = tr.evaluate_loss(2048, seed=1), ref.evaluate_loss(2048, seed=1)
    assert abs(a - b) / b < 2e-2
    loss = tr.train_step()
    assert torch.isfinite(loss)


def test_resume_is_bitwise_identical(tmp_path):
    # snapshots every 10 steps must not touch the training random streams
    cfg = _toy(steps=30, ckpt_every=10, log_every=5, keep_checkpoints=2, sample_steps=3, sample_every=10)
    full = Trainer(cfg, str(tmp_path / "full"), progress=False, verbose=False)
    full.run()
    part = Trainer(cfg.replace(steps=20), str(tmp_path / "part"), progress=False, verbose=False)
    part.run()
    resumed = Trainer(cfg, str(tmp_path / "part"), progress=False, verbose=False, resume="latest")
    assert resumed.step == 20
    resumed.run()
    for a, b in zip(full.net.parameters(), resumed.net.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(full.ema.shadow_params, resumed.ema.shadow_params):
        assert torch.equal(a, b)
    assert full.ema.num_updates == resumed.ema.num_updates == 30
    # keep-last-N of the interrupted run: checkpoints 20 and 30 remain
    names = [os.path.basename(p) for p in ckpt.list_checkpoints(str(tmp_path / "part" / "checkpoints"))]
    assert names == ["ckpt_0000020.pt", "ckpt_0000030.pt"]


def test_fresh_run_refuses_a_folder_with_checkpoints(tmp_path):
    cfg = _toy(steps=2)
    Trainer(cfg, str(tmp_path), progress=False, verbose=False).run()
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(cfg, str(tmp_path), progress=False, verbose=False)


class _NaNAt(nn.Module):
    """Wraps a network; from training forward call ``k`` (1-based) on, the output is NaN."""

    def __init__(self, inner, k):
        super().__init__()
        self.inner = inner
        self.k = k
        self.calls = 0

    def forward(self, u, t):
        out = self.inner(u, t)
        if self.training:
            self.calls += 1
            if self.calls >= self.k:
                out = out * float("nan")
        return out


@pytest.mark.parametrize("log_every", [5, 100])
def test_nan_stops_training_names_step_and_keeps_last_good_checkpoint(tmp_path, log_every):
    from cld_fast.models import build_model

    torch.manual_seed(0)
    model = _NaNAt(build_model("toy2d"), k=23)
    cfg = _toy(steps=60, log_every=log_every, ckpt_every=10, keep_checkpoints=5)
    with pytest.raises(NonFiniteLossError) as info:
        train(cfg, str(tmp_path), model=model, progress=False, verbose=False)
    err = info.value
    good = os.path.join(str(tmp_path), "checkpoints", "ckpt_0000020.pt")
    assert err.step == 23
    assert "step 23" in str(err)
    assert err.last_checkpoint == os.path.abspath(good)
    assert good in str(err)
    found = [os.path.basename(p) for p in ckpt.list_checkpoints(os.path.join(str(tmp_path), "checkpoints"))]
    assert found == ["ckpt_0000010.pt", "ckpt_0000020.pt"]  # nothing written after the NaN
    state = ckpt.load_checkpoint(good)
    assert state["step"] == 20
    assert all(bool(torch.isfinite(v).all()) for v in state["model"].values())
    assert all(bool(torch.isfinite(v).all()) for v in state["ema"]["shadow_params"])


def test_checkpoint_never_written_from_nonfinite_parameters(tmp_path):
    tr = Trainer(_toy(steps=5), str(tmp_path), progress=False, verbose=False)
    tr.train_step()
    good = tr.save_checkpoint()
    with torch.no_grad():
        next(tr.net.parameters())[0].fill_(float("inf"))
    tr.train_step()
    with pytest.raises(NonFiniteLossError, match="last good checkpoint is"):
        tr.save_checkpoint()
    assert ckpt.list_checkpoints(os.path.join(str(tmp_path), "checkpoints")) == [good]


def test_ema_official_decay_warmup():
    p = nn.Parameter(torch.zeros(3))
    ema = ExponentialMovingAverage([p], decay=0.9999)
    shadow = torch.zeros(3, dtype=torch.float64)
    for n in range(1, 30):
        with torch.no_grad():
            p.add_(1.0)
        ema.update([p])
        d = min(0.9999, (1 + n) / (10 + n))
        shadow = shadow - (1 - d) * (shadow - p.detach().double())
    torch.testing.assert_close(ema.shadow_params[0].double(), shadow, rtol=1e-6, atol=1e-6)
    assert ema.num_updates == 29
    state = ema.state_dict()
    assert set(state) == {"decay", "num_updates", "shadow_params"}
    other = ExponentialMovingAverage([nn.Parameter(torch.ones(3))], decay=0.5)
    other.load_state_dict(state)
    assert other.decay == 0.9999 and other.num_updates == 29
    target = nn.Linear(3, 1)
    with pytest.raises(ValueError):
        ExponentialMovingAverage([p]).copy_to(target)


def test_precision_resolution():
    assert resolve_precision("auto", torch.device("cpu")) == (None, False)
    assert resolve_precision("fp32", torch.device("cpu")) == (None, False)
    assert resolve_precision("bf16", torch.device("cpu")) == (torch.bfloat16, False)
    with pytest.raises(ValueError, match="CUDA"):
        resolve_precision("fp16", torch.device("cpu"))


def test_warmup_and_lr(tmp_path):
    tr = Trainer(_toy(warmup=10, lr=1e-3), str(tmp_path), progress=False, verbose=False)
    assert tr.learning_rate(0) == pytest.approx(1e-4)
    assert tr.learning_rate(9) == pytest.approx(1e-3)
    assert tr.learning_rate(500) == pytest.approx(1e-3)
    tr.train_step()
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
    assert tr.optimizer.defaults.get("foreach") or tr.optimizer.defaults.get("fused")


def test_no_host_sync_in_train_step_reads_loss_only_at_log(tmp_path, monkeypatch):
    """No .item() from cld_fast code inside train_step (the loss is read at log points only)."""
    tr = Trainer(_toy(steps=3), str(tmp_path), progress=False, verbose=False)
    calls = []
    orig = torch.Tensor.item

    def spy(self):
        import traceback

        caller = traceback.extract_stack()[-2].filename
        if os.sep + "cld_fast" + os.sep in caller:  # ours; torch's Adam reads its CPU step counters
            calls.append(caller)
        return orig(self)

    monkeypatch.setattr(torch.Tensor, "item", spy)
    for _ in range(3):
        tr.train_step()
    assert calls == []


def test_vpsde_baseline_trains(tmp_path):
    cfg = _toy(sde="vpsde", sample_method="em", steps=150, batch_size=128, data="gmm", log_every=50)
    tr = Trainer(cfg, str(tmp_path), progress=False, verbose=False)
    before = tr.evaluate_loss(4096, seed=3)
    res = tr.run()
    after = tr.evaluate_loss(4096, seed=3)
    assert after < before
    assert res.energy_distance is not None and math.isfinite(res.energy_distance)


def test_toy_run_writes_plots_metrics_and_evaluation(tmp_path):
    cfg = _toy(steps=40, log_every=10, ckpt_every=20, quality_figure=True, eval_samples=200, eval_steps=10)
    res = train(cfg, str(tmp_path), progress=False, verbose=False)
    for p in (res.checkpoint, res.metrics, res.samples_plot, res.samples_npz, res.quality_plot):
        assert p and os.path.isfile(p), p
    lines = open(res.metrics).read().splitlines()
    import json

    recs = [json.loads(line) for line in lines]
    assert [r["step"] for r in recs if "loss" in r] == [10, 20, 30, 40]
    assert all({"loss", "lr", "samples_per_s", "time"} <= set(r) for r in recs if "loss" in r)
    assert "energy_distance" in recs[-1]["eval"]
    z = np.load(res.samples_npz)
    assert z["x"].shape == (200, 2) and z["v"].shape == (200, 2)


def test_image_training_tiny_ncsnpp_channels_last(tmp_path):
    """A couple of steps of the NCSN++ trainer path (uint8 images from an .npz, centring, flips, channels_last)."""
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(16, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "imgs.npz"
    np.savez(path, images=imgs)
    cfg = TrainConfig(data="npz", data_path=str(path), model="tiny", steps=2, batch_size=4, lr=2e-4, warmup=2,
                      precision="fp32", log_every=1, ckpt_every=0, sample_count=4, sample_steps=2,
                      quality_figure=False)
    res = train(cfg, str(tmp_path / "run"), progress=False, verbose=False)
    assert res.step == 2 and math.isfinite(res.loss)
    assert os.path.isfile(res.samples_plot)
    state = ckpt.load_checkpoint(res.checkpoint)
    assert state["data_shape"] == [3, 8, 8]


def test_recommend_sampler_picks_the_cheapest_within_reach():
    from cld_fast.train import recommend_sampler

    curves = {"sscs": [(5, 0.003), (10, 0.004), (20, 0.0011), (50, 0.0010)], "em": [(10, 0.05), (50, 0.002)],
              "gddim": [(10, 0.0013), (20, 0.0009)]}
    rec = recommend_sampler(curves, floor=1e-5)
    assert (rec["method"], rec["steps"]) == ("gddim", 10)  # 0.0013 <= 0.0009 + 0.00045
    assert rec["best"] == {"method": "gddim", "steps": 20, "energy_distance": 0.0009}
    noisy = recommend_sampler(curves, floor=0.002)  # a noisy estimate: anything within 0.0049 is as good
    assert (noisy["method"], noisy["steps"]) == ("sscs", 5)
    with pytest.raises(ValueError, match="at least one"):
        recommend_sampler({}, floor=0.0)


def test_loss_and_evaluation_samplers_come_from_the_sde(tmp_path):
    from cld_fast.samplers import sampler_names

    tr = Trainer(_toy(sde="vpsde", sample_method="em"), str(tmp_path / "vp"), progress=False, verbose=False)
    assert tr.loss_fn == tr.vp_loss
    tr.close()
    cfg = _toy(steps=2, quality_figure=True, eval_samples=50, eval_steps=10, sample_method="em")
    tr = Trainer(cfg, str(tmp_path / "cld"), progress=False, verbose=False)
    assert tr.loss_fn == tr.cld_loss
    try:
        res = tr.run()
    finally:
        tr.close()
    ev = res.extra["eval"]
    assert ev["method"] == "em" and set(ev["curves"]) == set(sampler_names(tr.sde, fixed_steps=True))
    assert [s for s, _ in ev["curves"]["em"]] == [10, 20, 50, 100, 200]
    assert dict(ev["curves"]["em"])[10] == ev["energy_distance"]


def test_metrics_file_is_never_written_through_a_symlink(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(str(notes), str(run / "metrics.jsonl"))
    with pytest.raises(ValueError, match=r"metrics\.jsonl is a symbolic link"):
        train(_toy(steps=2), str(run), progress=False, verbose=False)
    assert notes.read_text() == "precious\n"


def test_metrics_write_errors_name_the_file(tmp_path):
    import errno

    from cld_fast.train import _MetricsWriter

    path = str(tmp_path / "metrics.jsonl")
    w = _MetricsWriter(path)

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")  # as a file object raises it: no path

        def close(self):
            pass

    w._f = Full()
    with pytest.raises(OSError) as info:
        w.write({"step": 1})
    assert info.value.errno == errno.ENOSPC and info.value.filename == path


def test_a_failed_setup_leaves_no_empty_run_folder(tmp_path):
    run = tmp_path / "new_run"
    with pytest.raises(ValueError, match="fp16"):
        train(_toy(steps=2, precision="fp16", device="cpu"), str(run), progress=False, verbose=False)
    assert not run.exists()
    keep = tmp_path / "existing"
    keep.mkdir()
    with pytest.raises(ValueError, match="fp16"):
        train(_toy(steps=2, precision="fp16", device="cpu"), str(keep), progress=False, verbose=False)
    assert keep.exists()  # a folder the user made is left alone


def test_resume_with_steps_below_the_checkpoint_is_refused(tmp_path):
    run = str(tmp_path / "run")
    train(_toy(steps=3, ckpt_every=0), run, progress=False, verbose=False)
    with pytest.raises(ValueError, match=r"--steps 2 is below .*step 3"):
        train(_toy(steps=2, ckpt_every=0), run, resume="latest", progress=False, verbose=False)
    assert train(_toy(steps=3, ckpt_every=0), run, resume="latest", progress=False, verbose=False).step == 3
