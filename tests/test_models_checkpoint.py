"""load_official_checkpoint: reproduces the official network's outputs and rejects corrupt checkpoints.

The fixture checkpoint was written by the official CLD-SGM classes (random weights, 16x16 NCSN++);
``official_small_io.pt`` holds the official outputs for raw weights (``out_model``) and for EMA
weights (``out_ema``). Relative error: max|ours - official| / max|official|.
"""
import json
from pathlib import Path

import pytest
import torch

from cld_fast.models import NCSNpp, load_official_checkpoint

FIX = Path(__file__).parent / "fixtures" / "official_cld_sgm"
CKPT = FIX / "official_small_checkpoint.pth"


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def config():
    return json.loads((FIX / "official_small_config.json").read_text())


@pytest.fixture(scope="module")
def io():
    return torch.load(FIX / "official_small_io.pt", weights_only=True)


@pytest.fixture()
def ckpt():
    return torch.load(CKPT, weights_only=True)


@pytest.mark.parametrize("use_ema,key", [(False, "out_model"), (True, "out_ema")])
def test_reproduces_official_outputs(config, io, use_ema, key):
    net = load_official_checkpoint(CKPT, config=config, use_ema=use_ema)
    assert isinstance(net, NCSNpp) and not net.training
    assert io["u"].shape == (3, 6, 16, 16) and io["t"].shape == (3,)
    with torch.no_grad():
        out = net(io["u"], io["t"])
    assert out.shape == io[key].shape == (3, 3, 16, 16)
    assert rel(out, io[key]) < 1e-5


def test_ema_differs_from_raw_and_is_copied_in_parameter_order(config, io, ckpt):
    assert rel(io["out_model"], io["out_ema"]) > 1e-3  # the fixture distinguishes the two
    net = load_official_checkpoint(CKPT, config=config, use_ema=True)
    trainable = [p for p in net.parameters() if p.requires_grad]
    shadow = ckpt["ema"]["shadow_params"]
    assert len(trainable) == len(shadow)
    assert all(torch.equal(p, s) for p, s in zip(trainable, shadow))
    # The frozen Fourier W comes from the model state_dict.
    assert torch.equal(net.all_modules[0].W, ckpt["model"]["module.all_modules.0.W"])


def test_state_dict_keys_are_official(config, ckpt):
    net = load_official_checkpoint(CKPT, config=config, use_ema=False)
    assert list(net.state_dict()) == [k[len("module."):] for k in ckpt["model"]]


def test_plain_state_dict_with_and_without_prefix(config, io, ckpt, tmp_path):
    plain = {k[len("module."):]: v for k, v in ckpt["model"].items()}
    torch.save(plain, tmp_path / "plain.pth")
    torch.save(ckpt["model"], tmp_path / "prefixed.pth")
    for name in ("plain.pth", "prefixed.pth"):
        net = load_official_checkpoint(tmp_path / name, config=config)
        with torch.no_grad():
            assert rel(net(io["u"], io["t"]), io["out_model"]) < 1e-5
    # Already-loaded dicts are accepted too.
    net = load_official_checkpoint(ckpt, config=config, use_ema=True)
    with torch.no_grad():
        assert rel(net(io["u"], io["t"]), io["out_ema"]) < 1e-5


