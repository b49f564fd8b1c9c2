import json

import pytest
import torch

from stepwise.errors import ConfigError
from stepwise.grouping import (GROUPING_METHODS, dp_groups, equal_snr_db_groups, group_index, groups_from_dict,
                               groups_to_dict, interpolate_profile, make_groups, uniform_groups, validate_groups)
from stepwise.schedules import NoiseSchedule


def covers_exactly(groups, T):
    return validate_groups(groups, T) == groups and sum(hi - lo for lo, hi in groups) == T


def test_uniform_covers_exactly():
    g = uniform_groups(1000, 7)
    assert len(g) == 7 and covers_exactly(g, 1000)
    assert max(hi - lo for lo, hi in g) - min(hi - lo for lo, hi in g) <= 1
    assert uniform_groups(10, 10) == [(i, i + 1) for i in range(10)]


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_equal_snr_db_groups_have_equal_widths(schedule):
    s = NoiseSchedule(schedule, 1000).snr_db()
    g = equal_snr_db_groups(s, 8)
    assert len(g) == 8 and covers_exactly(g, 1000)
    width = (s[0] - s[-1]) / 8
    step = (s[:-1] - s[1:]).max()
    for lo, hi in g:  # each group spans one SNR_dB interval, up to one timestep's change at either end
        assert s[lo] - s[hi - 1] <= width + 1e-9
        assert s[lo] - s[min(hi, 999)] >= width - 2 * step - 1e-9 or hi == 1000


def test_equal_snr_db_keeps_groups_non_empty():
    s = torch.tensor([50.0, 49.0, 48.0, -50.0], dtype=torch.float64)  # one huge drop: naive split leaves gaps
    g = equal_snr_db_groups(s, 4)
    assert g == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(ConfigError):
        equal_snr_db_groups(torch.tensor([1.0, 2.0]), 2)  # increasing SNR is no schedule


def test_dp_recovers_known_breakpoints():
    g = torch.Generator().manual_seed(0)
    signal = torch.cat([torch.full((130,), 3.0), torch.full((270,), -1.0), torch.full((600,), 0.5)])
    signal = signal + 0.05 * torch.randn(1000, generator=g)
    assert dp_groups(signal, 3) == [(0, 130), (130, 400), (400, 1000)]
    # two-column signal whose columns change at different places: 4 segments
    two = torch.stack([signal, torch.cat([torch.zeros(700), torch.full((300,), 4.0)])], 1)  # (T, 2)
    assert dp_groups(two, 4) == [(0, 130), (130, 400), (400, 700), (700, 1000)]
    assert dp_groups(signal, 1) == [(0, 1000)]


def test_dp_is_optimal_against_brute_force():
    signal = torch.tensor([0.0, 1.0, 0.9, 5.0, 5.2, 2.0, 2.1, 2.2])
    best = min(((a, b) for a in range(1, 8) for b in range(a + 1, 8)),
               key=lambda ab: sum(float(((seg - seg.mean()) ** 2).sum())
                                  for seg in (signal[: ab[0]], signal[ab[0] : ab[1]], signal[ab[1] :])))
    assert dp_groups(signal, 3) == [(0, best[0]), best, (best[1], 8)]


def test_validate_groups_errors():
    ok = [(0, 5), (5, 10)]
    assert validate_groups([[0, 5], [5, 10]], 10) == ok
    for bad in ([(0, 4), (5, 10)], [(0, 6), (5, 10)], [(0, 5), (5, 5), (5, 10)], [(0, 5), (5, 11)],
                [(1, 5), (5, 10)], [(5, 10), (0, 5)], [], [(0, 5, 1)], [(-1, 10)]):
        with pytest.raises(ConfigError):
            validate_groups(bad, 10)


def test_make_groups_registry_and_json_round_trip():
    s = NoiseSchedule("linear", 100).snr_db()
    assert set(GROUPING_METHODS) == {"uniform", "equal_snr_db", "dp"}
    for method in GROUPING_METHODS:
        g = make_groups(method, 100, 4, snr_db=s, signal=s)
        record = json.loads(json.dumps(groups_to_dict(g, 100, method, snr_db=s, signal="snr_db")))
        assert record["num_groups"] == 4 and groups_from_dict(record) == g
        assert record["groups"][0]["snr_db_lo_t"] == pytest.approx(float(s[0]))
    with pytest.raises(ConfigError):
        make_groups("dp", 100, 4)
    with pytest.raises(ConfigError):
        make_groups("kmeans", 100, 4)
    with pytest.raises(ConfigError):
        make_groups("uniform", 100, 0)


def test_group_index_and_interpolation():
    g = [(0, 3), (3, 7), (7, 10)]
    assert group_index(torch.arange(10), g).tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    prof = interpolate_profile([2, 6], [1.0, 5.0], 9)
    assert prof.tolist() == [1.0, 1.0, 1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0]
    assert interpolate_profile([3], [[1.0, 2.0]], 4).shape == (4, 2)


def test_uniform_boundaries_of_a_sub_range():
    from stepwise.grouping import uniform_boundaries

    assert uniform_boundaries(0, 10, 3) == [0, 3, 6, 10] == [lo for lo, _ in uniform_groups(10, 3)] + [10]
    assert uniform_boundaries(20, 40, 4) == [20, 25, 30, 35, 40]
