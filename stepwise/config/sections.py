"""Typed sections of params.yaml: data, model, diffusion, train, sample, eval, comparison.

The default values here equal conf/'s (a test composes conf/ and compares): conf/ is the one place to change a
default; these only give the types and the rules. Registries are imported inside the checks, so importing this
module needs torch alone.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import ConfigError
from .fields import choice, device_name, parse, positive, unit_interval

PRECISIONS = ("fp32", "bf16")


# ---- data: one typed section per dataset (the keys its loader in stepwise/data.py takes) -------------------------
@dataclass
class DataConfig:
    """Fields every dataset has: its name and the image size/channels the prepared splits must have."""

    name: str = "fashion_mnist"
    image_size: int = 28
    channels: int = 1

    def __post_init__(self):
        for key in ("image_size", "channels"):
            positive(key, getattr(self, key))
        if self.channels not in (1, 3):
            raise ConfigError(f"channels={self.channels!r} must be 1 (grey) or 3 (RGB)")

    def loader_args(self) -> dict:
        """Keyword arguments of the dataset's loader (`stepwise.data.DATASETS[name]`)."""
        return dataclasses.asdict(self)


@dataclass
class FashionMnistConfig(DataConfig):
    """Fashion-MNIST (Xiao et al. 2017): local IDX files (root=auto: the Debian package, else data/raw)."""

    root: str = "auto"
    download: bool = False
    cache_dir: str = "data/raw"


@dataclass
class Cifar10Config(DataConfig):
    """CIFAR-10 through torchvision."""

    name: str = "cifar10"
    image_size: int = 32
    channels: int = 3
    root: str = "data/raw"
    download: bool = True


@dataclass
class ImageFolderConfig(DataConfig):
    """Any folder of class sub-folders of images, resized and center-cropped."""

    name: str = "imagefolder"
    image_size: int = 32
    channels: int = 3
    root: str = "data/images"
    test_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"test_fraction={self.test_fraction!r} must be in (0, 1)")


@dataclass
class SyntheticConfig(DataConfig):
    """A tiny generated set of four shape classes (tests and smoke runs)."""

    name: str = "synthetic"
    image_size: int = 16
    channels: int = 1
    num_train: int = 512
    num_test: int = 256
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        for key in ("num_train", "num_test"):
            positive(key, getattr(self, key))


DATA_CONFIGS = {"fashion_mnist": FashionMnistConfig, "cifar10": Cifar10Config, "imagefolder": ImageFolderConfig,
                "synthetic": SyntheticConfig}


def parse_data(section) -> DataConfig:
    """The typed data section for section['name']; ConfigError listing the datasets otherwise."""
    name = section.get("name") if isinstance(section, dict) else None
    if name not in DATA_CONFIGS:
        raise ConfigError(f"data.name={name!r} is not a dataset; valid: {sorted(DATA_CONFIGS)}")
    return parse(DATA_CONFIGS[name], section, "data")


# ---- model: one typed section per architecture (the arguments of its class in stepwise/models/) -----------------
@dataclass
class UNetConfig:
    """DDPM/ADM-style UNet (stepwise/models/unet.py)."""

    name: str = "unet"
    base_channels: int = 16
    channel_mult: list = field(default_factory=lambda: [1, 2, 4])
    num_res_blocks: int = 1
    attn_resolutions: list = field(default_factory=lambda: [7])
    dropout: float = 0.0
    head_dim: int = 32


@dataclass
class DiTConfig:
    """DiT with adaLN-Zero blocks (Peebles & Xie 2023; stepwise/models/dit.py)."""

    name: str = "dit"
    patch_size: int = 2
    hidden_size: int = 192
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 4.0


MODEL_CONFIGS = {"unet": UNetConfig, "dit": DiTConfig}


def parse_model(section) -> UNetConfig | DiTConfig:
    """The typed model section for section['name'] (its values are checked when the model is built)."""
    name = section.get("name") if isinstance(section, dict) else None
    if name not in MODEL_CONFIGS:
        raise ConfigError(f"model.name={name!r} is not a model; valid: {sorted(MODEL_CONFIGS)}")
    return parse(MODEL_CONFIGS[name], section, "model")


# ---- diffusion, training, sampling, evaluation --------------------------------------------------------------------
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
        from ..diffusion import PREDICTION_TYPES, Diffusion  # validation only
        from ..loss_weights import LOSS_WEIGHTS  # validation only
        from ..mixed_x0 import MIXINGS  # validation only
        from ..schedules import SCHEDULES  # validation only

        choice(self.schedule, SCHEDULES, "schedule")
        choice(self.prediction, PREDICTION_TYPES, "prediction")
        choice(self.loss_weight, LOSS_WEIGHTS, "loss_weight")
        choice(self.mixing, MIXINGS, "mixing")
        if not 2 <= self.T <= 100_000:
            raise ConfigError(f"T={self.T} must be in [2, 100000]")
        Diffusion(**dataclasses.asdict(self))  # validates loss_weight_args / mixing_args with their own messages