def _save(obj, tmp_path, name="bad.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_missing_key_raises(config, ckpt, tmp_path):
    del ckpt["model"]["module.all_modules.4.Conv_1.weight"]
    with pytest.raises(ValueError, match=r"missing keys.*all_modules\.4\.Conv_1\.weight"):
        load_official_checkpoint(_save(ckpt, tmp_path), config=config, use_ema=False)


def test_unexpected_key_raises(config, ckpt, tmp_path):
    ckpt["model"]["module.all_modules.4.extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"unexpected keys.*all_modules\.4\.extra\.weight"):
        load_official_checkpoint(_save(ckpt, tmp_path), config=config, use_ema=True)


def test_wrong_shape_raises(config, ckpt, tmp_path):
    ckpt["model"]["module.all_modules.3.weight"] = torch.zeros(16, 3, 3, 3)
    with pytest.raises(ValueError, match=r"wrong shapes.*all_modules\.3\.weight.*\(16, 3, 3, 3\).*\(16, 6, 3, 3\)"):
        load_official_checkpoint(_save(ckpt, tmp_path), config=config, use_ema=False)


def test_wrong_number_of_ema_tensors_raises(config, ckpt, tmp_path):
    ckpt["ema"]["shadow_params"] = ckpt["ema"]["shadow_params"][:-1]
    with pytest.raises(ValueError, match=r"wrong number of EMA shadow params.*291.*292"):
        load_official_checkpoint(_save(ckpt, tmp_path), config=config, use_ema=True)
    # Irrelevant when the EMA weights are not requested.
    load_official_checkpoint(_save(ckpt, tmp_path, "ok.pth"), config=config, use_ema=False)


def test_wrong_ema_shape_raises(config, ckpt, tmp_path):
    sp = ckpt["ema"]["shadow_params"]
    sp[0], sp[1] = sp[1], sp[0]  # swapped order: shapes do not line up
    with pytest.raises(ValueError, match=r"EMA shadow params.*#0 \(all_modules\.1\.weight\)"):
        load_official_checkpoint(_save(ckpt, tmp_path), config=config, use_ema=True)


def test_no_ema_entry_with_use_ema_raises(config, ckpt, tmp_path):
    del ckpt["ema"]
    with pytest.raises(ValueError, match="no 'ema' entry"):
        load_official_checkpoint(_save(ckpt, tmp_path), config=config, use_ema=True)


def test_config_mismatch_raises_and_lists_few_keys(ckpt, tmp_path):
    with pytest.raises(ValueError) as err:
        load_official_checkpoint(CKPT, config="tiny")
    msg = str(err.value)
    assert "missing keys" in msg and "unexpected keys" in msg and "more" in msg
    assert len(msg) < 3000


def test_not_a_checkpoint_raises(config, tmp_path):
    with pytest.raises(ValueError, match="neither"):
        load_official_checkpoint(_save({"step": 3, "foo": "bar"}, tmp_path), config=config)


def test_no_partial_load_on_error(config, ckpt, monkeypatch, tmp_path):
    # Validation happens before any weight is written: load_state_dict is never reached.
    called = []
    orig = torch.nn.Module.load_state_dict
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", lambda *a, **k: called.append(1) or orig(*a, **k))
    del ckpt["model"]["module.all_modules.1.bias"]
    with pytest.raises(ValueError):
        load_official_checkpoint(_save(ckpt, tmp_path), config=config, use_ema=False)
    assert not called


# --- progressive_input='input_skip': the official Combine layer names its 1x1 conv ``Conv_0`` ---------
def _input_skip_net(seed=0):
    from cld_fast.models import build_model, get_config

    cfg = dict(get_config("tiny"), progressive="output_skip", progressive_input="input_skip", ch_mult="1,2,2")
    torch.manual_seed(seed)
    return cfg, build_model(cfg).eval()


def _combine_indices(net):
    from cld_fast.models.layers import Combine

    return [i for i, m in enumerate(net.all_modules) if isinstance(m, Combine)]


def _official_input_skip_checkpoint(net):
    """Official format with the official key names: ``module.all_modules.<i>.Conv_0.{weight,bias}``."""
    combine = set(_combine_indices(net))
    sd = {}
    for k, v in net.state_dict().items():
        parts = k.split(".")
        if parts[0] == "all_modules" and int(parts[1]) in combine and parts[2] in ("Conv", "Conv_0"):
            k = ".".join(parts[:2] + ["Conv_0"] + parts[3:])
        sd["module." + k] = v.clone()
    shadow = [p.detach().clone() + 0.01 for p in net.parameters() if p.requires_grad]
    return {"model": sd, "ema": {"decay": 0.9999, "num_updates": 3, "shadow_params": shadow}, "step": 3}


def test_input_skip_checkpoint_with_official_combine_keys_loads():
    cfg, net = _input_skip_net()
    idx = _combine_indices(net)
    assert len(idx) == 2  # one Combine per downsampling
    ckpt = _official_input_skip_checkpoint(net)
    for i in idx:
        assert f"module.all_modules.{i}.Conv_0.weight" in ckpt["model"]
        assert f"module.all_modules.{i}.Conv_0.bias" in ckpt["model"]
    loaded = load_official_checkpoint(ckpt, config=cfg, use_ema=False)
    g = torch.Generator().manual_seed(5)
    u, t = torch.randn(2, 6, 8, 8, generator=g), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        assert torch.equal(loaded(u, t), net(u, t))
    for i in idx:
        assert torch.equal(loaded.all_modules[i].Conv_0.weight, net.all_modules[i].Conv_0.weight)
    ema = load_official_checkpoint(ckpt, config=cfg, use_ema=True)
    for i in idx:  # EMA tensors are in parameters() order; the rename must not shift them
        assert torch.equal(ema.all_modules[i].Conv_0.weight, net.all_modules[i].Conv_0.weight + 0.01)


def test_legacy_combine_conv_keys_still_load():
    cfg, net = _input_skip_net()
    legacy = {}
    for k, v in net.state_dict().items():
        parts = k.split(".")
        if parts[0] == "all_modules" and int(parts[1]) in _combine_indices(net) and parts[2] == "Conv_0":
            k = ".".join(parts[:2] + ["Conv"] + parts[3:])
        legacy[k] = v.clone()
    assert any(".Conv.weight" in k for k in legacy)
    _, fresh = _input_skip_net(seed=1)
    fresh.load_state_dict(legacy, strict=True)  # cld_fast training checkpoints from before the rename
    loaded = load_official_checkpoint(legacy, config=cfg)
    u, t = torch.randn(1, 6, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([0.5])
    with torch.no_grad():
        assert torch.equal(fresh(u, t), net(u, t)) and torch.equal(loaded(u, t), net(u, t))


# ---- non-finite weights and JSON configs -------------------------------------------------------------


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


def test_load_official_checkpoint_accepts_a_json_config_path(tmp_path):
    from cld_fast.models import load_official_checkpoint

    path = str(FIX / "official_small_checkpoint.pth")
    cfg_path = str(FIX / "official_small_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    a = load_official_checkpoint(path, config=cfg)
    b = load_official_checkpoint(path, config=cfg_path)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        load_official_checkpoint(path, config=str(tmp_path / "bad.json"))
