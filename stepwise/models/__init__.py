"""Denoiser architectures, by name: `build_model({"name": "unet", ...})`."""
from __future__ import annotations

import inspect

from torch import nn

from ..errors import ConfigError
from .dit import DiT
from .unet import UNet

MODELS = {"unet": UNet, "dit": DiT}


def build_model(cfg: dict, image_size: int, channels: int) -> nn.Module:
    """Instantiate MODELS[cfg['name']] for images of `channels` x `image_size`^2 from the remaining keys of cfg."""
    cfg = dict(cfg)
    name = cfg.pop("name", None)
    if name not in MODELS:
        raise ConfigError(f"model.name={name!r} is not a model; valid: {sorted(MODELS)}")
    cls = MODELS[name]
    valid = set(inspect.signature(cls).parameters) - {"image_size", "in_channels", "out_channels"}
    unknown = set(cfg) - valid
    if unknown:
        raise ConfigError(f"model {name!r} has no parameter(s) {sorted(unknown)}; valid: {sorted(valid)}")
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    if name == "dit" and image_size % cfg.get("patch_size", 2):
        raise ConfigError(f"model.patch_size={cfg.get('patch_size', 2)} must divide the image size {image_size}")
    if name == "dit" and cfg.get("hidden_size", 192) % cfg.get("num_heads", 3):
        raise ConfigError("model.hidden_size must be divisible by model.num_heads")
    return cls(image_size=image_size, in_channels=channels, **cfg)


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
