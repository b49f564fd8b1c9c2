"""Typed, validated views of the params.yaml `tdc` section (TDC, arXiv 2312.13307; Kim et al., arXiv 2403.10348).

Each stage parses only the sub-section it depends on (`tdc.profile`, `tdc.cluster`, `tdc.finetune`,
`tdc.consistency`, plus `tdc.num_groups` / `tdc.groups_list`), so a change to one never invalidates the others.
Defaults are the papers' where they state one, else ours (docs/methods.md says which).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .config import TrainConfig, _choice, _positive, parse
from .errors import ConfigError
from .grouping import GROUPING_METHODS

CLUSTER_METHODS = (*GROUPING_METHODS, "manual")
MODEL_NAMES = ("unified", "tdc", "continued")  # sample sets the consistency stage always has
SIMILARITY_SIGNAL = "similarity"  # pseudo-column: rows of the gradient-similarity matrix
# TrainConfig keys a fine-tune may not override: its length is tdc.finetune.steps, its seed is derived per run.
FINETUNE_FIXED = ("steps", "seed")
FINETUNE_INITS = ("raw", "ema")
FINETUNE_RESET = {"eval_steps": []}  # pretrain-only TrainConfig settings a fine-tune does not inherit


def _int_list(value, where: str) -> list[int]:
    """`value` as a list of ints, else ConfigError."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{where}={value!r} must be a list of integers")
    return [int(v) for v in value]


def num_groups(tdc: dict, T: int | None = None) -> int:
    """tdc.num_groups after checking that tdc.groups_list == [0, ..., num_groups-1] (the `finetune` foreach list)."""
    if not isinstance(tdc, dict) or "num_groups" not in tdc or "groups_list" not in tdc:
        raise ConfigError("tdc: needs 'num_groups' and 'groups_list' (the foreach list of the finetune stage)")
    K = tdc["num_groups"]
    if not isinstance(K, int) or isinstance(K, bool) or K < 1:
        raise ConfigError(f"tdc.num_groups={K!r} must be an integer >= 1")
    if T is not None and K > T:
        raise ConfigError(f"tdc.num_groups={K} must be <= diffusion.T={T} (each group needs one timestep)")
    if _int_list(tdc["groups_list"], "tdc.groups_list") != list(range(K)):
        raise ConfigError(f"tdc.groups_list={tdc['groups_list']!r} must be {list(range(K))} for num_groups={K}: "
                          f"dvc.yaml runs one finetune@i per entry; set both, e.g. -S tdc.num_groups={K} "
                          f"-S 'tdc.groups_list={list(range(K))}'")
    return K


@dataclass
class ProfileConfig:
    """Per-timestep difficulty profile of the unified model (Kim et al., arXiv 2403.10348; TDC, arXiv 2312.13307)."""

    num_timesteps: int = 50  # K grid points, bin centres of K equal t-bins
    num_examples: int = 256  # fixed probe examples for the loss mean/variance
    batch_size: int = 256
    grad_examples: int = 32  # probe examples per gradient in the task-similarity matrix
    grad_max_mib: int = 4096  # refuse a similarity matrix whose K x params float64 gradients exceed this
    mc_samples: int = 0  # Monte-Carlo relative entropy draws per t (0: closed-form Gaussian fit only)
    mc_images: int = 500  # images forming the empirical mixture of the MC estimate
    convergence_tolerance: float = 0.1
    convergence_smoothing: float = 0.8
    use_ema: bool = True
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        for key in ("num_timesteps", "num_examples", "batch_size", "grad_examples", "grad_max_mib", "mc_images"):
            _positive(key, getattr(self, key))
        _positive("mc_samples", self.mc_samples, allow_zero=True)
        if not 0 < self.convergence_tolerance < 1:
            raise ConfigError(f"convergence_tolerance={self.convergence_tolerance} must be in (0, 1)")
        if not 0 <= self.convergence_smoothing < 1:
            raise ConfigError(f"convergence_smoothing={self.convergence_smoothing} must be in [0, 1)")
        _device(self.device)


@dataclass
class ClusterConfig:
    """K contiguous timestep groups (TDC stage 2 partition, arXiv 2312.13307; uniform clusters, arXiv 2403.10348)."""

    method: str = "equal_snr_db"  # uniform | equal_snr_db | dp | manual
    signal: list = field(default_factory=lambda: ["log_loss_mean"])  # dp: profile.csv columns (or 'similarity')
    standardise: bool = True  # dp: z-score each signal column so that columns weigh equally
    snr_db_range: list | None = None  # equal_snr_db: [lo, hi] dB range to split (SNR_dB clamped to it)
    boundaries: list | None = None  # manual: [0, b_1, ..., T]

    def __post_init__(self):
        _choice(self.method, CLUSTER_METHODS, "method")
        if isinstance(self.signal, str):
            self.signal = [self.signal]
        if not isinstance(self.signal, list) or not self.signal or not all(isinstance(s, str) for s in self.signal):
            raise ConfigError(f"signal={self.signal!r} must be a non-empty list of profile.csv column names")
        if self.snr_db_range is not None:
            r = self.snr_db_range
            numbers = isinstance(r, list) and len(r) == 2 and all(isinstance(v, (int, float)) for v in r)
            if not (numbers and r[0] < r[1]):
                raise ConfigError(f"snr_db_range={r!r} must be [low_dB, high_dB] with low < high")
        if self.method == "manual":
            if self.boundaries is None:
                raise ConfigError("method=manual needs boundaries: [0, b_1, ..., T]")
            self.boundaries = _int_list(self.boundaries, "boundaries")
        elif self.boundaries is not None:
            raise ConfigError(f"boundaries are only used by method=manual, not {self.method!r}; remove them")


