"""cf.score_fn: the official model(u, t) convention wrapped into a score function."""
import pytest
import torch

import cld_fast as cf
from cld_fast.score import NetworkScore
from dataclasses import dataclass


class Model(torch.nn.Module):
    """out = MLP(u, t), with a dropout layer so eval mode is observable."""

    def __init__(self, d=2, augmented=True, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        k = 2 * d if augmented else d
        self.net = torch.nn.Sequential(torch.nn.Linear(k + 1, 32), torch.nn.SiLU(), torch.nn.Dropout(0.5),
                                       torch.nn.Linear(32, d)).to(dtype)
        self.seen = []

    def forward(self, u, t):
        self.seen.append((u.dtype, t.dtype, self.training, torch.is_grad_enabled()))
        return self.net(torch.cat([u, t[:, None]], 1).to(self.net[0].weight.dtype))


@pytest.fixture
def sde():
    return cf.CLD()


def _inputs(b=16, d=2, augmented=True, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(b, (2 if augmented else 1) * d, generator=gen, dtype=dtype)
    t = torch.rand(b, generator=gen, dtype=dtype) * 0.9 + 0.05
    return u, t


def test_mixed_score_formula(sde):
    model = Model().train()
    s = cf.score_fn(model, sde)
    assert isinstance(s, NetworkScore) and s.model is model and s.sde is sde and s.mixed
    u, t = _inputs()
    score = s(u, t)
    assert not model.training  # the wrapper switches to eval mode
    assert model.seen[-1] == (torch.float32, torch.float32, False, False)
    out = s.raw(u, t)
    k = sde.perturbation_kernel(t, "hsm")
    v = u[:, 2:].double()
    expect = -v / k.s_vv[:, None] - out.double() / k.l22[:, None]
    torch.testing.assert_close(score.double(), expect, rtol=1e-5, atol=1e-5)
    assert not score.requires_grad


def test_unmixed_is_the_output(sde):
    model = Model().eval()
    s = cf.score_fn(model, sde, mixed=False)
    u, t = _inputs()
    with torch.no_grad():
        expect = model(u, t)
    torch.testing.assert_close(s(u, t), expect)


def test_output_cast_to_float32_and_float64_inputs(sde):
    model = Model(dtype=torch.float64).eval()
    s = cf.score_fn(model, sde)
    u, t = _inputs(dtype=torch.float64)
    assert s.raw(u, t).dtype == torch.float32
    assert model.seen[-1][:2] == (torch.float32, torch.float32)  # the network gets float32 inputs (official)
    assert s(u, t).dtype == torch.float64  # the score follows the state dtype


def test_differentiable_variant(sde):
    model = Model().eval()
    s = cf.score_fn(model, sde)
    d = s.differentiable()
    assert d.is_differentiable and not s.is_differentiable and d.model is model
    u, t = _inputs()
    u = u.requires_grad_(True)
    out = d(u, t)
    assert out.requires_grad
    (g,) = torch.autograd.grad(out.sum(), u)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    torch.testing.assert_close(out.detach(), s(u.detach(), t), rtol=1e-6, atol=1e-6)


def test_vpsde_mixed(sde):
    vp = cf.VPSDE()
    model = Model(augmented=False).eval()
    s = cf.score_fn(model, vp)
    x, t = _inputs(augmented=False)
    alpha, sigma = vp.marginal_coefficients(t)
    out = s.raw(x, t).double()
    # official CLD-SGM: -x / var(t, var0x=1) + out * (-1 / sigma), var = alpha^2 + sigma^2 (= 1 for VP)
    var = alpha[:, None] ** 2 + sigma[:, None] ** 2
    torch.testing.assert_close(var, torch.ones_like(var), rtol=1e-12, atol=1e-12)
    expect = -x.double() / var - out / sigma[:, None]
    torch.testing.assert_close(s(x, t).double(), expect, rtol=1e-5, atol=1e-5)


def test_autocast_on_cpu_warns_once(sde):
    s = cf.score_fn(Model().eval(), sde, autocast_dtype=torch.bfloat16)
    u, t = _inputs()
    with pytest.warns(RuntimeWarning, match="CUDA only"):
        a = s.raw(u, t)
    assert a.dtype == torch.float32
    assert cf.score_fn(Model(), sde, autocast_dtype="fp16").autocast_dtype == torch.float16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_autocast_on_cuda(sde):
    model = Model().cuda().eval()
    s = cf.score_fn(model, sde, autocast_dtype=torch.bfloat16)
    u, t = _inputs()
    out = s.raw(u.cuda(), t.cuda())
    assert out.dtype == torch.float32
    ref = cf.score_fn(model, sde).raw(u.cuda(), t.cuda())
    torch.testing.assert_close(out, ref, rtol=5e-2, atol=5e-2)


def test_bad_arguments(sde):
    with pytest.raises(TypeError):
        cf.score_fn(3, sde)
    with pytest.raises(TypeError):
        cf.score_fn(Model(), "cld")
    with pytest.raises(TypeError):
        cf.score_fn(Model(), sde, mixed=1)
    with pytest.raises(ValueError):
        cf.score_fn(Model(), sde, autocast_dtype=torch.float64)
    s = cf.score_fn(lambda u, t: [0.0], sde)
    with pytest.raises(TypeError, match="tensor"):
        s.raw(*_inputs())


# ---- network outputs of diffusers-style models (.sample, 1-tuples) -----------------------------------


@dataclass
class _Output:  # the shape of diffusers' UNet2DOutput
    sample: torch.Tensor


def _net(wrap):
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 2)

    def model(u, t):
        return wrap(lin(torch.cat([u, t[:, None]], 1)))

    return model


@pytest.mark.parametrize("wrap", [_Output, lambda y: (y,), lambda y: [y]], ids=["sample-attr", "tuple", "list"])
def test_wrapped_outputs_give_the_tensor_score(sde, wrap):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(16, 4, generator=g)
    t = torch.rand(16, generator=g) * 0.9 + 0.05
    ref = cf.score_fn(_net(lambda y: y), sde)
    got = cf.score_fn(_net(wrap), sde)
    assert torch.equal(got(u, t), ref(u, t))
    assert torch.equal(got.raw(u, t), ref.raw(u, t))
    res_ref = cf.sample(ref, (16, 2), sde, steps=4, generator=torch.Generator().manual_seed(1))
    res = cf.sample(got, (16, 2), sde, steps=4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(res.u, res_ref.u)


@pytest.mark.parametrize("wrap,match", [
    (lambda y: (y, y), "1-tuple of a tensor, got tuple of length 2"),
    (lambda y: {"sample": y}, "got dict"),
    (lambda y: _Output(sample=y.tolist()), "got _Output"),
])
def test_other_outputs_are_rejected(sde, wrap, match):
    score = cf.score_fn(_net(wrap), sde)
    with pytest.raises(TypeError, match=match):
        score(torch.zeros(2, 4), torch.full((2,), 0.5))
