"""cf.build_sde: the SDE of every kind of config, the defaults written once, and the SDE's training options."""
import dataclasses
import types

import pytest

import cld_fast as cf
from cld_fast.config import TrainConfig, get_preset
from cld_fast.models import get_config
from cld_fast.sde import CLD_DEFAULTS, VPSDE_DEFAULTS
from cld_fast.sde_config import SDE_DEFAULTS, sde_settings

# The SDE block of the official configs/specific_cifar10.txt (nv-tlabs/CLD-SGM), written out here.
OFFICIAL_CIFAR10_SDE = dict(sde="cld", beta_type="linear", beta0=4.0, beta1=0.0, m_inv=4.0, gamma=0.04,
                            numerical_eps=1e-9, mixed_score=True, cld_objective="hsm")


def test_defaults_are_the_dataclass_defaults_and_the_official_cifar10_values():
    assert CLD_DEFAULTS == {f.name: f.default for f in dataclasses.fields(cf.CLD)}
    assert cf.CLD(**CLD_DEFAULTS) == cf.CLD() and cf.VPSDE(**VPSDE_DEFAULTS) == cf.VPSDE()
    assert SDE_DEFAULTS == OFFICIAL_CIFAR10_SDE
    assert {k: get_config("cifar10")[k] for k in OFFICIAL_CIFAR10_SDE} == OFFICIAL_CIFAR10_SDE
    cfg = TrainConfig()
    assert (cfg.beta0, cfg.beta1, cfg.m_inv, cfg.gamma, cfg.numerical_eps) == tuple(CLD_DEFAULTS.values())
    assert (cfg.vp_beta_min, cfg.vp_beta_max) == tuple(VPSDE_DEFAULTS.values())


def test_build_sde_from_every_config_kind():
    train = get_preset("toy", beta0=3.0, beta1=1.0, m_inv=2.0, gamma=0.1, numerical_eps=1e-6)
    want = cf.CLD(beta0=3.0, beta1=1.0, m_inv=2.0, gamma=0.1, numerical_eps=1e-6)
    assert cf.build_sde(train) == want and cf.build_sde(train.to_dict()) == want and train.build_sde() == want
    assert cf.build_sde(get_preset("toy-vpsde", vp_beta_max=10.0)) == cf.VPSDE(beta_max=10.0)
    assert cf.build_sde({"sde": "vpsde", "vp_beta_min": 0.5}) == cf.VPSDE(beta_min=0.5)
    official = {"beta0": "3.0", "beta1": 1.0, "m_inv": 2.0, "gamma": 0.1, "numerical_eps": 1e-6, "image_size": 8}
    assert cf.build_sde(official) == want
    assert cf.build_sde(types.SimpleNamespace(model=types.SimpleNamespace(image_size=8),
                                              sde=dict(official, image_size=8))) == want
    assert cf.build_sde("celebahq256") == cf.CLD(beta0=0.1, beta1=6.9, numerical_eps=1e-6)
    assert cf.build_sde() == cf.CLD() and cf.build_sde({}) == cf.CLD()
    assert cf.build_sde(want) is want
    assert cf.build_sde(official, beta0=5.0, gamma=None) == dataclasses.replace(want, beta0=5.0)


def test_build_sde_errors_name_the_key():
    with pytest.raises(ValueError, match="sde='subvp'"):
        cf.build_sde({"sde": "subvp"})
    with pytest.raises(NotImplementedError, match="beta_type"):
        cf.build_sde({"beta_type": "cosine"})
    with pytest.raises(ValueError, match="m_inv"):
        cf.build_sde({"m_inv": "heavy"})
    with pytest.raises(ValueError, match="beta0: not a setting of sde='vpsde'"):
        cf.build_sde({"sde": "vpsde"}, beta0=1.0)
    with pytest.raises(TypeError, match="unknown SDE setting"):
        cf.build_sde({}, beta2=1.0)
    with pytest.raises(TypeError, match="no overrides"):
        cf.build_sde(cf.CLD(), beta0=1.0)


def test_sources_say_where_each_setting_came_from():
    s = sde_settings({"beta0": 3.0, "model": {"gamma": 0.1}}, m_inv=2.0)
    assert s["sources"]["beta0"] == "config" and s["sources"]["gamma"] == "config"
    assert s["sources"]["m_inv"] == "argument" and s["sources"]["beta1"] == "default"
    assert s["from_config"] == ["beta0", "gamma"]


def test_a_top_level_objective_wins_over_a_model_dict():
    cfg = get_preset("toy", model=dict(get_config("toy2d"), cld_objective="hsm"), objective="dsm")
    assert sde_settings(cfg)["cld_objective"] == "dsm"


def test_training_options_come_from_the_sde():
    assert cf.CLD.weightings == ("reweightedv2", "likelihood", "reweightedv1")
    assert cf.VPSDE.weightings == ("reweightedv2", "likelihood") and cf.VPSDE.objectives == ("hsm",)
    with pytest.raises(ValueError, match="is one of the CLD options: sde 'vpsde' takes weighting"):
        get_preset("toy-vpsde", weighting="reweightedv1")
    with pytest.raises(ValueError, match="sample_method 'gddim' does not handle sde 'vpsde'"):
        get_preset("toy-vpsde", sample_method="gddim")
    with pytest.raises(ValueError, match="invalid training config: CLD.gamma"):
        get_preset("toy", gamma=-1.0)
