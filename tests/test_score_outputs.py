"""cf.score_fn accepts the output objects of diffusers-style networks (``.sample``, 1-tuples)."""
from dataclasses import dataclass

import pytest
import torch

import cld_fast as cf


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
