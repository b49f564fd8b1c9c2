import io
import math

import pytest
import torch

from stepwise.errors import ConfigError
from stepwise.schedules import NoiseSchedule
from stepwise.timestep_samplers import (TIMESTEP_SAMPLERS, CurriculumSampler, LossSecondMomentSampler, SpeeDSampler,
                                        build_timestep_sampler, gather_for_update, log_sigma, speed_dual)

T = 100
ABAR = NoiseSchedule("linear", T).abar  # meaningful_steps = 80
KWARGS = {"uniform": {}, "clts": {"ramp_steps": 100},
          "curriculum": {"num_clusters": 5, "patience": 3, "smoothing": 0.0},
          "iddpm": {}, "speed": {"abar": ABAR}, "lognormal": {"abar": ABAR}, "logit_normal": {}}
RANGES = [None, (20, 70)]


def assert_close(actual, expected, rtol=1e-7, atol=1e-12):
    """allclose with a readable failure (torch.testing.assert_close costs ~1 s to import on first use)."""
    assert actual.shape == expected.shape and torch.allclose(actual, expected, rtol=rtol, atol=atol), (actual, expected)


def loss_of(t: torch.Tensor) -> torch.Tensor:
    """A deterministic per-t loss profile, decreasing in t."""
    return 2.0 - t.double() / T


def prepared(name: str, t_range=None, seed: int = 0, **kw):
    """A sampler in an informative state: iddpm warmed up, curriculum moved to stage 2."""
    s = build_timestep_sampler(name, T, seed=seed, t_range=t_range, **{**KWARGS[name], **kw})
    if name == "iddpm":
        t = torch.arange(s.lo, s.hi).repeat(s.history_per_term)
        s.update(t, loss_of(t) * (1 + 0.1 * torch.rand(len(t), generator=torch.Generator().manual_seed(1))))
    if name == "curriculum":
        for _ in range(s.patience + 1):
            s.update(torch.zeros(4, dtype=torch.long), torch.ones(4))
        assert s.stage == 2
    return s


def chi2_ok(counts: torch.Tensor, p: torch.Tensor) -> tuple[float, float]:
    """(chi-square statistic, generous 5-sigma bound) of observed counts vs expected n*p, small cells pooled."""
    n = counts.sum().item()
    exp = n * p
    big = exp >= 5
    obs_cells = torch.cat([counts[big].double(), counts[~big].double().sum().view(1)])
    exp_cells = torch.cat([exp[big], exp[~big].sum().view(1)])
    keep = exp_cells > 0
    chi2 = ((obs_cells[keep] - exp_cells[keep]) ** 2 / exp_cells[keep]).sum().item()
    df = int(keep.sum()) - 1
    return chi2, df + 5 * math.sqrt(2 * max(df, 1))


@pytest.mark.parametrize("t_range", RANGES)
@pytest.mark.parametrize("name", sorted(TIMESTEP_SAMPLERS))
def test_histogram_matches_probs(name, t_range):
    s = prepared(name, t_range)
    batch, step = 500, 50
    t = torch.cat([s.sample(batch, step)[0] for _ in range(20)])  # 10k draws
    p = s.probs(step, batch=batch) if isinstance(s, SpeeDSampler) else s.probs(step)
    chi2, bound = chi2_ok(torch.bincount(t, minlength=T), p)
    assert chi2 < bound, f"{name}: chi2={chi2:.1f} >= {bound:.1f}"


@pytest.mark.parametrize("t_range", RANGES)
@pytest.mark.parametrize("name", sorted(TIMESTEP_SAMPLERS))
def test_probs_valid_and_range_honoured(name, t_range):
    s = prepared(name, t_range)
    lo, hi = t_range or (0, T)
    for step in (0, 50, 10_000):
        p = s.probs(step)
        assert p.dtype == torch.float64 and p.shape == (T,)
        assert (p >= 0).all() and abs(p.sum().item() - 1) < 1e-9
        assert p[:lo].sum() == 0 and p[hi:].sum() == 0
        t, w = s.sample(257, step)
        assert t.dtype == torch.long and t.shape == (257,) and w.shape == (257,)
        assert t.min() >= lo and t.max() < hi
        assert torch.isfinite(w).all() and (w > 0).all()


