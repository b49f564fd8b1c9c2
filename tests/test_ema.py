"""Weight EMA: the warm-up reaches the configured decay at warmup_steps; averaging is exact."""
import pytest
import torch

from stepwise.ema import EMA, ema_decay_at


@pytest.mark.parametrize("d,W,p", [(0.999, 200, 2 / 3), (0.9999, 1000, 2 / 3), (0.99, 10, 1.0)])
def test_configured_decay_is_reached_at_warmup_steps(d, W, p):
    assert ema_decay_at(0, d, W, p) == 0.0
    assert ema_decay_at(W, d, W, p) == d and ema_decay_at(10 * W, d, W, p) == d
    assert ema_decay_at(W - 1, d, W, p) < d
    values = [ema_decay_at(k, d, W, p) for k in range(1, W + 1)]
    assert values == sorted(values)  # monotone warm-up


def test_hand_computed_warmup_value():
    # d = 0.999, W = 200, p = 2/3: gamma = 200 / (1000^1.5 - 1); decay(10) = 1 - (1 + 10/gamma)^(-2/3)
    gamma = 200 / (1000**1.5 - 1)
    assert ema_decay_at(10, 0.999, 200) == pytest.approx(1 - (1 + 10 / gamma) ** (-2 / 3), rel=1e-12)
    assert ema_decay_at(10, 0.999, 200) == pytest.approx(0.9926349, abs=1e-6)
    assert ema_decay_at(5, 0.9, 0) == 0.9  # no warm-up: constant


def test_update_is_the_exponential_average():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.5, warmup_steps=0)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    assert ema.update(model, 0) == 0.0  # k = 0: copy
    assert torch.equal(ema.module.weight, model.weight)
    with torch.no_grad():
        model.weight.add_(2.0)
    assert ema.update(model, 1) == 0.5
    assert torch.allclose(ema.module.weight, 0.5 * (start + 1.0) + 0.5 * (start + 3.0))
    assert not any(p.requires_grad for p in ema.module.parameters())
