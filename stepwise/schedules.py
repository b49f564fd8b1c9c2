"""Noise schedules: betas, cumulative alphas and signal-to-noise ratios.

Notation (docs/methods.md): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, SNR(t) = abar_t / (1 - abar_t).
"""
from __future__ import annotations

import math
import re

import torch

from .errors import ConfigError


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Linear beta schedule (Ho et al. 2020, arXiv 2006.11239, Sec. 4), scaled to T steps as in IDDPM."""
    scale = 1000.0 / T
    return torch.linspace(scale * beta_start, scale * beta_end, T, dtype=torch.float64)  # (T,)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, arXiv 2102.09672, Eq. 17): abar(t) = cos^2((t/T + s)/(1 + s) * pi/2)."""
    steps = torch.arange(T + 1, dtype=torch.float64) / T  # (T+1,)
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2  # (T+1,)
    betas = 1 - f[1:] / f[:-1]  # (T,)
    return betas.clamp(max=max_beta)


SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas}


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """abar_t = prod_{s<=t} (1 - beta_s) (Ho et al. 2020, Eq. 4)."""
    return torch.cumprod(1 - betas, dim=0)


def snr(abar: torch.Tensor) -> torch.Tensor:
    """SNR(t) = abar_t / (1 - abar_t) (Kingma et al. 2021, arXiv 2107.00630, Eq. 5)."""
    return abar / (1 - abar)


def snr_db(abar: torch.Tensor) -> torch.Tensor:
    """SNR in decibels, 10 log10 SNR(t): TDC's difficulty axis (arXiv 2312.13307)."""
    return 10 * torch.log10(snr(abar))


def meaningful_steps(abar: torch.Tensor, eps: float = 1e-4) -> int:
    """First t where d sqrt(1 - abar)/dt < eps, plus one: SpeeD's convergence-area start (arXiv 2405.17403)."""
    grad = torch.gradient(torch.sqrt(1 - abar))[0]  # (T,)
    below = (grad < eps).nonzero()
    return int(below[0]) + 1 if len(below) else len(abar)


def t_bin(t: torch.Tensor, T: int, bins: int) -> torch.Tensor:
    """Equal-width bin index of each timestep t (B,) among `bins` bins of [0, T): floor(t * bins / T), clamped to
    [0, bins - 1] (B,). The one t -> bin map of the package (per-t-bin loss logs, mixed-x0 route mixing)."""
    return (t.long() * bins // T).clamp(0, bins - 1)  # (B,)


class NoiseSchedule:
    """The discrete forward process q(x_t | x0) for t in [0, T), held as float64 tables.

    Tables live on the CPU in float64; `at(table, t, like)` gathers and broadcasts them to a batch.
    """

    def __init__(self, name: str = "linear", T: int = 1000, **kwargs):
        if name not in SCHEDULES:
            raise ConfigError(f"unknown schedule {name!r}; valid: {sorted(SCHEDULES)}")
        self.name, self.T = name, T
        self.betas = SCHEDULES[name](T, **kwargs)  # (T,)
        self.abar = alphas_cumprod(self.betas)  # (T,)
        self.abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.abar[:-1]])  # (T,)
        self._cache: dict = {}

    def table(self, name: str, device) -> torch.Tensor:
        """A float32 copy of a schedule table on `device` (cached)."""
        key = (name, str(device))
        if key not in self._cache:
            self._cache[key] = getattr(self, name).to(device=device, dtype=torch.float32)
        return self._cache[key]

    def at(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Gather table `name` at timesteps t (B,) and reshape to broadcast against `like` (B, ...)."""
        v = self.table(name, t.device)[t]  # (B,)
        return v.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (Ho et al. 2020, Eq. 4)."""
        abar = self.at("abar", t, x0)  # (B,1,1,1)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * eps

    def snr(self) -> torch.Tensor:
        """SNR(t) for every t, float64 (T,)."""
        return snr(self.abar)

    def snr_db(self) -> torch.Tensor:
        """SNR in dB for every t, float64 (T,)."""
        return snr_db(self.abar)


# ---- metric names of equal-width t-bins: bin k of `bins` holds the t in [0, T) with t * bins // T == k -------------
BIN_KEY = re.compile(r"^(?P<name>.+)_t(?P<lo>\d+)-(?P<last>\d+)$")


def bin_range(k: int, bins: int, T: int) -> tuple[int, int]:
    """[lo, hi) of t-bin k: the t with t * bins // T == k, i.e. lo = ceil(k T / bins), hi = ceil((k + 1) T / bins)."""
    if not 0 < bins <= T:
        raise ConfigError(f"bins={bins} must be in [1, T={T}]")
    if not 0 <= k < bins:
        raise ConfigError(f"bin index {k} must be in [0, {bins})")
    return -(-k * T // bins), -(-(k + 1) * T // bins)


def bin_label(k: int, bins: int, T: int) -> str:
    """Name of t-bin k by its inclusive t-range, zero-padded to the digits of T - 1: e.g. 't000-099'."""
    lo, hi = bin_range(k, bins, T)
    width = len(str(T - 1))
    return f"t{lo:0{width}d}-{hi - 1:0{width}d}"


def bin_key(k: int, bins: int, T: int, name: str = "loss") -> str:
    """Metric key of quantity `name` in t-bin k: e.g. 'loss_t000-099' (parsed back by `parse_bin_key`)."""
    return f"{name}_{bin_label(k, bins, T)}"


def parse_bin_key(key: str) -> tuple[str, int, int] | None:
    """(name, lo, hi) with t in [lo, hi) of a key written by `bin_key`; None for any other key."""
    m = BIN_KEY.match(key)
    if m is None or int(m["last"]) < int(m["lo"]):
        return None
    return m["name"], int(m["lo"]), int(m["last"]) + 1