@pytest.mark.parametrize("name", sorted(TIMESTEP_SAMPLERS))
def test_state_round_trip_gives_identical_draws(name):
    a = prepared(name, (10, 90))
    for step in range(3):
        t, _ = a.sample(16, step)
        a.update(t, loss_of(t))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    b = build_timestep_sampler(name, T, seed=123, t_range=(10, 90), **KWARGS[name])  # fresh, other seed
    b.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=False))
    for step in range(3, 12):
        (ta, wa), (tb, wb) = a.sample(16, step), b.sample(16, step)
        assert torch.equal(ta, tb) and torch.equal(wa, wb)
        losses = torch.full((16,), 1.0)  # constant: drives the curriculum through its patience counter
        a.update(ta, losses)
        b.update(tb, losses)
    assert torch.equal(a.probs(12), b.probs(12))
    if name == "curriculum":
        assert a.stage == b.stage == 4 and a.transitions == b.transitions and len(a.transitions) == 3


@pytest.mark.parametrize("name, kwargs, needle", [
    ("clts", {"lambda_max": 1.5}, "lambda_max=1.5 must be in [0, 1]"),
    ("clts", {"sigma": 0}, "sigma=0"),
    ("clts", {"mu": -0.1}, "mu=-0.1"),
    ("clts", {"ramp_steps": 0}, "ramp_steps=0"),
    ("curriculum", {"num_clusters": 0}, "num_clusters=0 must be an integer in [1, 100]"),
    ("curriculum", {"num_clusters": 2.5}, "num_clusters=2.5"),
    ("curriculum", {"patience": 0}, "patience=0"),
    ("curriculum", {"smoothing": 1.0}, "smoothing=1.0"),
    ("curriculum", {"pacing_fraction": 0.0}, "pacing_fraction=0.0 must be in (0, 1]"),
    ("curriculum", {"total_steps": 0}, "total_steps=0"),
    ("iddpm", {"uniform_prob": 2}, "uniform_prob=2"),
    ("iddpm", {"history_per_term": 0}, "history_per_term=0"),
    ("speed", {"abar": ABAR, "lam": 5}, "lam=5 must be in [0.5, 1]"),
    ("speed", {"abar": ABAR, "lam": 0.4}, "lam=0.4"),
    ("speed", {"abar": ABAR, "tau": 0}, "tau=0"),
    ("speed", {"abar": ABAR, "k": 0}, "k=0"),
    ("speed", {}, "pass exactly one of abar"),
    ("speed", {"abar": ABAR, "schedule": "linear"}, "pass exactly one of abar"),
    ("speed", {"schedule": "sqrt"}, "unknown schedule 'sqrt'; valid: ['cosine', 'linear']"),
    ("speed", {"abar": ABAR[:10]}, "abar must be a (T,)"),
    ("lognormal", {"abar": ABAR, "p_std": 0}, "p_std=0"),
    ("logit_normal", {"s": -1}, "s=-1"),
    ("uniform", {"bogus": 1}, "bogus"),
])
def test_config_errors(name, kwargs, needle):
    with pytest.raises(ConfigError) as e:
        build_timestep_sampler(name, T, **kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_unknown_sampler_lists_valid_choices():
    with pytest.raises(ConfigError, match="valid: \\['clts', 'curriculum', 'iddpm', 'logit_normal'"):
        build_timestep_sampler("nope", T)


# --- CLTS ------------------------------------------------------------------------------------------------------

def test_clts_uniform_at_start_and_high_t_mass_decreases():
    s = build_timestep_sampler("clts", 1000, ramp_steps=1000)
    assert_close(s.probs(0), torch.full((1000,), 1e-3, dtype=torch.float64))
    mass = [s.probs(k)[700:].sum().item() for k in range(0, 2001, 100)]
    assert all(b <= a + 1e-15 for a, b in zip(mass, mass[1:]))
    assert all(b < a for a, b in zip(mass[:10], mass[1:11]))  # strictly during the ramp
    assert mass[0] == pytest.approx(0.3) and mass[-1] == mass[10]  # constant after the ramp
    assert s.probs(10**9).min() >= 0  # never negative (SpeeD's CLTS goes negative after its ramp)


def test_clts_end_point_is_the_stated_mixture():
    s = build_timestep_sampler("clts", 1000, mu=0.3, sigma=0.2, lambda_max=1.0, ramp_steps=10)
    p = s.probs(10)
    t = torch.arange(1000, dtype=torch.float64)
    assert_close(p / p[300], torch.exp(-0.5 * ((t - 300) / 200) ** 2))  # N(t; 0.3 T, 0.2 T)
    mixed = build_timestep_sampler("clts", 1000, lambda_max=0.8, ramp_steps=10).probs(5)  # lambda = 0.4
    assert_close(mixed, 0.4 * p + 0.6 / 1000)


# --- curriculum --------------------------------------------------------------------------------------------------

def test_curriculum_stage_advances_exactly_after_patience():
    s = CurriculumSampler(T, num_clusters=4, patience=3, smoothing=0.9)
    ones = torch.ones(8)
    stages = []
    for _ in range(14):
        s.update(torch.zeros(8, dtype=torch.long), ones)
        stages.append(s.stage)
    # first update of a stage sets the best, then 3 non-improving updates advance
    assert stages == [1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4]
    assert s.transitions == [4, 8, 12]


def test_curriculum_improving_loss_keeps_stage_and_support_grows():
    s = CurriculumSampler(T, num_clusters=4, patience=2)
    for i in range(50):
        s.update(torch.zeros(2, dtype=torch.long), torch.full((2,), 10.0 - 0.1 * i))
    assert s.stage == 1 and s.support == (75, 100)
    starts = []
    while s.stage < 4:
        starts.append(s.support[0])
        s.update(torch.zeros(2, dtype=torch.long), torch.ones(2))
    assert starts == sorted(starts, reverse=True) and s.support == (0, 100)
    assert_close(s.probs(0), torch.full((T,), 0.01, dtype=torch.float64))  # final: plain uniform


def test_curriculum_budget_cap_finishes_within_pacing_fraction():
    # ceil(0.5 * 40 / 4) = 5 updates per stage at most, even while the loss keeps improving (patience never fires)
    s = CurriculumSampler(T, num_clusters=4, patience=1000, total_steps=40, pacing_fraction=0.5)
    assert s.max_stage_updates == 5
    for i in range(40):
        s.update(torch.zeros(2, dtype=torch.long), torch.full((2,), 10.0 - 0.1 * i))
    assert s.transitions == [5, 10, 15] and s.stage == 4


def test_curriculum_without_total_steps_has_no_cap():
    s = CurriculumSampler(T, num_clusters=4, patience=1000)
    for i in range(40):
        s.update(torch.zeros(2, dtype=torch.long), torch.full((2,), 10.0 - 0.1 * i))
    assert s.max_stage_updates is None and s.stage == 1


def test_curriculum_clusters_follow_t_range():
    s = CurriculumSampler(T, t_range=(10, 60), num_clusters=5, patience=1)
    assert s.edges == [10, 20, 30, 40, 50, 60] and s.support == (50, 60)


# --- IDDPM -------------------------------------------------------------------------------------------------------

def test_iddpm_uniform_until_every_t_has_full_history():
    s = LossSecondMomentSampler(10)
    t = torch.arange(10).repeat(10)[:-1]  # t=9 gets only 9 losses
    s.update(t, loss_of(t))
    assert not s.warmed_up()
    assert_close(s.probs(0), torch.full((10,), 0.1, dtype=torch.float64))
    assert torch.equal(s.sample(5, 0)[1], torch.ones(5))
    s.update(torch.tensor([9]), torch.tensor([3.0]))
    assert s.warmed_up()


def test_iddpm_probs_weights_and_unbiasedness():
    s = LossSecondMomentSampler(4, history_per_term=2, uniform_prob=0.1)
    s.update(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), torch.tensor([1.0, 1.0, 3.0, 4.0, 0.0, 0.0, 2.0, 2.0]))
    rms = torch.tensor([1.0, math.sqrt(12.5), 0.0, 2.0], dtype=torch.float64)
    expect = 0.9 * rms / rms.sum() + 0.1 / 4
    assert_close(s.probs(0), expect)
    t, w = s.sample(20000, 0)
    assert_close(w.double(), 1 / (4 * expect[t]), rtol=1e-6, atol=0)
    L = torch.tensor([1.0, 3.5, 0.5, 2.0])  # any per-t loss
    assert (expect * (1 / (4 * expect)) * L.double()).sum().item() == pytest.approx(L.mean().item())  # exact
    assert (w * L[t]).mean().item() == pytest.approx(L.mean().item(), rel=0.03)  # empirical


