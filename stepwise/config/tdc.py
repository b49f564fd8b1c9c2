"""Typed `tdc` section: TDC (arXiv 2312.13307) profile -> groups -> experts -> pruning, and the consistency probe.

Each stage depends on only the sub-section it reads (`tdc.profile`, `tdc.cluster`, `tdc.finetune`, `tdc.prune`, ...),
so a change to one never invalidates the others. Default values equal conf/tdc/default.yaml (a test checks).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..errors import ConfigError
from .fields import choice, device_name, int_list, parse, positive
from .sections import TrainConfig

MODEL_NAMES = ("unified", "tdc", "continued")  # sample sets the consistency stage always has
SIMILARITY_SIGNAL = "similarity"  # pseudo-column: rows of the gradient-similarity matrix
# TrainConfig keys a fine-tune may not override: its length and seed come from its own section.
FINETUNE_FIXED = ("steps", "seed")
FINETUNE_INITS = ("raw", "ema")
PRUNE_INITS = ("raw", "ema")  # which weights of the expert file are pruned: raw or EMA
FINETUNE_RESET = {"eval_steps": []}  # pretrain-only TrainConfig settings a fine-tune does not inherit


def segment_warmup(fraction: float, schedule_steps: int) -> int:
    """Warm-up steps of a training segment: ceil(fraction x schedule_steps), at least 1 when fraction > 0."""
    return math.ceil(fraction * schedule_steps)


def segment_train_config(train: TrainConfig | dict, overrides: dict, steps: int, seed: int, where: str,
                         warmup_fraction: float = 0.0, schedule_steps: int | None = None) -> TrainConfig:
    """The TrainConfig of one training segment (expert fine-tune, continued baseline, pruned fine-tune).

    The `train` section with the segment's overrides, its own length and seed, pretrain-only settings reset, and
    its own schedule: the lr warm-up and the EMA warm-up are ceil(warmup_fraction x schedule_steps) (schedule_steps
    defaults to steps; the continued baseline passes the experts' steps so that it gets exactly their schedule)
    unless the overrides set them."""
    base = dataclasses.asdict(train) if isinstance(train, TrainConfig) else dict(train or {})
    warm = segment_warmup(warmup_fraction, schedule_steps or steps)
    schedule = {"warmup_steps": warm, "ema_warmup_steps": warm}
    return parse(TrainConfig, {**base, **FINETUNE_RESET, **schedule, **overrides, "steps": steps, "seed": seed}, where)


def _check_overrides(overrides, where: str) -> None:
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}={overrides!r} must be a mapping of `train` keys to override")
    fixed = sorted(set(overrides) & set(FINETUNE_FIXED))
    if fixed:
        raise ConfigError(f"{where}: {fixed} cannot be overridden here; set the section's own steps / seed")


@dataclass
class ProfileConfig:
    """Per-timestep difficulty profile of the unified model (Kim et al., arXiv 2403.10348; TDC, arXiv 2312.13307)."""

    num_timesteps: int = 25  # K grid points, bin centres of K equal t-bins
    num_examples: int = 128  # fixed probe examples for the loss mean/variance
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
            positive(key, getattr(self, key))
        positive("mc_samples", self.mc_samples, allow_zero=True)
        if not 0 < self.convergence_tolerance < 1:
            raise ConfigError(f"convergence_tolerance={self.convergence_tolerance} must be in (0, 1)")
        if not 0 <= self.convergence_smoothing < 1:
            raise ConfigError(f"convergence_smoothing={self.convergence_smoothing} must be in [0, 1)")
        device_name("device", self.device)

@dataclass
class ClusterConfig:
    """K contiguous timestep groups (TDC stage 2 partition, arXiv 2312.13307; uniform clusters, arXiv 2403.10348)."""

    method: str = "equal_snr_db"  # uniform | equal_snr_db | dp | manual
    signal: list = field(default_factory=lambda: ["log_loss_mean"])  # dp: profile.csv columns (or 'similarity')
    standardise: bool = True  # dp: z-score each signal column so that columns weigh equally
    snr_db_range: list | None = None  # equal_snr_db: [lo, hi] dB range to split (SNR_dB clamped to it)
    boundaries: list | None = None  # manual: [0, b_1, ..., T]

    def __post_init__(self):
        from ..grouping import GROUPING_METHODS  # validation only

        choice(self.method, (*GROUPING_METHODS, "manual"), "method")
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
            self.boundaries = int_list(self.boundaries, "boundaries")
        elif self.boundaries is not None:
            raise ConfigError(f"boundaries are only used by method=manual, not {self.method!r}; remove them")

@dataclass
class FinetuneConfig:
    """Per-group expert fine-tuning from the unified model (TDC stage 2, arXiv 2312.13307)."""

    steps: int = 100  # per expert; the compute-matched unified baseline runs num_groups x steps
    seed: int = 1  # run i's train.seed: derive_seed(seed, i) mod 2^31 (-1: the continued baseline)
    init: str = "ema"  # which unified weights the trainable copy starts from: raw | ema
    ema_start: str = "init"  # the copy's weight EMA starts from: init (its starting weights) | ema (unified EMA)
    warmup_fraction: float = 0.1  # lr and EMA warm-up of each fine-tune: ceil(fraction x steps)
    train: dict = field(default_factory=lambda: {"ema_decay": 0.95})  # overrides of the `train` section

    def __post_init__(self):
        positive("steps", self.steps)
        choice(self.init, FINETUNE_INITS, "init")
        choice(self.ema_start, ("init", "ema"), "ema_start")
        if not 0 <= self.warmup_fraction <= 1:
            raise ConfigError(f"warmup_fraction={self.warmup_fraction!r} must be in [0, 1]")
        _check_overrides(self.train, "train")

    def train_config(self, train: TrainConfig | dict, seed: int, steps: int | None = None) -> TrainConfig:
        """The TrainConfig of one fine-tuning run (an expert, or with steps = K x steps the continued baseline):
        `train` with this section's overrides, length, seed, and the experts' warm-up schedule."""
        return segment_train_config(train, self.train, steps or self.steps, seed, "tdc.finetune.train",
                                    self.warmup_fraction, schedule_steps=self.steps)

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
            positive(key, getattr(self, key))
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
    warmup_fraction: float = 0.1  # lr and EMA warm-up of the post-pruning fine-tune: ceil(fraction x finetune_steps)
    init: str = "ema"  # prune the expert's EMA weights (what sampling uses) or its raw weights
    train: dict = field(default_factory=lambda: {"ema_decay": 0.95})  # overrides of `train` for the fine-tune
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.k <= 1:
            raise ConfigError(f"k={self.k!r} must lie in (0, 1]: the smallest expert's fraction of the full MACs")
        from ..pruning import DIRECTIONS, IMPORTANCES, PROPOSERS  # validation only

        choice(self.direction, DIRECTIONS, "direction")
        choice(self.importance, IMPORTANCES, "importance")
        choice(self.proposer, PROPOSERS, "proposer")
        choice(self.init, PRUNE_INITS, "init")
        for key in ("rounds", "proxy_batch_size", "proxy_eval_points", "proxy_images", "grad_images", "t_stride",
                    "finetune_steps"):
            positive(key, getattr(self, key))
        positive("proxy_steps", self.proxy_steps, allow_zero=True)
        positive("proxy_lr", self.proxy_lr)
        for key in ("max_ratio", "tol", "thr"):
            if not 0 < getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)!r} must lie in (0, 1)")
        if self.proxy_batch_size > self.proxy_images:
            raise ConfigError(f"proxy_batch_size={self.proxy_batch_size} must be <= proxy_images="
                              f"{self.proxy_images}")
        if not all(isinstance(n, str) and n for n in self.ignored):
            raise ConfigError(f"ignored={self.ignored!r} must be a list of module names (model.named_modules())")
        if not 0 <= self.warmup_fraction <= 1:
            raise ConfigError(f"warmup_fraction={self.warmup_fraction!r} must be in [0, 1]")
        _check_overrides(self.train, "train")

    def train_config(self, train: TrainConfig | dict, seed: int) -> TrainConfig:
        """The TrainConfig of the post-pruning fine-tune: `train` + this section's overrides, finetune_steps, seed,
        its own warm-up schedule."""
        return segment_train_config(train, self.train, self.finetune_steps, seed, "tdc.prune.train",
                                    self.warmup_fraction)

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
        positive("throughput_samples", self.throughput_samples)
        positive("throughput_repeats", self.throughput_repeats)


@dataclass
class TdcConfig:
    """The whole `tdc` section. num_groups and groups_list must agree: groups_list is the foreach list of the
    finetune@i / prune@i stages in dvc.yaml (DVC cannot compute range(K))."""

    num_groups: int = 4
    groups_list: list = field(default_factory=lambda: [0, 1, 2, 3])
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    prune_eval: PruneEvalConfig = field(default_factory=PruneEvalConfig)

    def __post_init__(self):
        K = self.num_groups
        positive("num_groups", K)
        if int_list(self.groups_list, "groups_list") != list(range(K)):
            raise ConfigError(f"groups_list={self.groups_list!r} must be {list(range(K))} for num_groups={K}: "
                              f"dvc.yaml runs one finetune@i per entry; set both, e.g. -S tdc.num_groups={K} "
                              f"-S 'tdc.groups_list={list(range(K))}'")
        for name, cls in (("profile", ProfileConfig), ("cluster", ClusterConfig), ("finetune", FinetuneConfig),
                          ("consistency", ConsistencyConfig), ("prune", PruneConfig),
                          ("prune_eval", PruneEvalConfig)):
            value = getattr(self, name)
            if not isinstance(value, cls):
                setattr(self, name, parse(cls, value, name))

    def check_T(self, T: int) -> None:
        """Rules that need diffusion.T: each group needs a timestep; manual boundaries tile [0, T) in K groups."""
        if self.num_groups > T:
            raise ConfigError(f"tdc.num_groups={self.num_groups} must be <= diffusion.T={T} (each group needs one "
                              "timestep)")
        b = self.cluster.boundaries
        if self.cluster.method == "manual" and (len(b) != self.num_groups + 1 or b[0] != 0 or b[-1] != T
                                                or any(x >= y for x, y in zip(b, b[1:]))):
            raise ConfigError(f"tdc.cluster.boundaries={b} must be {self.num_groups + 1} increasing integers from 0 "
                              f"to diffusion.T={T} (num_groups={self.num_groups})")
