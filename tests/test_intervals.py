"""Bootstrap intervals and verdicts: noise is not resolved, planted effects are, intervals cover, FID agrees."""
import math

import pytest
import torch
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from stepwise.errors import ConfigError
from stepwise.fidelity import (feature_difference_intervals, feature_intervals, feature_replicates, fid_replicates,
                               frechet_distance, kernel_distance, precision_recall)
from stepwise.intervals import (NOT_RESOLVED, NULL_DIFFERENCE, NULL_RATIO, RESOLVED, bootstrap_ci, difference_ci,
                                percentile_interval, resample_counts, speedup_ci, verdict)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def features(n, d=16, shift=0.0, seed=0):
    """Post-ReLU-like features (n, d), float64: a skewed, partly sparse distribution like a network's."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) + shift).relu() * 2 + 0.1


def test_feature_metrics_agree_with_torch_fidelity():
    fake, real = features(400, 32, 0.2, seed=1), features(500, 32, seed=2)
    ref = fid_statistics_to_metric(fid_features_to_statistics(fake), fid_features_to_statistics(real), False)
    ours = frechet_distance(fake, real).item()
    assert math.isclose(ours, ref["frechet_inception_distance"], rel_tol=1e-3)
    kid = kid_features_to_metric(fake, real[:400], kid_subsets=2, kid_subset_size=400, rng_seed=0, verbose=False,
                                 kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None,
                                 kid_kernel_poly_coef0=1)  # subsets = whole sets: the all-pairs estimate
    assert math.isclose(kernel_distance(fake, real[:400]).item(), kid["kernel_inception_distance_mean"], rel_tol=1e-6)
    prc = prc_features_to_metric(fake, real, prc_neighborhood=3, prc_batch_size=10000, save_cpu_ram=True,
                                 verbose=False)
    precision, recall = precision_recall(fake, real)
    assert abs(precision.item() - prc["precision"]) < 1e-6 and abs(recall.item() - prc["recall"]) < 1e-6


def test_resampled_metrics_equal_metrics_of_repeated_rows():
    """Multiplicities are the same as repeating rows for FID (a smooth statistic of the moments)."""
    fake, real = features(50, 6, seed=3), features(60, 6, seed=4)
    gen = torch.Generator().manual_seed(0)
    cf, cr = resample_counts(50, 3, gen), resample_counts(60, 3, gen)
    got = frechet_distance(fake, real, cf, cr)
    for b in range(3):
        rep_f = fake.repeat_interleave(cf[b].long(), 0)
        rep_r = real.repeat_interleave(cr[b].long(), 0)
        assert math.isclose(got[b].item(), frechet_distance(rep_f, rep_r).item(), rel_tol=1e-9)


def test_percentile_interval_coverage_on_a_known_distribution():
    """95 % intervals for the mean of N(1, 2^2) samples of 40 cover the true mean about 95 % of the time."""
    g = torch.Generator().manual_seed(0)
    hits = sum(bootstrap_ci(1 + 2 * torch.randn(40, generator=g), n_boot=400, seed=i).contains(1.0) for i in range(300))
    assert 0.88 <= hits / 300 <= 0.99


def test_statistic_over_indices_matches_the_values_path():
    x = torch.randn(30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = bootstrap_ci(x, n_boot=200, seed=5)
    b = bootstrap_ci(lambda i: x[i].mean(), 30, n_boot=200, seed=5)
    assert math.isclose(a.lo, b.lo) and math.isclose(a.hi, b.hi) and math.isclose(a.estimate, b.estimate)
    assert a.lo < x.mean() < a.hi


def test_centered_fid_intervals_cover_the_expected_fid():
    """Plain percentile intervals of FID sit above it (resamples hold duplicated rows); centered ones cover it."""
    def draw(seed):
        return features(150, 16, 0.2, seed=2 * seed), features(150, 16, seed=2 * seed + 1)

    expected = torch.cat([frechet_distance(*draw(1000 + s)) for s in range(200)]).mean().item()
    plain = centered = 0
    for s in range(40):
        fake, real = draw(s)
        gen = torch.Generator().manual_seed(s)
        reps = frechet_distance(fake, real, resample_counts(150, 200, gen), resample_counts(150, 200, gen))
        est = frechet_distance(fake, real).item()
        plain += percentile_interval(est, reps).contains(expected)
        centered += percentile_interval(est, reps, centered=True).contains(expected)
    assert centered >= 35 and plain <= 20


def test_fid_difference_of_identical_processes_is_not_resolved_and_a_shift_is():
    real = features(300, seed=10)
    a, b, shifted = features(300, seed=11), features(300, seed=12), features(300, shift=0.4, seed=13)
    same = difference_ci(lambda x, r: frechet_distance(x, r), a, b, real, n_boot=150, seed=0)
    assert verdict(same, NULL_DIFFERENCE) == NOT_RESOLVED
    planted = difference_ci(lambda x, r: frechet_distance(x, r), shifted, a, real, n_boot=150, seed=0)
    assert verdict(planted, NULL_DIFFERENCE) == RESOLVED and planted.lo > 0


def test_all_metric_differences_noise_vs_planted():
    real = features(300, seed=20)
    a, b, shifted = features(300, seed=21), features(300, seed=22), features(300, shift=0.6, seed=23)
    same = feature_difference_intervals(a, b, real, n_boot=100, seed=1)
    assert set(same) == {"fid", "kid", "precision", "recall", "f_score"}
    assert all(verdict(iv, NULL_DIFFERENCE) == NOT_RESOLVED for iv in same.values()), same
    planted = feature_difference_intervals(shifted, a, real, n_boot=100, seed=1)
    assert verdict(planted["fid"], 0) == verdict(planted["kid"], 0) == RESOLVED
    assert planted["fid"].lo > 0 and planted["kid"].lo > 0


def test_feature_intervals_contain_their_estimates():
    fake, real = features(200, seed=30, shift=0.2), features(250, seed=31)
    ivs = feature_intervals(fake, real, n_boot=100, seed=0)
    point = feature_replicates(fake, real)
    for k, iv in ivs.items():
        assert iv.lo <= iv.estimate <= iv.hi and iv.hi > iv.lo and math.isclose(iv.estimate, point[k].item())


def fid_curves(num_seeds, first_seed, factor=1.0, noise=0.04):
    """Per-seed FID curves of one training process: 60 (step/100)^-0.7, the method sees `factor` x the steps."""
    g = torch.Generator().manual_seed(first_seed)
    steps = list(range(100, 1100, 100))
    return [[(s, 60 * (factor * s / 100) ** -0.7 * math.exp(noise * torch.randn(1, generator=g).item()))
             for s in steps] for _ in range(num_seeds)]


def test_speedup_of_identical_processes_is_not_resolved():
    iv = speedup_ci(fid_curves(4, 0), fid_curves(4, 100), n_boot=300, seed=0)
    assert verdict(iv, NULL_RATIO) == NOT_RESOLVED and iv.lo < 1 < iv.hi


def test_planted_speedup_is_resolved():
    iv = speedup_ci(fid_curves(4, 0), fid_curves(4, 100, factor=2.0), n_boot=300, seed=0)
    assert verdict(iv, NULL_RATIO) == RESOLVED and 1.4 < iv.lo < 2 < iv.hi < 3


def test_speedup_over_sample_replicates():
    """One seed per arm: the sample bootstrap (fid_replicates) alone supplies the spread."""
    real = features(300, 8, seed=40)

    def arm(factor, seed):  # the feature shift decays as 1/step; `factor` x faster
        curve, reps = [], {}
        for step in range(100, 900, 100):
            fake = features(300, 8, 200 / (factor * step), seed=seed + step)
            curve.append((step, frechet_distance(fake, real).item()))
            reps[step] = fid_replicates(fake, real, n_boot=100, seed=0)
        return [curve], [reps]

    (base, base_reps), (same, same_reps), (fast, fast_reps) = arm(1.0, 0), arm(1.0, 1), arm(2.0, 1)
    iv = speedup_ci(base, same, baseline_replicates=base_reps, method_replicates=same_reps, n_boot=200)
    assert verdict(iv, NULL_RATIO) == NOT_RESOLVED
    iv = speedup_ci(base, fast, baseline_replicates=base_reps, method_replicates=fast_reps, n_boot=200)
    assert verdict(iv, NULL_RATIO) == RESOLVED and iv.lo > 1


def test_bad_inputs_fail_clearly():
    with pytest.raises(ConfigError, match="alpha"):
        bootstrap_ci(torch.randn(10), alpha=1.5)
    with pytest.raises(ConfigError, match="n_boot"):
        bootstrap_ci(torch.randn(10), n_boot=0)
    with pytest.raises(ConfigError, match="sizes"):
        bootstrap_ci(lambda i: 0.0)
    with pytest.raises(ConfigError, match="one seed"):
        speedup_ci(fid_curves(1, 0), fid_curves(3, 1))
    with pytest.raises(ConfigError, match="same checkpoints"):
        speedup_ci(fid_curves(2, 0), [c[:-1] if i else c for i, c in enumerate(fid_curves(2, 1))])
    with pytest.raises(ValueError, match="NaN"):
        percentile_interval(0.0, torch.tensor([1.0, float("nan")]))
    with pytest.raises(ConfigError, match="dimension"):
        feature_intervals(features(10, 4), features(10, 5))


def test_verdict_and_infinite_replicates():
    iv = percentile_interval(2.0, torch.tensor([1.5, 2.0, float("inf")] * 10))
    assert iv.hi == math.inf and verdict(iv, NULL_RATIO) == RESOLVED
    assert verdict(percentile_interval(0.1, torch.linspace(-1, 1, 100)), NULL_DIFFERENCE) == NOT_RESOLVED