def test_iddpm_history_keeps_latest_and_rejects_out_of_range():
    s = LossSecondMomentSampler(3, t_range=(1, 3), history_per_term=2)
    s.update(torch.tensor([1, 1, 1]), torch.tensor([5.0, 6.0, 7.0]))
    assert s.history[0].tolist() == [6.0, 7.0] and s.counts.tolist() == [2, 0]
    with pytest.raises(ValueError, match="outside the sampler's range"):
        s.update(torch.tensor([0]), torch.tensor([1.0]))


def test_gather_for_update_is_identity_without_distributed():
    t, losses = torch.tensor([1, 2]), torch.tensor([0.5, 0.25])
    assert gather_for_update(t, losses) == (t, losses)


# --- SpeeD -------------------------------------------------------------------------------------------------------

def test_speed_meaningful_steps_and_primary_odds():
    assert SpeeDSampler(1000, schedule="linear").m == 642
    s = SpeeDSampler(1000, schedule="cosine", k=5)
    assert s.m == 959 and s.tau_t == 700
    assert s.primary[0] / s.primary[999] == pytest.approx(5.0) and s.primary[699] == s.primary[0]


def test_speed_duals_and_change_aware_weights():
    s = SpeeDSampler(T, abar=ABAR, tau=0.7, lam=0.6)
    t, w = s.sample(8, 0)
    assert torch.equal(t[5:], speed_dual(t[:3], s.m))  # B//2+1 primaries, then their duals, truncated to B
    assert speed_dual(torch.tensor([0, 30, 80, 95]), 80).tolist() == [80, 50, 0, 15]
    assert torch.equal(w, s.weights[t].float())
    assert (s.weights[70:] == 1).all()
    low = s.weights[:70]
    assert low.min() >= 0.4 - 1e-12 and low.max() <= 0.6 + 1e-12
    assert SpeeDSampler(T, abar=ABAR, lam=0.5).weights[:70].eq(0.5).all()  # lam=0.5: constant 0.5


