"""Timestep samplers: which t each training example is noised to, and its importance weight.

Interface (docs/checklist.md, item 2): `sample(batch, step) -> (t, weights)` and `update(t, losses)`.
A sampler owns its random generator, so its whole state (generator included) round-trips through
`state_dict()` / `load_state_dict()` and a resumed run draws exactly the timesteps an uninterrupted run would.

Every sampler takes `T, seed=0, t_range=None`: `t_range=(lo, hi)` restricts the support to [lo, hi) and the
distribution becomes the full-range one conditioned on that range (renormalised), never clipped onto its ends.
`probs(step)` is the distribution of the t's `sample` emits: float64 (T,), non-negative, summing to 1.

Data-parallel training: samplers that learn from losses (curriculum, iddpm) must see the same losses on every rank,
so pass `update` the all-gathered (t, losses) of the whole global batch (`gather_for_update` does that when
torch.distributed is initialised and is the identity otherwise), and seed each rank's generator differently.
"""
from __future__ import annotations

import inspect
import math

import torch
from torch.special import ndtr, ndtri

from .errors import ConfigError, StepwiseError
from .grouping import uniform_boundaries
from .schedules import SCHEDULES, NoiseSchedule, meaningful_steps


def _require(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless `ok`."""
    if not ok:
        raise ConfigError(message)


def _integer(where: str, value, minimum: int, maximum: float = math.inf) -> int:
    """`value` as an int in [minimum, maximum], else ConfigError naming the valid range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()
    _require(ok and minimum <= value <= maximum,
             f"{where}={value!r} must be an integer in [{minimum}, {maximum if maximum < math.inf else 'inf'}]")
    return int(value)


class TimestepSampler:
    """Base class: draws t ~ probs(step) on [lo, hi) and returns unit weights unless a subclass says otherwise."""

    def __init__(self, T: int, seed: int = 0, t_range: tuple[int, int] | None = None):
        lo, hi = t_range if t_range is not None else (0, T)
        if not 0 <= lo < hi <= T:
            raise ConfigError(f"timestep range [{lo}, {hi}) must lie inside [0, {T}) and be non-empty")
        self.T, self.lo, self.hi = T, int(lo), int(hi)
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def n(self) -> int:
        """Number of timesteps in the range, |[lo, hi)|."""
        return self.hi - self.lo

    def uniform(self) -> torch.Tensor:
        """U{lo, ..., hi-1} as float64 (T,)."""
        p = torch.zeros(self.T, dtype=torch.float64)
        p[self.lo : self.hi] = 1.0 / self.n
        return p

    def probs(self, step: int) -> torch.Tensor:
        """p(t) over all T timesteps at training step `step`, float64 (T,), zero outside [lo, hi)."""
        return self.uniform()

    def sample(self, batch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw `batch` timesteps for training step `step`: (t long (B,), weights float32 (B,))."""
        t = torch.multinomial(self.probs(step), batch, replacement=True, generator=self.generator)  # (B,)
        return t, torch.ones(batch)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Observe per-example losses (B,) at timesteps t (B,); stateless samplers ignore them."""

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class UniformSampler(TimestepSampler):
    """t ~ U{lo, ..., hi-1} with unit weights (Ho et al. 2020, arXiv 2006.11239, Alg. 1)."""

    def sample(self, batch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.randint(self.lo, self.hi, (batch,), generator=self.generator)  # (B,)
        return t, torch.ones(batch)


# --------------------------------------------------------------------------------------------------------------
# CLTS: curriculum-learning timestep schedule (Xu et al., arXiv 2404.07946)


def clts_lambda(step: int, lambda_max: float, ramp_steps: int) -> float:
    """Mixing weight lambda(k) = lambda_max * min(k / ramp_steps, 1): 0 at k=0 (arXiv 2404.07946, CLTS)."""
    return lambda_max * min(max(step, 0) / ramp_steps, 1.0)


def discrete_gaussian(T: int, lo: int, hi: int, mu: float, sigma: float) -> torch.Tensor:
    """N(t; mu T, sigma T) evaluated at t in [lo, hi) and normalised there, float64 (T,) (arXiv 2404.07946, CLTS)."""
    t = torch.arange(T, dtype=torch.float64)  # (T,)
    logp = -0.5 * ((t / T - mu) / sigma) ** 2  # (T,)
    logp[:lo], logp[hi:] = -math.inf, -math.inf
    return torch.softmax(logp, 0)  # (T,)


class CLTSSampler(TimestepSampler):
    """p_k(t) = lambda(k) N(t; mu T, sigma T) + (1 - lambda(k)) U(t) (Xu et al., arXiv 2404.07946, CLTS).

    High-noise (large t) steps are easy and get progressively less training: lambda ramps linearly from 0 at step 0
    to `lambda_max` at `ramp_steps` and stays there. Unit weights (a sampling curriculum, not importance sampling).
    """

    def __init__(self, T: int, seed: int = 0, t_range=None, mu: float = 0.3, sigma: float = 0.2,
                 lambda_max: float = 0.8, ramp_steps: int = 50_000):
        super().__init__(T, seed, t_range)
        _require(0 <= mu <= 1, f"clts: mu={mu!r} (mean as a fraction of T) must be in [0, 1]")
        _require(sigma > 0, f"clts: sigma={sigma!r} (std as a fraction of T) must be > 0")
        _require(0 <= lambda_max <= 1, f"clts: lambda_max={lambda_max!r} must be in [0, 1]")
        self.mu, self.sigma, self.lambda_max = float(mu), float(sigma), float(lambda_max)
        self.ramp_steps = _integer("clts: ramp_steps", ramp_steps, 1)
        self.gaussian = discrete_gaussian(T, self.lo, self.hi, self.mu, self.sigma)  # (T,)

    def probs(self, step: int) -> torch.Tensor:
        lam = clts_lambda(step, self.lambda_max, self.ramp_steps)
        return lam * self.gaussian + (1 - lam) * self.uniform()  # (T,)


# --------------------------------------------------------------------------------------------------------------
# Task-difficulty curriculum (Kim et al., arXiv 2403.10348)


class CurriculumSampler(TimestepSampler):
    """Easy-to-hard curriculum over timestep clusters with patience pacing (Kim et al., arXiv 2403.10348, Alg. 1).

    [lo, hi) is cut into `num_clusters` uniform intervals; the highest-t cluster is the easiest. Stage n (1-based,
    attribute `stage`) samples uniformly from the union of the n highest-t clusters. `update` smooths the mean batch
    loss with an EMA (`smoothing`); when the smoothed loss has not improved (strictly decreased) on its best for
    `patience` consecutive updates the sampler moves to the next stage, resetting the best loss, the patience counter
    and the EMA (the old stage's losses come from a different t-distribution). Stage `num_clusters` covers the whole
    range and is final: plain uniform sampling from then on. Unit weights.

    Budget cap (ours, docs/methods.md): with `total_steps` set, a stage also advances after `max_stage_updates` =
    ceil(pacing_fraction * total_steps / num_clusters) updates, so the whole curriculum ends within `pacing_fraction`
    of a short training run (the paper's τ = 200 assumes ~10^5 iterations). None (default): patience only.
    """

    def __init__(self, T: int, seed: int = 0, t_range=None, num_clusters: int = 10, patience: int = 200,
                 smoothing: float = 0.99, total_steps: int | None = None, pacing_fraction: float = 0.5):
        super().__init__(T, seed, t_range)
        self.num_clusters = _integer("curriculum: num_clusters", num_clusters, 1, self.n)
        self.patience = _integer("curriculum: patience", patience, 1)
        _require(0 <= smoothing < 1, f"curriculum: smoothing={smoothing!r} (EMA decay) must be in [0, 1)")
        self.smoothing = float(smoothing)
        _require(isinstance(pacing_fraction, (int, float)) and not isinstance(pacing_fraction, bool)
                 and 0 < pacing_fraction <= 1, f"curriculum: pacing_fraction={pacing_fraction!r} must be in (0, 1]")
        self.max_stage_updates = None if total_steps is None else max(1, math.ceil(
            pacing_fraction * _integer("curriculum: total_steps", total_steps, 1) / self.num_clusters))
        self.edges = uniform_boundaries(self.lo, self.hi, self.num_clusters)
        self.stage, self.ema, self.best, self.bad_updates = 1, None, math.inf, 0
        self.updates, self.transitions = 0, []  # update count and the update index at which each stage began

    @property
    def support(self) -> tuple[int, int]:
        """[start, hi): the union of the `stage` highest-t clusters."""
        return self.edges[self.num_clusters - self.stage], self.hi

    def probs(self, step: int) -> torch.Tensor:
        start, hi = self.support
        p = torch.zeros(self.T, dtype=torch.float64)
        p[start:hi] = 1.0 / (hi - start)
        return p

    def sample(self, batch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, hi = self.support
        t = torch.randint(start, hi, (batch,), generator=self.generator)  # (B,)
        return t, torch.ones(batch)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Pace the curriculum on the mean of `losses` (B,); pass all-gathered losses under data parallelism."""
        self.updates += 1
        if self.stage == self.num_clusters:
            return
        mean = float(losses.detach().float().mean())
        self.ema = mean if self.ema is None else self.smoothing * self.ema + (1 - self.smoothing) * mean
        stage_updates = self.updates - (self.transitions[-1] if self.transitions else 0)
        over_budget = self.max_stage_updates is not None and stage_updates >= self.max_stage_updates
        if self.ema < self.best and not over_budget:
            self.best, self.bad_updates = self.ema, 0
            return
        self.bad_updates += 1
        if self.bad_updates >= self.patience or over_budget:
            self.stage += 1
            self.ema, self.best, self.bad_updates = None, math.inf, 0
            self.transitions.append(self.updates)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "stage": self.stage, "ema": self.ema, "best": self.best,
                "bad_updates": self.bad_updates, "updates": self.updates, "transitions": list(self.transitions)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.stage, self.ema, self.best = state["stage"], state["ema"], state["best"]
        self.bad_updates, self.updates = state["bad_updates"], state["updates"]
        self.transitions = list(state["transitions"])


# --------------------------------------------------------------------------------------------------------------
# IDDPM loss-aware importance sampling (Nichol & Dhariwal, arXiv 2102.09672; openai/improved-diffusion resample.py)


def second_moment_probs(history: torch.Tensor, uniform_prob: float) -> torch.Tensor:
    """p_t ∝ sqrt(E[L_t^2]) mixed with uniform_prob of U (Nichol & Dhariwal 2021, arXiv 2102.09672, Eq. 18)."""
    w = history.pow(2).mean(1).sqrt()  # (n,)
    p = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1 / len(w))  # (n,)
    return (1 - uniform_prob) * p + uniform_prob / len(w)  # (n,)


class LossSecondMomentSampler(TimestepSampler):
    """Importance sampling p_t ∝ sqrt(E[L_t^2]), weights 1/(n p_t) (Nichol & Dhariwal 2021, arXiv 2102.09672, Eq. 18).

    Keeps the last `history_per_term` losses of every t in [lo, hi); samples uniformly until each has that many, then
    from `second_moment_probs`. The returned weights make E[w L] equal the uniform objective over [lo, hi) (unbiased).
    Under data parallelism call `update` with the all-gathered (t, losses) of every rank, in rank order
    (`gather_for_update`), so every rank keeps identical histories; no torch.distributed call happens in here.
    """

    def __init__(self, T: int, seed: int = 0, t_range=None, history_per_term: int = 10, uniform_prob: float = 0.001):
        super().__init__(T, seed, t_range)
        self.history_per_term = _integer("iddpm: history_per_term", history_per_term, 1)
        _require(0 <= uniform_prob <= 1, f"iddpm: uniform_prob={uniform_prob!r} must be in [0, 1]")
        self.uniform_prob = float(uniform_prob)
        self.history = torch.zeros(self.n, self.history_per_term, dtype=torch.float64)  # (n, H)
        self.counts = torch.zeros(self.n, dtype=torch.long)  # (n,)

    def warmed_up(self) -> bool:
        """Whether every t in [lo, hi) has `history_per_term` recorded losses."""
        return bool((self.counts == self.history_per_term).all())

    def probs(self, step: int) -> torch.Tensor:
        if not self.warmed_up():
            return self.uniform()
        p = torch.zeros(self.T, dtype=torch.float64)
        p[self.lo : self.hi] = second_moment_probs(self.history, self.uniform_prob)
        return p

    def sample(self, batch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.probs(step)  # (T,)
        t = torch.multinomial(p, batch, replacement=True, generator=self.generator)  # (B,)
        return t, (1.0 / (self.n * p[t])).float()  # (B,), (B,)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Append losses (B,) to the histories of t (B,), oldest dropped; pass all-gathered values under DDP."""
        t_list, l_list = t.detach().cpu().tolist(), losses.detach().cpu().double().tolist()
        for ti, li in zip(t_list, l_list):
            if not self.lo <= ti < self.hi:
                raise ValueError(f"iddpm: update got t={ti} outside the sampler's range [{self.lo}, {self.hi})")
            i, c = ti - self.lo, int(self.counts[ti - self.lo])
            if c == self.history_per_term:
                self.history[i, :-1] = self.history[i, 1:].clone()
                self.history[i, -1] = li
            else:
                self.history[i, c] = li
                self.counts[i] = c + 1

    def state_dict(self) -> dict:
        return {**super().state_dict(), "history": self.history.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.history.copy_(state["history"])
        self.counts.copy_(state["counts"])


def gather_for_update(t: torch.Tensor, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather (t, losses) from every rank, in rank order, for `update`; the identity without torch.distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t, losses
    world = dist.get_world_size()
    size = torch.tensor([len(t)], device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    width = int(max(s.item() for s in sizes))
    ts, ls = [t.new_zeros(width) for _ in range(world)], [losses.new_zeros(width) for _ in range(world)]
    dist.all_gather(ts, torch.cat([t, t.new_zeros(width - len(t))]))  # (width,) per rank
    dist.all_gather(ls, torch.cat([losses, losses.new_zeros(width - len(losses))]))  # (width,) per rank
    keep = [int(s.item()) for s in sizes]
    return (torch.cat([x[:k] for x, k in zip(ts, keep)]), torch.cat([x[:k] for x, k in zip(ls, keep)]))


# --------------------------------------------------------------------------------------------------------------
# Schedule-aware samplers: SpeeD, EDM log-normal, SD3 logit-normal


def resolve_abar(T: int, abar=None, schedule: str | None = None, who: str = "sampler") -> torch.Tensor:
    """The schedule's abar, float64 (T,), from exactly one of an `abar` tensor or a `schedule` name."""
    _require((abar is None) != (schedule is None),
             f"{who}: needs the noise schedule: pass exactly one of abar=<(T,) tensor> or schedule=<one of "
             f"{sorted(SCHEDULES)}>")
    if schedule is not None:
        _require(schedule in SCHEDULES, f"{who}: unknown schedule {schedule!r}; valid: {sorted(SCHEDULES)}")
        return NoiseSchedule(schedule, T).abar
    abar = torch.as_tensor(abar, dtype=torch.float64).cpu()
    _require(abar.shape == (T,) and bool(((abar > 0) & (abar < 1)).all()),
             f"{who}: abar must be a (T,)=({T},) tensor with values in (0, 1), got shape {tuple(abar.shape)}")
    return abar


def speed_dual(t: torch.Tensor, m: int) -> torch.Tensor:
    """SpeeD's dual timestep t' = m - t if t < m else t - m, m = meaningful steps (arXiv 2405.17403, code)."""
    return torch.where(t < m, m - t, t - m)  # (B,)


def change_aware_weights(abar: torch.Tensor, tau_t: int, lam: float) -> torch.Tensor:
    """w_t = (1-lam) + (2 lam - 1) minmax(d(1-abar)/dt) for t < tau, 1 above (SpeeD, arXiv 2405.17403, code): (T,)."""
    g = torch.gradient(1 - abar)[0]  # (T,)
    w = (1 - lam) + (2 * lam - 1) * (g - g.min()) / (g.max() - g.min())  # (T,)
    w[tau_t:] = 1.0
    return w


class SpeeDSampler(TimestepSampler):
    """Asymmetric sampling with dual timesteps and change-aware weights (SpeeD, Wang et al., arXiv 2405.17403).

    Primary t ~ p(t) ∝ k below tau·T and ∝ 1 above (restricted to [lo, hi)); B//2+1 primaries are drawn, each gets
    its dual t' = speed_dual(t, m) with m = meaningful_steps(abar), and the batch is the first B of (primaries, duals).
    A dual outside [lo, hi) is replaced by a fresh primary draw. The returned weights are SpeeD's change-aware weights
    (not importance weights): they multiply the per-example MSE only (SpeeD leaves the learned-variance vb term
    unweighted). Needs the schedule: `abar` (T,) tensor or `schedule` name.
    """

    def __init__(self, T: int, seed: int = 0, t_range=None, abar=None, schedule: str | None = None,
                 tau: float = 0.7, k: float = 2.0, lam: float = 0.6):
        super().__init__(T, seed, t_range)
        self.abar = resolve_abar(T, abar, schedule, "speed")  # (T,)
        _require(0 < tau <= 1, f"speed: tau={tau!r} (threshold as a fraction of T) must be in (0, 1]")
        _require(k > 0, f"speed: k={k!r} (sampling odds of t < tau versus t >= tau) must be > 0")
        _require(0.5 <= lam <= 1, f"speed: lam={lam!r} must be in [0.5, 1] (weights lie in [1-lam, lam])")
        self.tau, self.k, self.lam = float(tau), float(k), float(lam)
        self.tau_t = int(round(tau * T))
        self.m = meaningful_steps(self.abar)
        self.primary = self.uniform()  # (T,)
        self.primary[: self.tau_t] *= self.k
        self.primary /= self.primary.sum()
        self.weights = change_aware_weights(self.abar, self.tau_t, self.lam)  # (T,)

    def dual_probs(self) -> torch.Tensor:
        """Distribution of a dual timestep (out-of-range duals redrawn from the primary p): float64 (T,)."""
        s = torch.arange(self.lo, self.hi)  # (n,)
        d, ps = speed_dual(s, self.m), self.primary[self.lo : self.hi]  # (n,), (n,)
        inside = (d >= self.lo) & (d < self.hi)  # (n,)
        q = torch.zeros(self.T, dtype=torch.float64).index_add_(0, d[inside], ps[inside])  # (T,)
        return q + ps[~inside].sum() * self.primary

    def probs(self, step: int, batch: int | None = None) -> torch.Tensor:
        """Marginal of an emitted t for batch size `batch` (None: large-batch limit, half primaries, half duals)."""
        if batch is None:
            return 0.5 * self.primary + 0.5 * self.dual_probs()
        n1 = min(batch // 2 + 1, batch)
        return (n1 * self.primary + (batch - n1) * self.dual_probs()) / batch

    def sample(self, batch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        n1 = min(batch // 2 + 1, batch)
        t = torch.multinomial(self.primary, n1, replacement=True, generator=self.generator)  # (n1,)
        dual = speed_dual(t, self.m)[: batch - n1]  # (B - n1,)
        out = (dual < self.lo) | (dual >= self.hi)  # (B - n1,)
        if out.any():
            dual[out] = torch.multinomial(self.primary, int(out.sum()), replacement=True, generator=self.generator)
        t = torch.cat([t, dual])  # (B,)
        return t, self.weights[t].float()


def normal_interval_mass(z_lo: torch.Tensor, z_hi: torch.Tensor) -> torch.Tensor:
    """P(z_lo <= Z < z_hi) for Z ~ N(0, 1), using the upper tail where it is more precise."""
    upper = z_lo > 0
    return torch.where(upper, ndtr(-z_lo) - ndtr(-z_hi), ndtr(z_hi) - ndtr(z_lo))


def truncated_normal(n: int, z_lo: float, z_hi: float, generator: torch.Generator) -> torch.Tensor:
    """n draws of Z ~ N(0, 1) conditioned on [z_lo, z_hi), by inverse CDF: float64 (n,)."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)  # (n,)
    if z_lo > 0:  # upper tail: invert the survival function for precision
        a, b = ndtr(torch.tensor(-z_hi, dtype=torch.float64)), ndtr(torch.tensor(-z_lo, dtype=torch.float64))
        return -ndtri(b - (b - a) * u)
    a, b = ndtr(torch.tensor(z_lo, dtype=torch.float64)), ndtr(torch.tensor(z_hi, dtype=torch.float64))
    return ndtri(a + (b - a) * u)


class _GaussianBucketSampler(TimestepSampler):
    """t = the bucket of u ~ N(mean, std^2) among T buckets split by increasing `boundaries` (T-1,); unit weights."""

    def __init__(self, T: int, seed: int, t_range, boundaries: torch.Tensor, mean: float, std: float, who: str):
        super().__init__(T, seed, t_range)
        _require(std > 0, f"{who}: std={std!r} must be > 0")
        self.mean, self.std = float(mean), float(std)
        inf = torch.tensor([math.inf], dtype=torch.float64)
        self.edges = torch.cat([-inf, boundaries.double(), inf])  # (T+1,): bucket t is [edges[t], edges[t+1])
        z = (self.edges - self.mean) / self.std  # (T+1,)
        mass = torch.zeros(T, dtype=torch.float64)
        mass[self.lo : self.hi] = normal_interval_mass(z[self.lo : self.hi], z[self.lo + 1 : self.hi + 1])
        _require(mass.sum() > 0, f"{who}: t_range [{self.lo}, {self.hi}) has zero probability; widen it")
        self.p = mass / mass.sum()  # (T,)
        self.z_lo, self.z_hi = float(z[self.lo]), float(z[self.hi])

    def probs(self, step: int) -> torch.Tensor:
        return self.p.clone()

    def sample(self, batch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        u = self.mean + self.std * truncated_normal(batch, self.z_lo, self.z_hi, self.generator)  # (B,)
        t = torch.bucketize(u, self.edges[1:-1], right=True).clamp(self.lo, self.hi - 1)  # (B,)
        return t, torch.ones(batch)


def log_sigma(abar: torch.Tensor) -> torch.Tensor:
    """ln sigma_t, sigma_t = sqrt((1 - abar_t)/abar_t): the EDM noise level of x_t/sqrt(abar_t) (arXiv 2206.00364)."""
    return 0.5 * (torch.log1p(-abar) - torch.log(abar))  # (T,)


class LogNormalSampler(_GaussianBucketSampler):
    """ln sigma ~ N(p_mean, p_std^2) mapped to the t whose ln sigma_t is nearest (EDM, arXiv 2206.00364, Table 1).

    Needs the schedule (`abar` tensor or `schedule` name); sigma_t must increase with t. Unit weights.
    """

    def __init__(self, T: int, seed: int = 0, t_range=None, abar=None, schedule: str | None = None,
                 p_mean: float = -1.2, p_std: float = 1.2):
        abar = resolve_abar(T, abar, schedule, "lognormal")
        ls = log_sigma(abar)  # (T,)
        _require(bool((ls[1:] > ls[:-1]).all()), "lognormal: sigma_t must increase strictly with t (abar decreasing)")
        _require(p_std > 0, f"lognormal: p_std={p_std!r} must be > 0")
        self.log_sigmas = ls
        super().__init__(T, seed, t_range, 0.5 * (ls[1:] + ls[:-1]), p_mean, p_std, "lognormal")


class LogitNormalSampler(_GaussianBucketSampler):
    """t = floor(sigmoid(u) T), u ~ N(m, s^2) (Esser et al. 2024, SD3, arXiv 2403.03206, Sec. 3.1). Unit weights."""

    def __init__(self, T: int, seed: int = 0, t_range=None, m: float = 0.0, s: float = 1.0):
        _require(s > 0, f"logit_normal: s={s!r} must be > 0")
        j = torch.arange(1, T, dtype=torch.float64) / T  # (T-1,)
        super().__init__(T, seed, t_range, torch.logit(j), m, s, "logit_normal")


TIMESTEP_SAMPLERS = {
    "uniform": UniformSampler,
    "clts": CLTSSampler,
    "curriculum": CurriculumSampler,
    "iddpm": LossSecondMomentSampler,
    "speed": SpeeDSampler,
    "lognormal": LogNormalSampler,
    "logit_normal": LogitNormalSampler,
}


def build_timestep_sampler(name: str, T: int, seed: int = 0, t_range=None, default_abar=None,
                           **kwargs) -> TimestepSampler:
    """Instantiate a sampler from TIMESTEP_SAMPLERS by name; `default_abar` reaches those that need the schedule
    when neither `abar` nor `schedule` is given."""
    if name not in TIMESTEP_SAMPLERS:
        raise ConfigError(f"unknown timestep sampler {name!r}; valid: {sorted(TIMESTEP_SAMPLERS)}")
    valid = sorted(set(inspect.signature(TIMESTEP_SAMPLERS[name]).parameters) - {"self", "T", "seed", "t_range"})
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ConfigError(f"timestep sampler {name!r} has no argument(s) {unknown} (timestep_sampler_args); "
                          f"valid: {valid if valid else 'none, it takes no arguments'}")
    if default_abar is not None and "abar" in inspect.signature(TIMESTEP_SAMPLERS[name]).parameters \
            and "schedule" not in kwargs and "abar" not in kwargs:
        kwargs["abar"] = default_abar
    try:
        return TIMESTEP_SAMPLERS[name](T, seed=seed, t_range=t_range, **kwargs)
    except TypeError as e:
        raise ConfigError(f"timestep sampler {name!r}: {e}") from None


class RangeRecorder:
    """Wraps a TimestepSampler restricted to [lo, hi) (a TDC expert's group): counts every emitted t (kept in its
    state, so across resumes) and rejects any t outside [lo, hi) the moment it is drawn."""

    def __init__(self, sampler: TimestepSampler, lo: int, hi: int):
        self.sampler, self.lo, self.hi = sampler, lo, hi
        self.counts = torch.zeros(sampler.T, dtype=torch.long)  # (T,)

    def probs(self, step: int) -> torch.Tensor:
        return self.sampler.probs(step)

    def sample(self, batch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        t, w = self.sampler.sample(batch, step)  # (B,), (B,)
        if int(t.min()) < self.lo or int(t.max()) >= self.hi:
            raise StepwiseError(f"timestep sampler emitted t in [{int(t.min())}, {int(t.max())}] outside the group's "
                                f"range [{self.lo}, {self.hi}) at step {step}")
        self.counts += torch.bincount(t.cpu(), minlength=len(self.counts))
        return t, w

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        self.sampler.update(t, losses)

    def state_dict(self) -> dict:
        return {"inner": self.sampler.state_dict(), "t_counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["inner"])
        self.counts.copy_(state["t_counts"])

    def seen(self) -> dict:
        """{'t_min', 't_max', 't_distinct', 't_draws'} of every timestep emitted so far."""
        nz = torch.nonzero(self.counts).flatten()
        if not len(nz):
            return {"t_min": -1, "t_max": -1, "t_distinct": 0, "t_draws": 0}
        return {"t_min": int(nz.min()), "t_max": int(nz.max()), "t_distinct": len(nz),
                "t_draws": int(self.counts.sum())}
