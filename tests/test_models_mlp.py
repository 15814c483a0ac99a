"""The toy-data MLP of cld_fast.models (official CLD-SGM ``models/mlp.py``)."""
import pytest
import torch
import torch.nn.functional as F

from cld_fast.models import MLP, build_model, get_config, load_official_checkpoint


def test_forward_shape_and_dtype():
    torch.manual_seed(100)  # this test draws from the global RNG
    net = build_model("toy2d")
    assert isinstance(net, MLP)
    out = net(torch.randn(7, 4), torch.rand(7))
    assert out.shape == (7, 2) and out.dtype == torch.float32
    assert net(torch.randn(5, 4), torch.tensor(0.5)).shape == (5, 2)
    with pytest.raises(ValueError):
        net(torch.randn(5, 2), torch.rand(5))


def test_parameter_names_and_shapes_are_official():
    torch.manual_seed(101)  # this test draws from the global RNG
    net = build_model("toy2d")
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes == {
        "main.0.weight": (128, 5), "main.0.bias": (128,),
        "main.2.weight": (128, 128), "main.2.bias": (128,),
        "main.4.weight": (128, 128), "main.4.bias": (128,),
        "main.6.weight": (128, 128), "main.6.bias": (128,),
        "main.8.weight": (2, 128), "main.8.bias": (2,),
    }
    assert list(shapes) == [n for n, _ in net.named_parameters()]


def test_time_enters_raw_not_log():
    # Official MLP: main(cat([u, t.reshape(-1, 1)], 1)) with the raw forward time.
    torch.manual_seed(0)
    net = build_model("toy2d")
    u, t = torch.randn(6, 4), torch.rand(6)
    h = torch.cat([u, t[:, None]], 1)
    for i, layer in enumerate(net.main):
        h = layer(h)
    assert torch.allclose(net(u, t), h)
    lin0 = net.main[0]
    first = F.linear(torch.cat([u, t[:, None]], 1), lin0.weight, lin0.bias)
    assert torch.allclose(net.main[0](torch.cat([u, t[:, None]], 1)), first)


def test_non_cld_takes_x_only():
    torch.manual_seed(102)  # this test draws from the global RNG
    net = MLP({"sde": "vpsde"})
    assert net.main[0].in_features == 3
    assert net(torch.randn(3, 2), torch.rand(3)).shape == (3, 2)


def test_load_official_format_with_ema(tmp_path):
    torch.manual_seed(1)
    src = build_model("toy2d")
    shadow = [p.detach() + 1.0 for p in src.parameters()]
    ckpt = {"model": {"module." + k: v for k, v in src.state_dict().items()},
            "ema": {"decay": 0.999, "num_updates": 3, "shadow_params": shadow}, "step": 3}
    torch.save(ckpt, tmp_path / "toy.pth")
    raw = load_official_checkpoint(tmp_path / "toy.pth", config="toy2d", use_ema=False)
    ema = load_official_checkpoint(tmp_path / "toy.pth", config=get_config("toy2d"), use_ema=True)
    assert not raw.training and not ema.training
    for p, q in zip(raw.parameters(), src.parameters()):
        assert torch.equal(p, q)
    for p, s in zip(ema.parameters(), shadow):
        assert torch.equal(p, s)