def test_speed_out_of_range_duals_are_redrawn():
    s = SpeeDSampler(T, schedule="cosine")  # m = T: the dual of t=0 would be T
    assert s.m == T and s.dual_probs().sum().item() == pytest.approx(1.0)
    t = torch.cat([s.sample(64, 0)[0] for _ in range(50)])
    assert t.max() < T


# --- log-normal / logit-normal --------------------------------------------------------------------------------

def test_lognormal_moments_of_log_sigma():
    s = build_timestep_sampler("lognormal", 1000, schedule="linear")
    t, w = s.sample(20000, 0)
    ls = log_sigma(NoiseSchedule("linear", 1000).abar)[t]
    assert ls.mean().item() == pytest.approx(-1.2, abs=0.05) and ls.std().item() == pytest.approx(1.2, abs=0.05)
    assert torch.equal(w, torch.ones(20000))


def test_lognormal_maps_to_nearest_sigma():
    s = build_timestep_sampler("lognormal", T, abar=ABAR, p_mean=0.0, p_std=1e-3)
    target = int((log_sigma(ABAR) - 0.0).abs().argmin())
    assert s.probs(0).argmax().item() == target and s.sample(50, 0)[0].eq(target).all()


def test_logit_normal_moments():
    s = build_timestep_sampler("logit_normal", 1000, m=0.5, s=0.8)
    t, _ = s.sample(20000, 0)
    u = torch.logit((t.double() + 0.5) / 1000)
    assert u.mean().item() == pytest.approx(0.5, abs=0.05) and u.std().item() == pytest.approx(0.8, abs=0.05)
    p_upper = 0.5 * math.erfc(-0.5 / 0.8 / math.sqrt(2))  # P(u >= 0) = P(sigmoid(u) >= 1/2), u ~ N(0.5, 0.8^2)
    assert s.probs(0)[500:].sum().item() == pytest.approx(p_upper, abs=1e-9)
