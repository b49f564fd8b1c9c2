"""The pruned expert's model file: a `stepwise.artifacts.save_model` file whose `model` config is the *unpruned*
architecture and whose meta['pruning'] (`pruning_record`) holds the per-group pruning ratios.

`load_pruned` rebuilds the unpruned model from its config, re-applies `prune_to_ratios` (the kept channel counts
depend only on the ratios) and loads the weights strictly, so the file stays plain tensors + JSON-like meta and
loads with weights_only=True. It also loads unpruned model files, so an ensemble of pruned and kept experts loads
through one call.
"""
from __future__ import annotations

from torch import nn

from ..artifacts import load_model
from ..errors import CheckpointError
from ..flops import example_inputs
from ..io import clip
from .structural import prune_to_ratios

PRUNED_FORMAT = "stepwise-pruned/1"  # meta["pruning"]["format"] of a pruned model file



def pruning_record(ratios: dict, kept: dict, ignored, importance: str) -> dict:
    """meta['pruning'] of a pruned model file: what rebuilds its architecture from the unpruned config."""
    return {"format": PRUNED_FORMAT, "ratios": dict(ratios), "kept": dict(kept), "ignored": list(ignored),
            "importance": importance}


def rebuild_pruned(model: nn.Module, record: dict, image_shape, path) -> nn.Module:
    """The unpruned `model` pruned to `record`'s ratios (weights still to be loaded); CheckpointError for a foreign
    record, ConfigError if the ratios do not fit the model."""
    found = record.get("format") if isinstance(record, dict) else type(record).__name__
    if found != PRUNED_FORMAT:
        raise CheckpointError(f"{path}: pruning record has format {clip(found, 80)!r}, expected {PRUNED_FORMAT!r}")
    c, h, _ = image_shape
    return prune_to_ratios(model, dict(record["ratios"]), example_inputs(c, h), "magnitude",
                           ignored=tuple(record["ignored"]))


def load_pruned(path, use_ema: bool = True):
    """(model in eval mode, Diffusion, image_shape, meta) of a model file, pruned (meta['pruning']) or not."""
    return load_model(path, use_ema, rebuild=rebuild_pruned)
