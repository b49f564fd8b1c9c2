"""Typed, validated views of the params.yaml sections. Invalid settings fail here, with one message, before any work.

The defaults below are the paper-faithful ones; conf/ (Hydra) only overrides them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import ConfigError
from .diffusion import PREDICTION_TYPES, Diffusion
from .loss_weights import LOSS_WEIGHTS
from .mixed_x0 import MIXINGS
from .optim_schedules import MOMENTUM_FORMS
from .sampling import SAMPLERS
from .schedules import SCHEDULES
from .timestep_samplers import TIMESTEP_SAMPLERS

PRECISIONS = ("fp32", "bf16")


def parse(cls, section: dict | None, name: str):
    """Build dataclass `cls` from a params section, rejecting unknown keys and wrongly typed values."""
    if not isinstance(section, dict):
        raise ConfigError(f"{name}: expected a mapping of settings, got {type(section).__name__} {section!r}"[:300])
    section = dict(section)
    valid = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - set(valid))
    if unknown:
        raise ConfigError(f"{name}: unknown key(s) {unknown}; valid: {sorted(valid)}")
    kwargs = {}
    for key, value in section.items():
        kind = {"dict": dict, "list": list}.get(str(valid[key].type))
        if kind is not None and not isinstance(value, kind):
            raise ConfigError(f"{name}.{key}={value!r} must be a {'mapping' if kind is dict else 'list'}")
        default = valid[key].default
        kwargs[key] = _coerce(value, None if default is dataclasses.MISSING else default, f"{name}.{key}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{name}: {e}") from None


def _coerce(value, default, where: str):
    """Coerce YAML scalars to the type of the field's default (int -> float allowed; bool never from int)."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}={value!r} must be true or false")
        return value
    if isinstance(default, (int, float)) and not isinstance(value, bool) and isinstance(value, (int, float)):
        if isinstance(default, int) and not isinstance(default, bool) and float(value) != int(value):
            raise ConfigError(f"{where}={value!r} must be an integer")
        return type(default)(value)
    if isinstance(default, (int, float)):
        raise ConfigError(f"{where}={value!r} must be a number")
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{where}={value!r} must be a string")
    return value


def _choice(value, choices, where: str):
    if value not in choices:
        raise ConfigError(f"{where}={value!r} is not valid; valid: {sorted(choices)}")


def _positive(where: str, value, allow_zero: bool = False):
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{where}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


@dataclass
class DiffusionConfig:
    """Forward process and prediction type."""

    schedule: str = "linear"
    T: int = 1000
    prediction: str = "eps"
    loss_weight: str = "none"
    loss_weight_args: dict = field(default_factory=dict)
    mixing: str = "learned"
    mixing_args: dict = field(default_factory=dict)

    def __post_init__(self):
        _choice(self.schedule, SCHEDULES, "schedule")
        _choice(self.prediction, PREDICTION_TYPES, "prediction")
        _choice(self.loss_weight, LOSS_WEIGHTS, "loss_weight")
        _choice(self.mixing, MIXINGS, "mixing")
        if not 2 <= self.T <= 100_000:
            raise ConfigError(f"T={self.T} must be in [2, 100000]")
        Diffusion(**dataclasses.asdict(self))  # validates loss_weight_args / mixing_args with their own messages


