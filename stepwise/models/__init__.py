"""Denoiser architectures, by name: `build_model({"name": "unet", ...})`. DiT (and so timm) is imported only when used."""
from __future__ import annotations

import dataclasses
import inspect

import torch
from torch import nn

from ..errors import ConfigError
from .unet import UNet


def _dit():
    from .dit import DiT  # needs timm

    return DiT


MODELS = {"unet": lambda: UNet, "dit": _dit}  # name -> the architecture's class (imported on first use)


def _int(lo: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _int_list(lo: int, nonempty: bool):
    return lambda v: isinstance(v, (list, tuple)) and (len(v) > 0 or not nonempty) and all(_int(lo)(x) for x in v)


RULES = {  # key -> (check, what it must be)
    "base_channels": (_int(1), "an integer >= 1"), "num_res_blocks": (_int(1), "an integer >= 1"),
    "channel_mult": (_int_list(1, True), "a non-empty list of integers >= 1"),
    "attn_resolutions": (_int_list(1, False), "a list of integer resolutions"),
    "head_dim": (_int(1), "an integer >= 1"), "patch_size": (_int(1), "an integer >= 1"),
    "hidden_size": (_int(1), "an integer >= 1"), "depth": (_int(1), "an integer >= 1"),
    "num_heads": (_int(1), "an integer >= 1"),
    "dropout": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1, "in [0, 1)"),
    "mlp_ratio": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, "a number > 0"),
}


def build_model(cfg: dict, image_size: int, channels: int, out_channels: int | None = None,
                seed: int | None = None) -> nn.Module:
    """Instantiate MODELS[cfg['name']] for `channels` x `image_size`^2 images (output `out_channels`, default same);
    with `seed`, the initial weights depend on it alone (the global RNG is left as it was)."""
    cfg = dict(cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg))
    name = cfg.pop("name", None)
    if name not in MODELS:
        raise ConfigError(f"model.name={name!r} is not a model; valid: {sorted(MODELS)}")
    cls = MODELS[name]()
    valid = set(inspect.signature(cls).parameters) - {"image_size", "in_channels", "out_channels"}
    unknown = set(cfg) - valid
    if unknown:
        raise ConfigError(f"model {name!r} has no parameter(s) {sorted(unknown)}; valid: {sorted(valid)}")
    for key, value in cfg.items():
        rule = RULES.get(key)
        if rule and not rule[0](value):
            raise ConfigError(f"model.{key}={value!r} must be {rule[1]}")
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    if name == "dit" and image_size % cfg.get("patch_size", 2):
        raise ConfigError(f"model.patch_size={cfg.get('patch_size', 2)} must divide the image size {image_size}")
    if name == "dit" and cfg.get("hidden_size", 192) % cfg.get("num_heads", 3):
        raise ConfigError("model.hidden_size must be divisible by model.num_heads")
    if seed is None:
        return cls(image_size=image_size, in_channels=channels, out_channels=out_channels or channels, **cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(image_size=image_size, in_channels=channels, out_channels=out_channels or channels, **cfg)


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
