"""Multiply-accumulates (MACs) of a denoiser forward: the one counter behind training-compute accounting, pruning
budgets (and their MACs model, `stepwise.pruning.fit`) and the per-sample cost of a sampling trajectory.

Counted: the multiply-accumulates of every matrix product a forward runs (convolutions, linear layers and the
attention products QK^T and AV), read at the ATen level by `torch.utils.flop_counter` (FLOPs = 2 MACs), so a
functional call counts like a module. Not counted: normalisations, activations, bias additions, softmax and other
elementwise work, which are no multiply-accumulates.

Why Torch-Pruning's counter (`tp.utils.count_ops_and_params`, which the pruning budgets used before) read 1 % more
(74.22 M vs 73.47 M MACs for the default UNet): it adds elementwise work (GroupNorm/LayerNorm 1-2 per element, GELU
but not SiLU, one bias add per conv output element, one per linear output feature rather than per token, softmax and
q-scaling in timm's Attention), while it misses the products of F.scaled_dot_product_attention inside the UNet's
AttnBlock (the budget code added those back by a hook). `torch.utils.flop_counter` on its own misses the attention
products where the CPU flash kernel of scaled_dot_product_attention runs (timm Attention in DiT), which has no
registered formula; it is registered here, so the count does not depend on the device or the attention kernel.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

FLOPS_PER_MAC = 2
TRAIN_PASSES = 3  # forward + backward ~ 3 forwards (Kaplan et al. 2020, arXiv 2001.08361, Sec. 2.1)


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the CPU flash attention kernel: QK^T and AV, as for the CUDA kernels."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


UNREGISTERED = {op: _sdpa_cpu_flops for op in (getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu",
                                                       None),) if op is not None}


def example_inputs(channels: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One (x, t) pair for a denoiser eps_theta(x_t, t): x (1, C, H, W) zeros, t (1,) zeros."""
    return torch.zeros(1, channels, image_size, image_size), torch.zeros(1, dtype=torch.long)


@torch.no_grad()
def _counted(model: nn.Module, inputs: tuple) -> FlopCounterMode:
    """Run one eval-mode forward on `inputs` (moved to the model's device) under a FLOP counter; mode restored."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False, custom_mapping=UNREGISTERED) as counter:
            model(*(x.to(device) for x in inputs))
    finally:
        model.train(was_training)
    return counter


def count_macs(model: nn.Module, inputs: tuple) -> int:
    """MACs of one forward of `model` on `inputs` (conv, linear and attention products; see the module doc)."""
    return int(_counted(model, inputs).get_total_flops()) // FLOPS_PER_MAC


def module_macs(model: nn.Module, inputs: tuple) -> tuple[int, dict[str, int]]:
    """(count_macs, {module name: MACs its own forward runs, its submodules' excluded}) for modules with any.

    A conv or linear layer owns its product; an attention module owns QK^T and AV (its projections are submodules).
    """
    counter = _counted(model, inputs)
    flops = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    root = type(model).__name__

    def key(name: str) -> str:
        return f"{root}.{name}" if name else root

    def called(name: str, module: nn.Module) -> int:  # FLOPs of the outermost called modules at or under `name`
        if key(name) in flops:
            return flops[key(name)]
        return sum(called(f"{name}.{c}" if name else c, m) for c, m in module.named_children())

    own = {}
    for name, module in model.named_modules():
        if key(name) in flops:
            macs = flops[key(name)] - sum(called(f"{name}.{c}" if name else c, m) for c, m in module.named_children())
            if macs:
                own[name] = int(macs) // FLOPS_PER_MAC
    return int(counter.get_total_flops()) // FLOPS_PER_MAC, own


def training_flops(macs_per_forward: int, images: int) -> int:
    """Training FLOPs = TRAIN_PASSES x FLOPS_PER_MAC x MACs per forward x images (Kaplan et al. 2020, Sec. 2.1)."""
    return TRAIN_PASSES * FLOPS_PER_MAC * macs_per_forward * images