@dataclass
class TrainConfig:
    """Optimisation of the denoiser (AdamW, Loshchilov & Hutter 2019; EMA of weights, DDPM App. B)."""

    steps: int = 1000
    batch_size: int = 128
    lr: float = 2e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True
    precision: str = "fp32"
    seed: int = 0
    device: str = "auto"
    nproc: int = 1  # > 1: data-parallel over this many processes (torchrun + DDP; one GPU each, or gloo on CPU)
    ckpt_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    loss_bins: int = 10
    timestep_sampler: str = "uniform"
    timestep_sampler_args: dict = field(default_factory=dict)
    momentum_decay: str = "none"
    momentum_decay_args: dict = field(default_factory=dict)
    eval_steps: list = field(default_factory=list)  # checkpoints kept for the FID-vs-iterations curve

    def __post_init__(self):
        for key in ("steps", "batch_size", "ckpt_every", "log_every", "loss_bins", "keep_checkpoints", "nproc"):
            _positive(key, getattr(self, key))
        _positive("lr", self.lr)
        for key in ("weight_decay", "warmup_steps", "grad_clip"):
            _positive(key, getattr(self, key), allow_zero=True)
        for key in ("beta1", "beta2", "ema_decay"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)!r} must be in [0, 1)")
        if self.batch_size % self.nproc:
            raise ConfigError(f"batch_size={self.batch_size} must be divisible by nproc={self.nproc}")
        if self.ckpt_every % self.log_every:
            raise ConfigError(f"ckpt_every={self.ckpt_every} must be a multiple of log_every={self.log_every}")
        _choice(self.precision, PRECISIONS, "precision")
        _choice(self.timestep_sampler, TIMESTEP_SAMPLERS, "timestep_sampler")
        _choice(self.momentum_decay, ("none", *MOMENTUM_FORMS), "momentum_decay")
        for k in self.eval_steps:
            if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= self.steps or k % self.log_every:
                raise ConfigError(f"eval_steps entry {k!r} must be an integer in (0, steps={self.steps}] and a "
                                  f"multiple of log_every={self.log_every}")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ConfigError(f"device={self.device!r} must be 'auto', 'cpu' or 'cuda[:N]'")


@dataclass
class SampleConfig:
    """Reverse-process sampling for evaluation."""

    sampler: str = "ddim"
    steps: int = 50
    eta: float | None = None
    seed: int = 0
    batch_size: int = 256
    use_ema: bool = True
    grid_size: int = 8

    def __post_init__(self):
        _choice(self.sampler, SAMPLERS, "sampler")
        for key in ("steps", "batch_size", "grid_size"):
            _positive(key, getattr(self, key))
        if self.eta is not None and self.eta < 0:
            raise ConfigError(f"eta={self.eta!r} must be >= 0")


@dataclass
class FeatNetConfig:
    """The small classifier trained on the dataset whose penultimate features drive offline FID (AdamW, one-cycle)."""

    epochs: int = 3
    batch_size: int = 128
    lr: float = 3e-3  # peak learning rate of the one-cycle schedule
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.25  # share of the steps over which the learning rate rises to lr
    width: int = 16
    feature_dim: int = 128
    seed: int = 0

    def __post_init__(self):
        for key in ("epochs", "batch_size", "width", "feature_dim"):
            _positive(key, getattr(self, key))
        _positive("lr", self.lr)
        _positive("weight_decay", self.weight_decay, allow_zero=True)
        if not 0 < self.warmup_fraction < 1:
            raise ConfigError(f"warmup_fraction={self.warmup_fraction} must lie strictly between 0 and 1")


@dataclass
class EvalConfig:
    """Sample-quality metrics through torch-fidelity against the test split."""

    num_samples: int = 1000
    fid: bool = True
    kid: bool = True
    prc: bool = True
    kid_subset_size: int = 1000
    inception: str = "auto"
    curve_samples: int = 0  # >0: FID with this many samples at every kept training checkpoint (FID-vs-iterations)
    featnet: dict = field(default_factory=dict)

    def __post_init__(self):
        _positive("num_samples", self.num_samples)
        _positive("kid_subset_size", self.kid_subset_size)
        _positive("curve_samples", self.curve_samples, allow_zero=True)
        if self.curve_samples == 1:
            raise ConfigError("curve_samples=1 must be 0 (off) or >= 2 for FID")
        if self.num_samples < 2:
            raise ConfigError(f"num_samples={self.num_samples} must be >= 2 for FID")
        self.featnet = parse(FeatNetConfig, self.featnet, "featnet")