@dataclass
class TrainConfig:
    """Optimisation of the denoiser (AdamW, Loshchilov & Hutter 2019; EMA of weights, DDPM App. B)."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    ema_warmup_steps: int = 100  # the EMA decay warms up to ema_decay over this many steps (stepwise/ema.py)
    ema_warmup_power: float = 0.667
    precision: str = "fp32"
    seed: int = 0
    device: str = "auto"
    nproc: int = 1  # > 1: data-parallel over this many processes (torchrun + DDP; one GPU each, or gloo on CPU)
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    loss_bins: int = 10
    timestep_sampler: str = "uniform"
    timestep_sampler_args: dict = field(default_factory=dict)
    momentum_decay: str = "none"
    momentum_decay_args: dict = field(default_factory=dict)
    sampler_feedback: str = "loss"  # what loss-aware timestep samplers learn from: the optimised loss, or the MSE
    eval_steps: list = field(default_factory=list)  # checkpoints kept for the FID-vs-iterations curve

    def __post_init__(self):
        from ..optim_schedules import MOMENTUM_FORMS  # validation only
        from ..timestep_samplers import TIMESTEP_SAMPLERS  # validation only

        for key in ("steps", "batch_size", "ckpt_every", "log_every", "loss_bins", "keep_checkpoints", "nproc"):
            positive(key, getattr(self, key))
        positive("lr", self.lr)
        for key in ("weight_decay", "warmup_steps", "grad_clip", "ema_warmup_steps"):
            positive(key, getattr(self, key), allow_zero=True)
        for key in ("beta1", "beta2", "ema_decay"):
            unit_interval(key, getattr(self, key))
        if self.batch_size % self.nproc:
            raise ConfigError(f"batch_size={self.batch_size} must be divisible by nproc={self.nproc}")
        if self.ckpt_every % self.log_every:
            raise ConfigError(f"ckpt_every={self.ckpt_every} must be a multiple of log_every={self.log_every}")
        positive("ema_warmup_power", self.ema_warmup_power)
        choice(self.sampler_feedback, ("loss", "mse"), "sampler_feedback")
        choice(self.precision, PRECISIONS, "precision")
        choice(self.timestep_sampler, TIMESTEP_SAMPLERS, "timestep_sampler")
        choice(self.momentum_decay, ("none", *MOMENTUM_FORMS), "momentum_decay")
        for k in self.eval_steps:
            if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= self.steps or k % self.log_every:
                raise ConfigError(f"eval_steps entry {k!r} must be an integer in (0, steps={self.steps}] and a "
                                  f"multiple of log_every={self.log_every}")
        device_name("device", self.device)


@dataclass
class SampleConfig:
    """Reverse-process sampling for evaluation."""

    sampler: str = "ddim"
    steps: int = 25
    eta: float | None = None
    seed: int = 0
    batch_size: int = 250
    use_ema: bool = True
    grid_size: int = 8

    def __post_init__(self):
        from ..sampling import SAMPLERS  # validation only

        choice(self.sampler, SAMPLERS, "sampler")
        for key in ("steps", "batch_size", "grid_size"):
            positive(key, getattr(self, key))
        if self.eta is not None:
            if isinstance(self.eta, bool) or not isinstance(self.eta, (int, float)):
                raise ConfigError(f"eta={self.eta!r} must be null or a number >= 0")
            if self.eta < 0:
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
            positive(key, getattr(self, key))
        positive("lr", self.lr)
        positive("weight_decay", self.weight_decay, allow_zero=True)
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
    bootstrap: int = 200  # resamples of the bootstrap intervals over samples (featnet metrics and differences); 0: off
    featnet: FeatNetConfig = field(default_factory=FeatNetConfig)

    def __post_init__(self):
        positive("num_samples", self.num_samples)
        positive("kid_subset_size", self.kid_subset_size)
        positive("curve_samples", self.curve_samples, allow_zero=True)
        positive("bootstrap", self.bootstrap, allow_zero=True)
        if self.curve_samples == 1:
            raise ConfigError("curve_samples=1 must be 0 (off) or >= 2 for FID")
        if self.num_samples < 2:
            raise ConfigError(f"num_samples={self.num_samples} must be >= 2 for FID")
        if isinstance(self.featnet, dict):
            self.featnet = parse(FeatNetConfig, self.featnet, "featnet")
        elif not isinstance(self.featnet, FeatNetConfig):
            raise ConfigError(f"featnet={self.featnet!r} must be a mapping")


@dataclass
class ComparisonConfig:
    """Labels of a strategy-comparison run (conf/strategy/*.yaml sets them; read by `python -m stages.compare`)."""

    strategy: str = "uniform"

    def __post_init__(self):
        if not self.strategy or not isinstance(self.strategy, str):
            raise ConfigError(f"strategy={self.strategy!r} must be a non-empty name")
