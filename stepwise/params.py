"""Validate a whole params.yaml (or some of its sections) before any expensive work: one ConfigError, one message."""
from __future__ import annotations

import inspect

import torch

from .config import DiffusionConfig, EvalConfig, SampleConfig, TrainConfig, parse
from .data import DATASETS
from .diffusion import Diffusion
from .errors import ConfigError
from .models import build_model
from .optim_schedules import MomentumDecay

SECTIONS = ("data", "model", "diffusion", "train", "sample", "eval")


def check_data(cfg: dict) -> dict:
    """data.name is a known dataset, its keys are ones the loader takes, image_size/channels are sane."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"data: expected a mapping, got {type(cfg).__name__}")
    name = cfg.get("name")
    if name not in DATASETS:
        raise ConfigError(f"data.name={name!r} is not a dataset; valid: {sorted(DATASETS)}")
    valid = set(inspect.signature(DATASETS[name]).parameters) | {"name", "image_size", "channels"}
    unknown = sorted(set(cfg) - valid)
    if unknown:
        raise ConfigError(f"data.name={name!r} takes no key(s) {unknown}; valid: {sorted(valid)}")
    defaults = {k: p.default for k, p in inspect.signature(DATASETS[name]).parameters.items()}
    for key, value in cfg.items():
        default = defaults.get(key, inspect.Parameter.empty)
        if default is inspect.Parameter.empty or default is None:
            continue
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"data.{key}={value!r} must be true or false")
        if isinstance(default, (int, float)) and not isinstance(default, bool) and (
                isinstance(value, bool) or not isinstance(value, (int, float))
                or (isinstance(default, int) and not float(value).is_integer())):
            raise ConfigError(f"data.{key}={value!r} must be {'an integer' if isinstance(default, int) else 'a number'}")
        if isinstance(default, str) and not isinstance(value, str):
            raise ConfigError(f"data.{key}={value!r} must be a string")
    for key in ("num_train", "num_test"):
        if key in cfg and cfg[key] < 1:
            raise ConfigError(f"data.{key}={cfg[key]!r} must be >= 1")
    if "test_fraction" in cfg and not 0 < cfg["test_fraction"] < 1:
        raise ConfigError(f"data.test_fraction={cfg['test_fraction']!r} must be in (0, 1)")
    for key in ("image_size", "channels"):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"data.{key}={value!r} must be a positive integer")
    if cfg["channels"] not in (1, 3):
        raise ConfigError(f"data.channels={cfg['channels']!r} must be 1 (grey) or 3 (RGB)")
    return cfg


def check_model(cfg: dict, image_size: int, channels: int, out_factor: int = 1) -> None:
    """Build the model on the meta device (no memory, no compute) to validate its settings."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"model: expected a mapping, got {type(cfg).__name__}")
    try:
        with torch.device("meta"):
            build_model(cfg, image_size, channels, out_channels=channels * out_factor)
    except ConfigError:
        raise
    except (TypeError, ValueError, RuntimeError, ZeroDivisionError) as e:
        raise ConfigError(f"model: invalid settings {cfg} ({type(e).__name__}: {e})") from None


def check_train(tcfg: TrainConfig, diffusion: Diffusion) -> None:
    """Timestep sampler and momentum-decay arguments are accepted by their classes."""
    from .training import build_sampler

    build_sampler(tcfg, diffusion)
    if tcfg.momentum_decay != "none":
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=tcfg.lr, momentum=tcfg.beta1)
        args = {"total_steps": tcfg.steps, **tcfg.momentum_decay_args}
        try:
            MomentumDecay(opt, args.pop("total_steps"), tcfg.momentum_decay, **args)
        except TypeError as e:
            raise ConfigError(f"train.momentum_decay_args: {e}") from None


def validate_params(params: dict, sections=SECTIONS) -> dict:
    """Parse and cross-check the named sections of params.yaml; returns {section: parsed config}."""
    if not isinstance(params, dict):
        raise ConfigError(f"params: expected a mapping of sections, got {type(params).__name__}")
    missing = [s for s in sections if s not in params]
    if missing:
        raise ConfigError(f"params.yaml lacks section(s) {missing}; recompose it with `python -m stages.compose`")
    out: dict = {}
    if "data" in sections:
        out["data"] = check_data(params["data"])
    if "diffusion" in sections:
        out["diffusion"] = parse(DiffusionConfig, params["diffusion"], "diffusion")
    if "model" in sections:
        data = check_data(params["data"]) if "data" in params else {"image_size": 28, "channels": 1}
        factor = Diffusion(**vars(out["diffusion"])).out_channels_factor if "diffusion" in out else 1
        check_model(params["model"], data["image_size"], data["channels"], factor)
    if "train" in sections:
        out["train"] = parse(TrainConfig, params["train"], "train")
        if "diffusion" in out:
            check_train(out["train"], Diffusion(**vars(out["diffusion"])))
    if "sample" in sections:
        out["sample"] = parse(SampleConfig, params["sample"], "sample")
        T = out["diffusion"].T if "diffusion" in out else None
        if T is not None and out["sample"].steps > T:
            raise ConfigError(f"sample.steps={out['sample'].steps} must be <= diffusion.T={T}")
    if "eval" in sections:
        out["eval"] = parse(EvalConfig, params["eval"], "eval")
    return out
