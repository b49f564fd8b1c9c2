"""The pipeline's configuration: params.yaml (Hydra's composition of conf/) read, typed and validated in one pass.

`load_config("params.yaml")` is the one call a stage makes: it parses every section, rejects unknown top-level
sections, and checks the rules that span sections (the model builds for the data's images and the prediction's
output channels; timestep-sampler and momentum arguments; sampling steps <= T; the TDC groups and every fine-tune's
merged training settings), so any invalid setting stops the first stage that runs, before any work.

conf/ is the one source of default values; the dataclasses' defaults equal it (tests/test_config.py checks).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from .fields import choice, coerce, int_list, parse, positive
from .sections import (DATA_CONFIGS, MODEL_CONFIGS, ComparisonConfig, DataConfig, DiffusionConfig, DiTConfig,
                       EvalConfig, FeatNetConfig, SampleConfig, TrainConfig, UNetConfig, parse_data, parse_model)
from .tdc import (FINETUNE_FIXED, MODEL_NAMES, SIMILARITY_SIGNAL, ClusterConfig, ConsistencyConfig, FinetuneConfig,
                  ProfileConfig, PruneConfig, PruneEvalConfig, TdcConfig, segment_train_config)

__all__ = [
    "Config", "load_config", "load_params", "validate", "parse", "coerce", "choice", "positive", "int_list",
    "DataConfig", "DATA_CONFIGS", "MODEL_CONFIGS", "UNetConfig", "DiTConfig", "DiffusionConfig", "TrainConfig",
    "SampleConfig", "FeatNetConfig", "EvalConfig", "ComparisonConfig", "TdcConfig", "ProfileConfig", "ClusterConfig",
    "FinetuneConfig", "ConsistencyConfig", "PruneConfig", "PruneEvalConfig", "FINETUNE_FIXED", "MODEL_NAMES",
    "SIMILARITY_SIGNAL", "segment_train_config", "parse_data", "parse_model",
]


@dataclass
class Config:
    """Every section of params.yaml, typed. `raw` is the mapping as read (what MLflow logs as the run's params)."""

    data: DataConfig
    model: UNetConfig | DiTConfig
    diffusion: DiffusionConfig
    train: TrainConfig
    sample: SampleConfig
    eval: EvalConfig
    tdc: TdcConfig
    comparison: ComparisonConfig = field(default_factory=ComparisonConfig)
    raw: dict = field(default_factory=dict, repr=False)

    def section(self, name: str) -> dict:
        """Section `name` (dotted for sub-sections, e.g. 'tdc.prune') as a plain mapping, for logging."""
        node = self
        for key in name.split("."):
            node = getattr(node, key)
        return dataclasses.asdict(node)


SECTIONS = ("data", "model", "diffusion", "train", "sample", "eval", "tdc", "comparison")
REQUIRED = SECTIONS[:-1]


def load_params(path="params.yaml") -> dict:
    """params.yaml as a mapping; ConfigError (one line, with line and column) if missing or not valid YAML."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found; run `python -m stages.compose` to write it from conf/")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem} (tabs are not allowed for indentation); fix it "
                          "or recompose it with `python -m stages.compose`") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read ({e})") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections, found {type(params).__name__}")
    return params


def validate(params: dict, source: str = "params.yaml") -> Config:
    """Parse every section of a params mapping and check the rules that span sections; errors in the file's
    structure (sections unknown, missing, not mappings) name `source`, the file it was read from."""
    if not isinstance(params, dict):
        raise ConfigError(f"params: expected a mapping of sections, got {type(params).__name__}")
    unknown = sorted(map(str, set(params) - set(SECTIONS)))
    if unknown:
        raise ConfigError(f"{source} has unknown top-level section(s) {unknown!r:.200}; valid: {list(SECTIONS)}")
    missing = [s for s in REQUIRED if s not in params]
    if missing:
        raise ConfigError(f"{source} lacks section(s) {missing}; recompose it with `python -m stages.compose`")
    for name in (s for s in SECTIONS if s in params):
        if not isinstance(params[name], dict):
            raise ConfigError(f"{source}: section {name!r} is a {type(params[name]).__name__}, not a mapping of "
                              "settings; recompose it with `python -m stages.compose`")
    cfg = Config(data=parse_data(params["data"]), model=parse_model(params["model"]),
                 diffusion=parse(DiffusionConfig, params["diffusion"], "diffusion"),
                 train=parse(TrainConfig, params["train"], "train"),
                 sample=parse(SampleConfig, params["sample"], "sample"),
                 eval=parse(EvalConfig, params["eval"], "eval"), tdc=parse(TdcConfig, params["tdc"], "tdc"),
                 comparison=parse(ComparisonConfig, params.get("comparison", {}), "comparison"), raw=params)
    check_cross_sections(cfg)
    return cfg


def load_config(path="params.yaml") -> Config:
    """Read and validate the whole params.yaml: the first call of every stage."""
    return validate(load_params(path), str(path))


def check_cross_sections(cfg: Config) -> None:
    """The rules that need more than one section."""
    from ..diffusion import Diffusion  # validation only

    diffusion = Diffusion(**dataclasses.asdict(cfg.diffusion))
    check_model(dataclasses.asdict(cfg.model), cfg.data.image_size, cfg.data.channels, diffusion.out_channels_factor)
    check_train(cfg.train, diffusion, "train")
    T = cfg.diffusion.T
    if cfg.sample.steps > T:
        raise ConfigError(f"sample.steps={cfg.sample.steps} must be <= diffusion.T={T}")
    cfg.tdc.check_T(T)
    check_train(cfg.tdc.finetune.train_config(cfg.train, seed=0), diffusion, "tdc.finetune.train")
    check_train(cfg.tdc.prune.train_config(cfg.train, seed=0), diffusion, "tdc.prune.train")
    for name, spec in cfg.tdc.consistency.extra_models.items():
        if "model" in spec:
            check_model(dataclasses.asdict(parse_model(spec["model"])), cfg.data.image_size, cfg.data.channels,
                        diffusion.out_channels_factor, f"tdc.consistency.extra_models.{name}.model")


def check_model(model: dict, image_size: int, channels: int, out_factor: int = 1, where: str = "model") -> None:
    """Build the model on the meta device (no memory, no compute) to validate its settings for these images."""
    import torch

    from ..models import build_model  # validation only

    try:
        with torch.device("meta"):
            build_model(model, image_size, channels, out_channels=channels * out_factor)
    except ConfigError as e:
        raise ConfigError(str(e).replace("model", where, 1) if where != "model" else str(e)) from None
    except (TypeError, ValueError, RuntimeError, ZeroDivisionError) as e:
        raise ConfigError(f"{where}: invalid settings {model} ({type(e).__name__}: {e})") from None


def check_train(tcfg: TrainConfig, diffusion, where: str) -> None:
    """The timestep sampler and momentum-decay arguments are accepted by their classes."""
    import torch

    from ..optim_schedules import MomentumDecay  # validation only
    from ..timestep_samplers import build_timestep_sampler  # validation only

    try:
        build_timestep_sampler(tcfg.timestep_sampler, diffusion.T, seed=0, default_abar=diffusion.schedule.abar,
                               **tcfg.timestep_sampler_args)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except TypeError as e:
        raise ConfigError(f"{where}.timestep_sampler_args: {e}") from None
    if tcfg.momentum_decay != "none":
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=tcfg.lr, momentum=tcfg.beta1)
        args = {"total_steps": tcfg.steps, **tcfg.momentum_decay_args}
        try:
            MomentumDecay(opt, args.pop("total_steps"), tcfg.momentum_decay, **args)
        except TypeError as e:
            raise ConfigError(f"{where}.momentum_decay_args: {e}") from None
