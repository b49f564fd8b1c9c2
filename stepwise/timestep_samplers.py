"""Timestep samplers: which t each training example is noised to, and its importance weight.

Interface (shared/methods-notes.md, checklist 2): `sample(batch, step) -> (t, weights)` and `update(t, losses)`.
A sampler owns its random generator, so its whole state (generator included) round-trips through
`state_dict()` / `load_state_dict()` and a resumed run draws exactly the timesteps an uninterrupted run would.
"""
from __future__ import annotations

import torch

from .errors import ConfigError


class TimestepSampler:
    """Base class: draws t ~ probs(step) on [lo, hi) and returns unit weights unless a subclass says otherwise."""

    def __init__(self, T: int, seed: int = 0, t_range: tuple[int, int] | None = None):
        lo, hi = t_range if t_range is not None else (0, T)
        if not 0 <= lo < hi <= T:
            raise ConfigError(f"timestep range [{lo}, {hi}) must lie inside [0, {T}) and be non-empty")
        self.T, self.lo, self.hi = T, lo, hi
        self.generator = torch.Generator().manual_seed(seed)

    def probs(self, step: int) -> torch.Tensor:
        """p(t) over all T timesteps at training step `step`, float64 (T,), zero outside [lo, hi)."""
        p = torch.zeros(self.T, dtype=torch.float64)
        p[self.lo : self.hi] = 1.0 / (self.hi - self.lo)
        return p

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


TIMESTEP_SAMPLERS = {"uniform": UniformSampler}


def build_timestep_sampler(name: str, T: int, seed: int = 0, t_range=None, **kwargs) -> TimestepSampler:
    """Instantiate a sampler from TIMESTEP_SAMPLERS by name."""
    if name not in TIMESTEP_SAMPLERS:
        raise ConfigError(f"unknown timestep sampler {name!r}; valid: {sorted(TIMESTEP_SAMPLERS)}")
    try:
        return TIMESTEP_SAMPLERS[name](T, seed=seed, t_range=t_range, **kwargs)
    except TypeError as e:
        raise ConfigError(f"timestep sampler {name!r}: {e}") from None