@dataclass
class FinetuneConfig:
    """Per-group expert fine-tuning from the unified model (TDC stage 2, arXiv 2312.13307)."""

    steps: int = 200  # per expert; the compute-matched unified baseline runs num_groups x steps
    seed: int = 1  # run i's train.seed: derive_seed(seed, i) mod 2^31 (-1: the continued baseline)
    init: str = "raw"  # which unified weights the trainable copy starts from: raw | ema
    train: dict = field(default_factory=dict)  # overrides of the `train` section: lr, batch_size, timestep_sampler...

    def __post_init__(self):
        _positive("steps", self.steps)
        _choice(self.init, FINETUNE_INITS, "init")
        if not isinstance(self.train, dict):
            raise ConfigError(f"train={self.train!r} must be a mapping of `train` keys to override")
        fixed = sorted(set(self.train) & set(FINETUNE_FIXED))
        if fixed:
            raise ConfigError(f"train: {fixed} cannot be overridden here; set tdc.finetune.steps / tdc.finetune.seed")

    def train_config(self, train_section: dict, seed: int, steps: int | None = None) -> TrainConfig:
        """The TrainConfig of one fine-tuning run: `train` with this section's overrides, length and seed.

        Pretrain-only settings (FINETUNE_RESET, e.g. the FID-curve checkpoint steps) are reset unless overridden.
        """
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        reset = {k: v for k, v in FINETUNE_RESET.items() if k in fields}
        merged = {**dict(train_section or {}), **reset, **self.train, "steps": steps or self.steps, "seed": seed}
        return parse(TrainConfig, merged, "tdc.finetune.train")


@dataclass
class ConsistencyConfig:
    """Consistency-phenomenon probe of the trained models (Xu et al., arXiv 2404.07946)."""

    num_samples: int = 64  # pairs per comparison (the first num_samples of the evaluation sample sets)
    pairs: list = field(default_factory=lambda: [["unified", "tdc"], ["unified", "continued"], ["tdc", "continued"]])
    split_pairs: list = field(default_factory=lambda: [["unified", "tdc"]])  # (a, b): a for t >= s, b below
    split_fractions: list = field(default_factory=lambda: [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])  # s = round(f T)
    feature_distance: bool = True  # FeatNet feature L2 (perceptual proxy)
    window_size: int = 11  # SSIM Gaussian window (Wang et al. 2004)
    grid_pairs: int = 8  # sample pairs drawn in each comparison grid
    extra_models: dict = field(default_factory=dict)  # name -> {seed: int, model: {...}}: trained here from scratch

    def __post_init__(self):
        for key in ("num_samples", "window_size", "grid_pairs"):
            _positive(key, getattr(self, key))
        if self.window_size % 2 == 0:
            raise ConfigError(f"window_size={self.window_size} must be odd")
        if not isinstance(self.extra_models, dict):
            raise ConfigError(f"extra_models={self.extra_models!r} must be a mapping name -> {{seed, model}}")
        for name, spec in self.extra_models.items():
            if name in MODEL_NAMES or not isinstance(name, str) or not name.isidentifier():
                raise ConfigError(f"extra_models: name {name!r} must be an identifier other than {list(MODEL_NAMES)}")
            if not isinstance(spec, dict) or set(spec) - {"seed", "model"}:
                raise ConfigError(f"extra_models.{name}={spec!r} must be a mapping with keys 'seed' and/or 'model'")
            if "seed" in spec and (not isinstance(spec["seed"], int) or isinstance(spec["seed"], bool)):
                raise ConfigError(f"extra_models.{name}.seed={spec['seed']!r} must be an integer")
            if "model" in spec and not isinstance(spec["model"], dict):
                raise ConfigError(f"extra_models.{name}.model={spec['model']!r} must be a model config mapping")
        names = set(MODEL_NAMES) | set(self.extra_models)
        for key in ("pairs", "split_pairs"):
            value = getattr(self, key)
            ok = isinstance(value, list) and all(isinstance(p, list) and len(p) == 2 for p in value)
            if not ok:
                raise ConfigError(f"{key}={value!r} must be a list of [model_a, model_b] pairs")
            for a, b in value:
                unknown = sorted({a, b} - names)
                if unknown:
                    raise ConfigError(f"{key}: unknown model(s) {unknown}; known: {sorted(names)} (add others "
                                      f"under extra_models)")
        fr = self.split_fractions
        if not isinstance(fr, list) or not fr or not all(isinstance(f, (int, float)) and 0 <= f <= 1 for f in fr):
            raise ConfigError(f"split_fractions={fr!r} must be a non-empty list of numbers in [0, 1]")
        if self.split_pairs == [] and self.pairs == []:
            raise ConfigError("pairs and split_pairs are both empty: nothing to compare")

    def split_timesteps(self, T: int) -> list[int]:
        """The distinct split steps s = round(f T) in increasing order."""
        return sorted({math.floor(f * T + 0.5) for f in self.split_fractions})


def _device(name: str) -> None:
    if not (name in ("auto", "cpu") or name.startswith("cuda")):
        raise ConfigError(f"device={name!r} must be 'auto', 'cpu' or 'cuda[:N]'")
