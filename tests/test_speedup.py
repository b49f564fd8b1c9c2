import math

import pytest

from stepwise.speedup import iterations_to_reach, speedups


def test_iterations_to_reach_interpolates():
    curve = [(100, 50.0), (200, 30.0), (300, 20.0)]
    assert iterations_to_reach(curve, 25.0) == pytest.approx(250.0)
    assert iterations_to_reach(curve, 50.0) == 100.0
    assert iterations_to_reach(curve, 19.0) is None
    assert iterations_to_reach([], 1.0) is None


def test_speedups_against_baseline():
    curves = {"uniform": [(100, 40.0), (200, 30.0), (400, 20.0)],
              "fast": [(100, 30.0), (200, 15.0), (400, 10.0)],
              "slow": [(100, 45.0), (200, 40.0), (400, 35.0)]}
    r = speedups(curves)
    assert r["uniform"]["speedup"] == pytest.approx(1.0)
    # fast reaches 20 between 100 (30) and 200 (15): at 100 + 100 * 10/15 = 166.7 -> 400/166.7 = 2.4x
    assert r["fast"]["iters_to_baseline_fid"] == pytest.approx(166.6667, rel=1e-4)
    assert r["fast"]["speedup"] == pytest.approx(2.4)
    assert r["slow"]["speedup"] is None and r["slow"]["final_fid"] == 35.0
    assert not math.isnan(r["fast"]["final_fid"])
    with pytest.raises(ValueError, match="baseline"):
        speedups({"fast": curves["fast"]})


def test_non_monotone_baseline_is_exactly_one_and_uses_its_first_crossing():
    curves = {"uniform": [(100, 50.0), (200, 30.0), (300, 32.0), (400, 31.0)],  # dips below 31 at 200 (30)
              "other": [(100, 31.0), (200, 25.0), (400, 20.0)]}
    r = speedups(curves)
    # the baseline first reaches its final 31.0 at 100 + 100 * 19/20 = 195
    assert r["uniform"]["baseline_iters_to_final_fid"] == pytest.approx(195.0)
    assert r["uniform"]["speedup"] == pytest.approx(1.0)
    assert r["other"]["iters_to_baseline_fid"] == 100.0 and r["other"]["speedup"] == pytest.approx(1.95)
