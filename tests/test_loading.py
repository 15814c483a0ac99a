"""cf.load_score_model: our checkpoints, run folders, official checkpoints and networks in memory.

Each source kind is checked against a reference assembled here from the primitive APIs (torch.load,
build_model, the EMA shadow parameters, load_official_checkpoint, cf.score_fn, cf.sample): the
loaded model must give bitwise the same samples for the same seed, and so must the three paths
built on it (``cld-fast sample``, ``cf.from_official``, ``cld_fast.train.load_for_sampling``).
"""
import json
import os
import types

import numpy as np
import pytest
import torch

import cld_fast as cf
from cld_fast import checkpoint as ckpt
from cld_fast.cli import main
from cld_fast.config import TrainConfig, get_preset
from cld_fast.models import build_model, get_config, load_official_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "official_cld_sgm")
OFFICIAL_CKPT = os.path.join(FIXTURES, "official_small_checkpoint.pth")
OFFICIAL_CONFIG = os.path.join(FIXTURES, "official_small_config.json")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 3-step toy run (CLD, DSM objective, beta1 != 0) with checkpoints at steps 2 and 3."""
    from cld_fast.train import train

    out = str(tmp_path_factory.mktemp("run"))
    cfg = get_preset("toy", steps=3, batch_size=64, precision="fp32", log_every=1, ckpt_every=2, quality_figure=False,
                     eval_samples=32, eval_steps=3, sample_count=32, sample_steps=3, objective="dsm", beta1=2.0,
                     numerical_eps=1e-6)
    train(cfg, out, progress=False, verbose=False)
    return out


def _newest(run_dir):
    return ckpt.latest_checkpoint(os.path.join(run_dir, "checkpoints"))


def _reference_ours(path, use_ema=True):
    """(score_fn, sde, data shape) of our checkpoint, from the primitive APIs."""
    state = torch.load(path, weights_only=True)
    config = state["config"]
    torch.manual_seed(123)
    net = build_model({**get_config(config["model"]), "data_dim": state["data_shape"][0], "sde": "cld"})
    net.load_state_dict(state["model"])
    if use_ema:
        trainable = [p for p in net.parameters() if p.requires_grad]
        with torch.no_grad():
            for p, s in zip(trainable, state["ema"]["shadow_params"]):
                p.copy_(s)
    sde = cf.CLD(beta0=config["beta0"], beta1=config["beta1"], m_inv=config["m_inv"], gamma=config["gamma"],
                 numerical_eps=config["numerical_eps"])
    return cf.score_fn(net.eval(), sde, objective=config["objective"]), sde, tuple(state["data_shape"])


def _draw(score, sde, shape, n=50, steps=4, seed=7, method="sscs"):
    return cf.sample(score, (n,) + tuple(shape), sde, steps=steps, method=method,
                     generator=torch.Generator().manual_seed(seed), device="cpu")


def _same(a, b):
    assert torch.equal(a.x, b.x) and (a.v is None and b.v is None or torch.equal(a.v, b.v)) and a.nfe == b.nfe


@pytest.fixture
def count_loads(monkeypatch):
    """Counts torch.load calls (the checkpoint must be opened once)."""
    calls = []
    real = torch.load

    def counting(*args, **kwargs):
        calls.append(args[0] if args else kwargs.get("f"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", counting)
    return calls


# ------------------------------------------------------------------------------------------------
# our checkpoints
# ------------------------------------------------------------------------------------------------
def test_our_checkpoint_file_matches_the_reference_and_opens_once(run_dir, count_loads):
    path = _newest(run_dir)
    m = cf.load_score_model(path)
    assert len(count_loads) == 1
    score, sde, shape = _reference_ours(path)
    assert (m.kind, m.path, m.sde, m.data_shape) == ("cld_fast", path, sde, shape)
    assert m.sde == cf.CLD(beta1=2.0, numerical_eps=1e-6)
    assert m.objective == "dsm" and m.mixed and isinstance(m.config, TrainConfig)
    assert set(m.sources.values()) == {"checkpoint"} and {"beta1", "cld_objective", "data_shape"} <= set(m.sources)
    assert not m.network.training
    _same(_draw(m.score_fn, m.sde, m.data_shape), _draw(score, sde, shape))


def test_our_run_folder_and_loaded_dict_and_raw_weights(run_dir):
    path = _newest(run_dir)
    assert path.endswith("ckpt_0000003.pt")
    ref = _draw(*_reference_ours(path))
    m = cf.load_score_model(run_dir)
    assert m.path == path and m.step == 3
    _same(_draw(m.score_fn, m.sde, m.data_shape), ref)
    m = cf.load_score_model(torch.load(path, weights_only=True))
    assert m.path is None
    _same(_draw(m.score_fn, m.sde, m.data_shape), ref)
    raw = cf.load_score_model(path, use_ema=False)
    _same(_draw(raw.score_fn, raw.sde, raw.data_shape), _draw(*_reference_ours(path, use_ema=False)))
    assert not torch.equal(_draw(raw.score_fn, raw.sde, raw.data_shape).x, ref.x)


def test_load_for_sampling_is_the_same_model(run_dir, count_loads):
    from cld_fast.train import load_for_sampling

    path = _newest(run_dir)
    net, sde, config, shape = load_for_sampling(path)
    assert len(count_loads) == 1
    assert isinstance(config, TrainConfig) and config.objective == "dsm" and shape == (2,)
    score, ref_sde, _ = _reference_ours(path)
    _same(_draw(cf.score_fn(net, sde, objective="dsm"), sde, shape), _draw(score, ref_sde, shape))
    with pytest.raises(ckpt.CheckpointError, match="not a cld_fast training checkpoint"):
        load_for_sampling(OFFICIAL_CKPT)


def test_cli_sample_of_our_checkpoint_opens_it_once_and_matches(run_dir, tmp_path, capsys, count_loads):
    path = _newest(run_dir)
    assert main(["sample", path, "--steps", "4", "--n", "50", "--seed", "7", "--device", "cpu",
                 "--out", str(tmp_path)]) == 0
    assert count_loads.count(path) == 1
    assert "(from the checkpoint)" in capsys.readouterr().out
    z = np.load(tmp_path / "samples_sscs_4.npz")
    ref = cf.sample(*_reference_ours(path)[:1], (50, 2), _reference_ours(path)[1], steps=4, method="sscs",
                    generator=torch.Generator("cpu").manual_seed(7), device="cpu")
    assert np.array_equal(z["x"], ref.x.numpy()) and np.array_equal(z["v"], ref.v.numpy())


def test_our_checkpoint_refuses_a_config_and_sde_overrides(run_dir, capsys):
    path = _newest(run_dir)
    with pytest.raises(ValueError, match="carries its own config"):
        cf.load_score_model(path, config="toy2d")
    with pytest.raises(ValueError, match="beta0"):
        cf.load_score_model(path, overrides={"beta0": 3.0})
    assert main(["sample", path, "--beta0", "3", "--n", "2", "--steps", "2", "--device", "cpu"]) == 2
    assert "--beta0: only for official CLD-SGM checkpoints" in capsys.readouterr().err
    with pytest.raises(ckpt.CheckpointError, match="not an official"):
        cf.load_score_model(path, kind="official")


def test_our_checkpoint_without_a_data_shape_is_refused(run_dir, tmp_path):
    state = torch.load(_newest(run_dir), weights_only=True)
    del state["data_shape"]
    with pytest.raises(ckpt.CheckpointError, match="data_shape"):
        cf.load_score_model(state)


# ------------------------------------------------------------------------------------------------
# official checkpoints
# ------------------------------------------------------------------------------------------------
def _reference_official(config, use_ema=True, sde=None):
    net = load_official_checkpoint(OFFICIAL_CKPT, config=config, use_ema=use_ema)
    sde = sde or cf.CLD()
    return cf.score_fn(net, sde), sde, (3, 16, 16)


def test_official_checkpoint_with_a_json_config(count_loads):
    m = cf.load_score_model(OFFICIAL_CKPT, config=OFFICIAL_CONFIG)
    assert count_loads.count(OFFICIAL_CKPT) == 1 and len(count_loads) == 1
    assert (m.kind, m.sde, m.data_shape, m.mixed, m.objective) == ("official", cf.CLD(), (3, 16, 16), True, "hsm")
    assert m.sources["beta0"] == "default" and m.sources["data_shape"] == "config"
    assert m.config["image_size"] == 16
    _same(_draw(m.score_fn, m.sde, m.data_shape, n=2, steps=3),
          _draw(*_reference_official(OFFICIAL_CONFIG), n=2, steps=3))


def test_official_checkpoint_config_forms_and_overrides():
    cfg = json.load(open(OFFICIAL_CONFIG))
    grouped = types.SimpleNamespace(model=types.SimpleNamespace(**cfg), sde={"beta0": 3.0, "beta1": 1.0})
    m = cf.load_score_model(OFFICIAL_CKPT, config=grouped, overrides={"numerical_eps": 1e-6, "gamma": None},
                            use_ema=False)
    assert m.sde == cf.CLD(beta0=3.0, beta1=1.0, numerical_eps=1e-6)
    assert (m.sources["beta0"], m.sources["numerical_eps"], m.sources["gamma"]) == ("config", "argument", "default")
    _same(_draw(m.score_fn, m.sde, m.data_shape, n=2, steps=3),
          _draw(*_reference_official(cfg, use_ema=False, sde=m.sde), n=2, steps=3))
    with pytest.raises(NotImplementedError, match="sde"):
        cf.load_score_model(OFFICIAL_CKPT, config={**cfg, "sde": "vpsde"})
    with pytest.raises(ckpt.CheckpointError, match="not a cld_fast training checkpoint"):
        cf.load_score_model(OFFICIAL_CKPT, config=cfg, kind="cld_fast")


def test_cli_sample_of_an_official_checkpoint_opens_it_once_and_matches(tmp_path, capsys, count_loads):
    assert main(["sample", OFFICIAL_CKPT, "--config", OFFICIAL_CONFIG, "--steps", "3", "--n", "2", "--seed", "7",
                 "--method", "em", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert count_loads.count(OFFICIAL_CKPT) == 1
    out = capsys.readouterr().out
    assert "other values: the official CIFAR-10 defaults" in out and "from --config" not in out
    z = np.load(tmp_path / "samples_em_3.npz")
    score, sde, shape = _reference_official(OFFICIAL_CONFIG)
    ref = cf.sample(score, (2,) + shape, sde, steps=3, method="em", generator=torch.Generator("cpu").manual_seed(7),
                    device="cpu")
    assert np.array_equal(z["x"], ref.x.numpy()) and np.array_equal(z["v"], ref.v.numpy())


def test_from_official_with_a_checkpoint_opens_it_once_and_matches(count_loads):
    cfg = {**json.load(open(OFFICIAL_CONFIG)), "sampling_method": "sscs", "n_discrete_steps": 3,
           "striding": "quadratic", "sampling_batch_size": 2, "beta1": 1.0}
    run = cf.from_official(cfg, OFFICIAL_CKPT)
    assert count_loads.count(OFFICIAL_CKPT) == 1
    assert run.sources["beta1"] == "config" and run.sources["striding"] == "config"
    score, sde, shape = _reference_official(OFFICIAL_CONFIG, sde=cf.CLD(beta1=1.0))
    ref = cf.sample(score, (2,) + shape, sde, steps=3, method="sscs", striding="quadratic",
                    generator=torch.Generator().manual_seed(5), sscs_official_half_steps=True)
    _same(run.sample(generator=torch.Generator().manual_seed(5)), ref)


# ------------------------------------------------------------------------------------------------
# networks in memory
# ------------------------------------------------------------------------------------------------
def test_module_with_each_config_kind():
    flat = {**get_config("toy2d"), "is_image": False, "beta0": 3.0}
    torch.manual_seed(0)
    net = build_model(flat)
    m = cf.load_score_model(torch.nn.DataParallel(net), config=flat)
    assert m.network is net and not net.training and m.kind == "module" and m.path is None
    assert (m.sde, m.data_shape, m.sources["data_shape"]) == (cf.CLD(beta0=3.0, numerical_eps=1e-6), (2,), "config")
    _same(_draw(m.score_fn, m.sde, m.data_shape), _draw(cf.score_fn(net, m.sde), m.sde, (2,)))

    m = cf.load_score_model(net, config=cf.CLD(gamma=0.1))
    assert m.sde == cf.CLD(gamma=0.1) and m.data_shape is None and m.objective == "hsm"
    m = cf.load_score_model(net, config=get_preset("toy", objective="dsm", m_inv=2.0))
    assert m.sde == cf.CLD(m_inv=2.0) and m.objective == "dsm" and m.data_shape is None
    vp = cf.load_score_model(lambda u, t: u, config=get_preset("toy-vpsde"))
    assert vp.sde == cf.VPSDE() and vp.kind == "module"
    with pytest.raises(TypeError, match="config is required"):
        cf.load_score_model(net)


def test_bad_sources_are_clear(tmp_path):
    with pytest.raises(TypeError, match="src must be"):
        cf.load_score_model(42)
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        cf.load_score_model(str(tmp_path / "missing.pt"))
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint"):
        cf.load_score_model(str(tmp_path))
    with pytest.raises(ValueError, match="kind must be"):
        cf.load_score_model(OFFICIAL_CKPT, kind="other")
