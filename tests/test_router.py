import pytest
import torch
from torch import nn

from stepwise.diffusion import Diffusion
from stepwise.errors import ConfigError
from stepwise.grouping import uniform_groups
from stepwise.router import ExpertRouter
from stepwise.sampling import generate


class Const(nn.Module):
    """Outputs the constant c everywhere and records the timesteps it was called with."""

    def __init__(self, c):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(float(c)))
        self.seen = []

    def forward(self, x, t):
        self.seen.append(t.clone())
        return torch.zeros_like(x) + self.c


def test_router_dispatches_per_example():
    experts = [Const(i) for i in range(4)]
    router = ExpertRouter(experts, uniform_groups(100, 4))
    t = torch.tensor([99, 0, 30, 25, 74, 50, 24])
    out = router(torch.randn(7, 1, 4, 4), t)  # (7, 1, 4, 4)
    assert out[:, 0, 0, 0].tolist() == [3.0, 0.0, 1.0, 1.0, 2.0, 2.0, 0.0]
    assert torch.all(out == out[:, :1, :1, :1])
    assert experts[1].seen[0].tolist() == [30, 25]  # each expert sees only its own examples
    assert all(bool(router.covers(s)) for s in range(100)) and not router.covers(100)
    out.sum().backward()
    assert experts[2].c.grad.item() == 2 * 16  # gradients reach the experts that were used


def test_router_fallback_and_missing_cover():
    router = ExpertRouter([Const(1), Const(2)], [(10, 20), (40, 50)], fallback=Const(-1))
    t = torch.tensor([0, 15, 30, 45, 99])
    assert router(torch.zeros(5, 1, 2, 2), t)[:, 0, 0, 0].tolist() == [-1.0, 1.0, -1.0, 2.0, -1.0]
    assert router.covers(t).all() and router.expert_index(t).tolist() == [-1, 0, -1, 1, -1]
    bare = ExpertRouter([Const(1)], [(10, 20)])
    assert bare.covers(t).tolist() == [False, True, False, False, False]
    with pytest.raises(ConfigError, match="no fallback"):
        bare(torch.zeros(5, 1, 2, 2), t)


def test_router_construction_errors():
    with pytest.raises(ConfigError, match="overlap"):
        ExpertRouter([Const(0), Const(1)], [(0, 50), (40, 100)])
    with pytest.raises(ConfigError):
        ExpertRouter([Const(0)], [(0, 50), (50, 100)])
    with pytest.raises(ConfigError):
        ExpertRouter([Const(0)], [(5, 5)])
    with pytest.raises(ConfigError):
        ExpertRouter([], [])


def test_router_works_with_generate():
    experts = [Const(0.0), Const(0.0)]
    router = ExpertRouter(experts, [(0, 50), (50, 100)])
    router.train()
    x = generate(router, Diffusion("linear", 100), 3, (1, 4, 4), steps=4, seed=0, progress=False)
    assert x.shape == (3, 1, 4, 4) and router.training and torch.isfinite(x).all()
    called = sorted({int(t[0]) for e in experts for t in e.seen})
    assert called == [0, 33, 66, 99] and all(int(t[0]) < 50 for t in experts[0].seen)
