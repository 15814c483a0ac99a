"""cld_fast.ema: the EMA decay with the official warm-up min(decay, (1 + n) / (10 + n))."""
import pytest
import torch
import torch.nn as nn

from cld_fast.ema import ExponentialMovingAverage


@pytest.mark.parametrize("decay", [0.9999, 0.999])
def test_ema_decay_is_capped_after_warmup(decay):
    """Update n uses min(decay, (1 + n) / (10 + n)); at n = 10**6 the warm-up term is 0.999991 > decay."""
    p = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    ema = ExponentialMovingAverage([p], decay=decay)
    ema.load_state_dict({"decay": decay, "num_updates": 10 ** 6 - 1, "shadow_params": [torch.ones(4, dtype=torch.float64)]})
    assert ema.current_decay() == decay
    assert ema.current_decay(10 ** 6) == decay
    assert ema.current_decay(5) == pytest.approx(6 / 15, rel=1e-15)  # still warming up
    with torch.no_grad():
        p.fill_(3.0)
    ema.update([p])
    assert ema.num_updates == 10 ** 6
    want = 1.0 - (1.0 - decay) * (1.0 - 3.0)  # shadow -= (1 - decay) (shadow - param)
    torch.testing.assert_close(ema.shadow_params[0], torch.full((4,), want, dtype=torch.float64), rtol=1e-14, atol=0)


def test_ema_without_num_updates_uses_the_decay_from_the_first_update():
    p = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    ema = ExponentialMovingAverage([p], decay=0.9, use_num_updates=False)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update([p])
    torch.testing.assert_close(ema.shadow_params[0], torch.full((2,), 0.1, dtype=torch.float64), rtol=1e-14, atol=0)
