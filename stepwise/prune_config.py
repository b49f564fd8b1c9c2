"""Typed, validated views of params.yaml `tdc.prune` and `tdc.prune_eval` (TDC pruning, arXiv 2312.13307).

`tdc.prune` is everything the per-group `prune@i` stage reads (budget, search, proxy, importance gradients, the
post-pruning fine-tune); `tdc.prune_eval` only the throughput benchmark of `evaluate_pruned`, so changing the
benchmark never re-runs a search. Defaults are CPU-cheap and ours unless docs/methods.md says otherwise.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .config import TrainConfig, _choice, _positive, parse
from .errors import ConfigError
from .pruning import DIRECTIONS, IMPORTANCES, PROPOSERS
from .tdc_config import FINETUNE_FIXED, FINETUNE_RESET

PRUNE_INITS = ("raw", "ema")  # which weights of the expert file are pruned: raw or EMA


@dataclass
class PruneConfig:
    """Proxy-based multi-round pruning of expert i to its progressive MACs budget, then a fine-tune on its range."""

    k: float = 0.5  # smallest budget fraction in FLOPs(i) = (i/N + (N-i)/N k) F
    direction: str = "low_t_largest"  # which end of the t axis gets rank N (the full model): DIRECTIONS
    importance: str = "diff_pruning"  # channel importance: IMPORTANCES (random | magnitude | taylor | diff_pruning)
    rounds: int = 4  # proxy-search rounds (bank entries)
    proposer: str = "evolutionary"  # PROPOSERS (offline; an LLM proposer is not shipped)
    max_ratio: float = 0.9  # cap on any group's pruning ratio
    tol: float = 0.02  # measured MACs <= budget (1 + tol)
    ignored: list = field(default_factory=list)  # module names whose output channels are never pruned
    proxy_steps: int = 10  # Adam steps of the proxy's short fine-tune on [lo, hi)
    proxy_lr: float = 5e-4
    proxy_batch_size: int = 16
    proxy_eval_points: int = 8  # evenly spaced t in [lo, hi) at which the proxy loss is read
    proxy_images: int = 256  # training images the proxy fine-tunes on (a seeded subset)
    grad_images: int = 16  # images of the Taylor / Diff-Pruning gradient batch
    t_stride: int = 10  # gradient timesteps lo, lo+s, ... (Diff-Pruning uses 1)
    thr: float = 0.05  # Diff-Pruning stop rule: L_t < thr * max L
    finetune_steps: int = 50  # post-pruning fine-tune of the best candidate on [lo, hi)
    init: str = "ema"  # prune the expert's EMA weights (what sampling uses) or its raw weights
    train: dict = field(default_factory=dict)  # overrides of `train` for the fine-tune (lr, batch_size, ...)
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.k <= 1:
            raise ConfigError(f"k={self.k!r} must lie in (0, 1]: the smallest expert's fraction of the full MACs")
        _choice(self.direction, DIRECTIONS, "direction")
        _choice(self.importance, IMPORTANCES, "importance")
        _choice(self.proposer, PROPOSERS, "proposer")
        _choice(self.init, PRUNE_INITS, "init")
        for key in ("rounds", "proxy_batch_size", "proxy_eval_points", "proxy_images", "grad_images", "t_stride",
                    "finetune_steps"):
            _positive(key, getattr(self, key))
        _positive("proxy_steps", self.proxy_steps, allow_zero=True)
        _positive("proxy_lr", self.proxy_lr)
        for key in ("max_ratio", "tol", "thr"):
            if not 0 < getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)!r} must lie in (0, 1)")
        if self.proxy_batch_size > self.proxy_images:
            raise ConfigError(f"proxy_batch_size={self.proxy_batch_size} must be <= proxy_images="
                              f"{self.proxy_images}")
        if not all(isinstance(n, str) and n for n in self.ignored):
            raise ConfigError(f"ignored={self.ignored!r} must be a list of module names (model.named_modules())")
        if not isinstance(self.train, dict):
            raise ConfigError(f"train={self.train!r} must be a mapping of `train` keys to override")
        fixed = sorted(set(self.train) & set(FINETUNE_FIXED))
        if fixed:
            raise ConfigError(f"train: {fixed} cannot be overridden here; set tdc.prune.finetune_steps / "
                              "tdc.prune.seed")

    def train_config(self, train_section: dict, seed: int) -> TrainConfig:
        """The TrainConfig of the post-pruning fine-tune: `train` + this section's overrides, finetune_steps, seed."""
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        reset = {k: v for k, v in FINETUNE_RESET.items() if k in fields}
        merged = {**dict(train_section or {}), **reset, **self.train, "steps": self.finetune_steps, "seed": seed}
        return parse(TrainConfig, merged, "tdc.prune.train")

    def search_settings(self) -> dict:
        """The settings that define a search: the memory bank's identity (not `rounds`: a longer search extends the
        bank; not the fine-tune settings)."""
        skip = {"rounds", "finetune_steps", "train"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


@dataclass
class PruneEvalConfig:
    """Wall-clock sampling throughput benchmark of `evaluate_pruned` (unified vs TDC vs pruned TDC)."""

    throughput_samples: int = 32  # images generated per model per repeat (batch min(sample.batch_size, this))
    throughput_repeats: int = 1  # interleaved repeats; the fastest is reported

    def __post_init__(self):
        _positive("throughput_samples", self.throughput_samples)
        _positive("throughput_repeats", self.throughput_repeats)
