import math

import pytest
import torch

from stepwise.errors import ConfigError
from stepwise.schedules import NoiseSchedule, meaningful_steps, snr, snr_db


def test_linear_endpoints_and_abar():
    s = NoiseSchedule("linear", 1000)
    assert s.betas[0].item() == pytest.approx(1e-4)
    assert s.betas[-1].item() == pytest.approx(0.02)
    assert s.abar[0].item() == pytest.approx(1 - 1e-4)
    assert s.abar[2].item() == pytest.approx((1 - s.betas[0]) * (1 - s.betas[1]) * (1 - s.betas[2]))
    assert torch.all(s.abar[1:] < s.abar[:-1])


def test_cosine_matches_closed_form():
    s = NoiseSchedule("cosine", 1000)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 100, 500, 900):
        assert s.abar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-6)
    assert s.betas.max().item() <= 0.999


def test_meaningful_steps_match_speed_repo():
    # docs/checklist.md item 1: 642 (linear), 959 (cosine)
    assert meaningful_steps(NoiseSchedule("linear", 1000).abar) == 642
    assert meaningful_steps(NoiseSchedule("cosine", 1000).abar) == 959


def test_snr_and_db():
    abar = torch.tensor([0.5, 0.9090909090909091], dtype=torch.float64)
    assert snr(abar).tolist() == pytest.approx([1.0, 10.0])
    assert snr_db(abar).tolist() == pytest.approx([0.0, 10.0])


def test_q_sample_formula():
    s = NoiseSchedule("linear", 1000)
    x0, eps, t = torch.ones(2, 1, 2, 2), torch.full((2, 1, 2, 2), 2.0), torch.tensor([0, 999])
    xt = s.q_sample(x0, t, eps)
    for i, ti in enumerate(t.tolist()):
        a = s.abar[ti].item()
        assert xt[i].flatten()[0].item() == pytest.approx(math.sqrt(a) + 2 * math.sqrt(1 - a), rel=1e-5)


def test_unknown_schedule():
    with pytest.raises(ConfigError, match="valid: \\['cosine', 'linear'\\]"):
        NoiseSchedule("quadratic", 10)


def test_t_bins_and_their_metric_keys():
    from stepwise.schedules import bin_key, parse_bin_key, t_bin

    # floor(t * 3 / 10): bins [0, 4), [4, 7), [7, 10) of T = 10
    assert t_bin(torch.arange(10), 10, 3).tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [bin_key(k, 3, 10) for k in range(3)] == ["loss_t0-3", "loss_t4-6", "loss_t7-9"]
    assert bin_key(2, 3, 10, "x0err_v") == "x0err_v_t7-9" and parse_bin_key("x0err_v_t7-9") == ("x0err_v", 7, 10)
