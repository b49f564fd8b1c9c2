"""Structural channel pruning of the denoisers with Torch-Pruning's DependencyGraph (DepGraph, arXiv 2301.12900).

A *channel group* is a set of coupled channels that must be removed together (residual streams, skip concatenations,
FiLM scale/shift, attention q/k/v/proj); it is named after its root module (the member with the fewest output
channels, first in module order). A pruning *decision* maps group names to ratios in [0, 1).
"""
from __future__ import annotations

import math
import types
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch_pruning as tp
from timm.models.vision_transformer import Attention
from torch import nn

from ..errors import ConfigError
from ..models.dit import DiT
from ..models.unet import AttnBlock, Downsample, Upsample
from .importance import GradientBatch, Scorer, copy_with_grads, make_scorer

PRUNABLE = (nn.modules.conv._ConvNd, nn.Linear)


def unet_attention_surrogate(self: AttnBlock, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
    """Trace-only AttnBlock forward: inner dim j of q, k, v, proj-in is tied to residual channel j (C from x.shape)."""
    q, k, v = self.qkv(self.norm(x)).chunk(3, dim=1)  # 3 x (B, C, H, W)
    return x + self.proj(q * k + v + x)  # (B, C, H, W)


def timm_attention_surrogate(self: Attention, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Trace-only timm Attention forward: q, k, v, proj-in share inner dim j, independent of the token width."""
    q, k, v = self.qkv(x).transpose(1, 2).chunk(3, dim=1)  # 3 x (B, A, N): Torch-Pruning maps splits on dim 1 only
    return self.proj((q * k + v).transpose(1, 2))  # (B, N, D)


SURROGATES = {AttnBlock: unet_attention_surrogate, Attention: timm_attention_surrogate}


@contextmanager
def traced_attention(model: nn.Module):
    """Swap attention forwards for their surrogates while Torch-Pruning traces (its reshape/unbind tracing loops)."""
    swapped = [m for m in model.modules() if type(m) in SURROGATES]
    for m in swapped:
        m.forward = types.MethodType(SURROGATES[type(m)], m)
    try:
        yield
    finally:
        for m in swapped:
            del m.forward


def output_layers(model: nn.Module) -> list[nn.Module]:
    """Layers whose output channels are the image channels and must never be pruned (UNet conv_out, DiT linear_out)."""
    return [getattr(model, n) for n in ("conv_out", "linear_out") if isinstance(getattr(model, n, None), nn.Module)]


def attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    """Head count keyed by each attention output projection: its input splits into that many equal head chunks."""
    heads = {m.proj: m.heads for m in model.modules() if isinstance(m, AttnBlock)}
    heads.update({m.proj: m.num_heads for m in model.modules() if isinstance(m, Attention)})
    return heads


def dependency_graph(model: nn.Module, inputs: tuple) -> tp.DependencyGraph:
    """Torch-Pruning DependencyGraph of `model` traced on (x, t); top-level raw parameters prune their last dim.

    Torch-Pruning switches off index mapping of every split downstream of a 3-D raw parameter (a ViT cls-token
    work-around); our models split only along channels, so it is switched back on for the q/k/v chunk to map.
    """
    unwrapped = [(p, p.dim() - 1) for p in model._parameters.values() if p is not None]
    with traced_attention(model), torch.enable_grad():
        DG = tp.DependencyGraph().build_dependency(model, example_inputs=inputs, unwrapped_parameters=unwrapped)
    for node in DG.module2node.values():
        if node.type == tp.ops.OPTYPE.SPLIT:
            node.enable_index_mapping = True
    return DG


@dataclass(frozen=True)
class ChannelGroup:
    """A coupled channel set: root-module name, independent channels (units), equal-size head chunks it splits into,
    and its parameterised members as (module name, 'out' | 'in' | 'ch', channels of that module in the group)."""

    name: str
    units: int
    chunks: int
    members: tuple[tuple[str, str, int], ...] = ()


def group_members(DG: tp.DependencyGraph, group, names: dict) -> tuple[tuple[str, str, int], ...]:
    """(module name, role, distinct channels) of each conv/linear ('out'/'in') and norm ('ch') member of `group`."""
    found: dict[tuple[str, str], set] = {}
    for dep, idxs in group:
        module = dep.target.module
        if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
            role = "ch"
        elif isinstance(module, PRUNABLE):
            role = "out" if DG.is_out_channel_pruning_fn(dep.handler) else "in"
        else:
            continue
        found.setdefault((names[module], role), set()).update(idxs)
    return tuple((name, role, len(idxs)) for (name, role), idxs in found.items())


def head_chunks(DG: tp.DependencyGraph, group, heads: dict[nn.Module, int], names: dict) -> int:
    """lcm of the head counts of attention projections in `group`; their inner index must equal the root index."""
    chunks = 1
    for item in group:
        dep, idxs = item.dep, item.idxs
        if dep.target.module in heads and DG.is_in_channel_pruning_fn(dep.handler):
            if any(i != r for i, r in zip(idxs, item.root_idxs)):
                raise ConfigError(f"attention projection {names[dep.target.module]} is not index-aligned with its "
                                  "channel group; add it to pruning.ignored")
            chunks = math.lcm(chunks, heads[dep.target.module])
    return chunks


def rooted_groups(model: nn.Module, DG: tp.DependencyGraph, ignored: list[nn.Module]) -> list[tuple]:
    """(ChannelGroup, root module, Torch-Pruning group of all units) for every prunable channel group of `model`,
    re-rooted at its narrowest output layer."""
    names = {m: n for n, m in model.named_modules()}
    order = {m: i for i, m in enumerate(model.modules())}
    heads = attention_heads(model)
    found = []
    for group in DG.get_all_groups(ignored_layers=ignored, root_module_types=list(PRUNABLE)):
        members = [d.target.module for d, _ in group
                   if isinstance(d.target.module, PRUNABLE) and DG.is_out_channel_pruning_fn(d.handler)]
        root = min(members, key=lambda m: (DG.get_out_channels(m), order[m]))
        units = min(len(set(idxs)) for _, idxs in group)
        regrouped = DG.get_pruning_group(root, DG.get_pruner_of_module(root).prune_out_channels, list(range(units)))
        covered = {i for d, idxs in regrouped if d.target.module is root and DG.is_out_channel_pruning_fn(d.handler)
                   for i in idxs}
        if len(covered) != DG.get_out_channels(root):
            raise ConfigError(f"channel group rooted at {names[root]} has no independent unit set; add it to "
                              "pruning.ignored")
        channel_group = ChannelGroup(names[root], units, head_chunks(DG, regrouped, heads, names),
                                     group_members(DG, regrouped, names))
        found.append((channel_group, root, regrouped))
    return found


def ignored_modules(model: nn.Module, ignored: tuple[str, ...] = ()) -> list[nn.Module]:
    """Layers whose output channels stay: the output layer plus the modules named in `ignored`."""
    modules = dict(model.named_modules())
    unknown = sorted(set(ignored) - set(modules))
    if unknown:
        raise ConfigError(f"pruning.ignored names unknown module(s) {unknown}; use names from model.named_modules()")
    return output_layers(model) + [modules[n] for n in ignored]


def prunable_groups(model: nn.Module, inputs: tuple, ignored: tuple[str, ...] = ()) -> list[ChannelGroup]:
    """The channel groups a decision may prune, in graph order (the model itself is traced, not modified)."""
    DG = dependency_graph(model, inputs)
    return [g for g, _, _ in rooted_groups(model, DG, ignored_modules(model, ignored))]


def max_ratio_of(group: ChannelGroup, max_ratio: float) -> float:
    """Largest ratio that still keeps one channel per head chunk, capped at `max_ratio`."""
    return min(max_ratio, 1 - group.chunks / group.units)


def kept_units(group: ChannelGroup, ratio: float) -> int:
    """Channels kept: chunks * max(1, floor(s (1 - ratio))) with chunk size s = units / chunks (Torch-Pruning rule)."""
    size = group.units // group.chunks
    return group.chunks * max(1, math.floor(size * (1 - ratio) + 1e-9))


def resolve_ratios(ratios: float | dict[str, float], groups: list[ChannelGroup]) -> dict[str, float]:
    """A ratio per group name from a global ratio or a partial dict (absent groups keep all channels)."""
    names = [g.name for g in groups]
    if isinstance(ratios, dict):
        unknown = sorted(set(ratios) - set(names))
        if unknown:
            raise ConfigError(f"pruning ratios name unknown channel group(s) {unknown}; valid: {names}")
        resolved = {n: float(ratios.get(n, 0.0)) for n in names}
    else:
        resolved = {n: float(ratios) for n in names}
    bad = {n: r for n, r in resolved.items() if not 0 <= r < 1}
    if bad:
        raise ConfigError(f"pruning ratios {bad} must lie in [0, 1)")
    return resolved


def norm_group_sizes(model: nn.Module) -> dict[nn.GroupNorm, int]:
    """Channels per group of every GroupNorm, recorded before pruning."""
    return {m: m.num_channels // m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)}


def regrouped_norm(size: int, groups: int, channels: int) -> int:
    """Groups for a pruned GroupNorm: keep `size` channels per group if it divides the new width, else gcd(G, C')."""
    return channels // size if channels % size == 0 else math.gcd(groups, channels)


def fix_attributes(model: nn.Module, group_sizes: dict[nn.GroupNorm, int]) -> nn.Module:
    """Re-derive the width attributes forwards read after channels were removed (cf. Diff-Pruning's Upsample fix)."""
    for m in model.modules():
        if isinstance(m, (Upsample, Downsample)):
            m.channels = m.conv.in_channels
        elif isinstance(m, nn.GroupNorm):
            m.num_groups = regrouped_norm(group_sizes[m], m.num_groups, m.num_channels)
        elif isinstance(m, AttnBlock):
            width = m.proj.in_channels
            if m.qkv.out_channels != 3 * width or width % m.heads:
                raise RuntimeError(f"pruned AttnBlock has qkv {m.qkv.out_channels}, proj-in {width}, {m.heads} heads")
        elif isinstance(m, Attention):
            m.head_dim = m.proj.in_features // m.num_heads
            m.attn_dim = m.head_dim * m.num_heads
            m.scale = m.head_dim**-0.5  # what the fused kernel uses for the new head width
        if isinstance(m, DiT):
            m.hidden_size = m.x_embed.proj.out_channels
    return model


def pruning_indices(imp: torch.Tensor, group: ChannelGroup, keep: int) -> list[int]:
    """Lowest-importance relative indices, the same in every head chunk (chunk-mean importance): (units - keep,)."""
    size = group.units // group.chunks
    chunk_imp = imp[: group.units].float().reshape(group.chunks, size).mean(0)  # (size,)
    drop = torch.argsort(chunk_imp)[: size - keep // group.chunks]  # (n,)
    return torch.cat([drop + c * size for c in range(group.chunks)]).tolist()


def regrouped(model: nn.Module, DG: tp.DependencyGraph, groups: list[ChannelGroup]) -> list[tuple]:
    """(ChannelGroup, root module, Torch-Pruning group) for groups already found on an identical model (by name)."""
    modules = dict(model.named_modules())
    found = []
    for g in groups:
        root = modules[g.name]
        handler = DG.get_pruner_of_module(root).prune_out_channels
        found.append((g, root, DG.get_pruning_group(root, handler, list(range(g.units)))))
    return found


def prune_to_ratios(model: nn.Module, ratios: float | dict[str, float], inputs: tuple,
                    importance: str | Scorer = "magnitude", batch: GradientBatch | None = None,
                    ignored: tuple[str, ...] = (), seed: int = 0,
                    groups: list[ChannelGroup] | None = None) -> nn.Module:
    """A new pruned copy of `model` keeping kept_units(g, r_g) channels of each group g ranked by `importance`
    (`groups`: prunable_groups(model, inputs, ignored), if already known, saves re-deriving them)."""
    scorer = importance if isinstance(importance, Scorer) else make_scorer(model, importance, batch)
    clone = copy_with_grads(scorer.model)
    if any(p.grad is not None for p in clone.parameters()):  # Taylor scores read .grad of every group member
        for p in clone.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    DG = dependency_graph(clone, inputs)
    found = (rooted_groups(clone, DG, ignored_modules(clone, ignored)) if groups is None
             else regrouped(clone, DG, groups))
    resolved = resolve_ratios(ratios, [g for g, _, _ in found])
    plans = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for group, root, full in found:
            keep = kept_units(group, resolved[group.name])
            imp = scorer.importance(full) if keep < group.units else None
            if imp is not None:
                plans.append((root, pruning_indices(imp, group, keep)))
    sizes = norm_group_sizes(clone)
    for root, idxs in plans:
        DG.get_pruning_group(root, DG.get_pruner_of_module(root).prune_out_channels, idxs).prune()
    clone.zero_grad(set_to_none=True)
    return fix_attributes(clone, sizes).train(model.training)
