"""Fitting a pruning decision to a MACs budget: scale the decision's ratios by one factor alpha found by bisection.

MACs (`stepwise.flops`) are predicted from channel counts (a conv/linear layer costs in x out, the attention products
scale with the attention width), which makes the bisection free; the pruned model's MACs are then measured, and if they exceed the
budget by more than `tol` the prediction's target is tightened by the measured excess and the fit repeated.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError
from ..flops import count_macs, module_macs
from .importance import GradientBatch, Scorer, make_scorer
from .structural import (
    ChannelGroup,
    kept_units,
    max_ratio_of,
    prunable_groups,
    prune_to_ratios,
)


@dataclass
class MacsModel:
    """The full model's MACs and, per counted term, its MACs, the layer whose channels it scales with, their counts."""

    full: float
    terms: list[tuple[float, str, dict[str, int]]]  # (MACs, layer name, {"in" | "out": channels})


def layer_sizes(module: nn.Module) -> dict[str, int]:
    """Channel counts a conv/linear layer's MACs scale with: in x out."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return {"in": module.in_channels, "out": module.out_channels}
    if isinstance(module, nn.Linear):
        return {"in": module.in_features, "out": module.out_features}
    return {}


def counted_term(name: str, module: nn.Module) -> tuple[str, dict[str, int]]:
    """The layer a module's own MACs scale with: a conv/linear layer itself; an attention module (UNet AttnBlock,
    timm Attention) owns the products QK^T and AV, linear in the attention width = its output projection's input;
    the UNet's Upsample runs its `conv` as the equivalent sub-pixel convolution (in x out of that conv)."""
    sizes = layer_sizes(module)
    if not sizes and isinstance(getattr(module, "proj", None), nn.Module) and layer_sizes(module.proj):
        return f"{name}.proj", {"in": layer_sizes(module.proj)["in"]}
    if not sizes and isinstance(getattr(module, "conv", None), nn.Module) and layer_sizes(module.conv):
        return f"{name}.conv", layer_sizes(module.conv)
    return name, sizes


def macs_model(model: nn.Module, inputs: tuple) -> MacsModel:
    """Measure the full model once: its MACs split into terms by the module that runs them (`module_macs`)."""
    total, own = module_macs(model, inputs)
    modules = dict(model.named_modules())
    terms = [(macs, *counted_term(name, modules[name])) for name, macs in own.items()]
    return MacsModel(total, [t for t in terms if t[2]])


@dataclass
class BudgetProblem:
    """What fitting needs that no decision changes: the model's channel groups and its MACs model."""

    groups: list[ChannelGroup]
    mm: MacsModel


def budget_problem(model: nn.Module, inputs: tuple, ignored: tuple[str, ...] = ()) -> BudgetProblem:
    """Trace the channel groups and measure the MACs model of `model` once."""
    return BudgetProblem(prunable_groups(model, inputs, ignored), macs_model(model, inputs))


def kept_fractions(groups: list[ChannelGroup], kept: dict[str, int]) -> dict[tuple[str, str], float]:
    """Pruned channels of each (layer, role): sum over groups of members * (1 - kept_g / units_g)."""
    pruned: dict[tuple[str, str], float] = {}
    for g in groups:
        for name, role, count in g.members:
            pruned[(name, role)] = pruned.get((name, role), 0.0) + count * (1 - kept[g.name] / g.units)
    return pruned


def predicted_macs(mm: MacsModel, groups: list[ChannelGroup], kept: dict[str, int]) -> float:
    """MACs(kept) = F - sum_L m_L (1 - prod_roles f_role(L)), f = kept channels / channels of layer L."""
    pruned = kept_fractions(groups, kept)
    saved = 0.0
    for macs, name, sizes in mm.terms:
        frac = 1.0
        for role, size in sizes.items():
            frac *= 1 - pruned.get((name, role), 0.0) / size
        saved += macs * (1 - frac)
    return mm.full - saved


def scaled_ratios(groups: list[ChannelGroup], weights: dict[str, float], alpha: float, max_ratio: float) -> dict:
    """r_g = min(alpha * w_g, cap_g): the decision's shape scaled by alpha, capped to keep a channel per chunk."""
    return {g.name: min(alpha * weights[g.name], max_ratio_of(g, max_ratio)) for g in groups}


def decision_weights(groups: list[ChannelGroup], decision: dict[str, float] | None) -> dict[str, float]:
    """Non-negative per-group weights normalised to max 1; None means uniform (a global ratio)."""
    names = [g.name for g in groups]
    if decision is None:
        return {n: 1.0 for n in names}
    unknown = sorted(set(decision) - set(names))
    if unknown:
        raise ConfigError(f"pruning decision names unknown channel group(s) {unknown}; valid: {names}")
    weights = {n: float(decision.get(n, 0.0)) for n in names}
    top = max(weights.values())
    if min(weights.values()) < 0 or top <= 0:
        raise ConfigError(f"pruning decision ratios (min {min(weights.values()):.3g}, max {top:.3g}) must be "
                          "non-negative with at least one positive")
    return {n: w / top for n, w in weights.items()}


def alpha_max(groups: list[ChannelGroup], weights: dict[str, float], max_ratio: float) -> float:
    """Smallest alpha at which every weighted group sits at its cap (the decision's smallest model)."""
    return max(max_ratio_of(g, max_ratio) / weights[g.name] for g in groups if weights[g.name] > 0)


def alpha_macs(mm: MacsModel, groups: list[ChannelGroup], weights: dict[str, float], alpha: float,
               max_ratio: float) -> float:
    """Predicted MACs of the decision scaled by alpha."""
    ratios = scaled_ratios(groups, weights, alpha, max_ratio)
    return predicted_macs(mm, groups, {g.name: kept_units(g, ratios[g.name]) for g in groups})


def fit_alpha(mm: MacsModel, groups: list[ChannelGroup], weights: dict[str, float], target: float,
              max_ratio: float, tol: float) -> float:
    """Bisection on alpha for predicted MACs = target; the closer of the two sides of the final step wins."""
    lo, hi = 0.0, alpha_max(groups, weights, max_ratio)  # predicted(lo) > target >= predicted(hi) when reachable
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if alpha_macs(mm, groups, weights, mid, max_ratio) > target else (lo, mid)
    above, below = (alpha_macs(mm, groups, weights, a, max_ratio) for a in (lo, hi))
    return lo if above <= target * (1 + tol) and above - target < target - below else hi


def smallest_macs(mm: MacsModel, groups: list[ChannelGroup], weights: dict[str, float], max_ratio: float) -> float:
    """Predicted MACs of the decision's smallest model (every weighted group at its cap)."""
    return alpha_macs(mm, groups, weights, alpha_max(groups, weights, max_ratio), max_ratio)


def reachable_weights(mm: MacsModel, groups: list[ChannelGroup], weights: dict[str, float], budget: float,
                      max_ratio: float, tol: float, blends: int = 8) -> dict[str, float]:
    """Repair a decision that cannot reach the budget: w <- (w + 1) / 2 (towards uniform) until it can."""
    for _ in range(blends):
        if smallest_macs(mm, groups, weights, max_ratio) <= budget * (1 + tol):
            return weights
        weights = {n: (w + 1) / 2 for n, w in weights.items()}
    uniform = {n: 1.0 for n in weights}
    smallest = smallest_macs(mm, groups, uniform, max_ratio)
    if smallest > budget * (1 + tol):
        raise ConfigError(f"pruning budget {budget:.4g} MACs is below the smallest reachable model ({smallest:.4g} "
                          f"MACs with every ratio at max_ratio={max_ratio}); raise the budget (k) or max_ratio")
    return uniform


def prune_to_budget(model: nn.Module, budget: float, inputs: tuple, importance: str | Scorer = "magnitude",
                    batch: GradientBatch | None = None, decision: dict[str, float] | None = None, tol: float = 0.02,
                    max_ratio: float = 0.9, ignored: tuple[str, ...] = (), seed: int = 0, max_refits: int = 5,
                    problem: BudgetProblem | None = None) -> tuple[nn.Module, dict[str, float], float]:
    """(pruned copy, ratios, measured MACs) with MACs <= budget (1 + tol), ratios = alpha * decision (TDC budget)."""
    if not 0 < tol < 1:
        raise ConfigError(f"pruning.tol={tol} must lie in (0, 1)")
    if not 0 < max_ratio < 1:
        raise ConfigError(f"pruning.max_ratio={max_ratio} must lie in (0, 1)")
    problem = problem or budget_problem(model, inputs, ignored)
    groups, mm = problem.groups, problem.mm
    if budget > mm.full * (1 + 1e-9):
        raise ConfigError(f"pruning budget {budget:.4g} MACs exceeds the full model's {mm.full:.4g} MACs; "
                          "a budget must be at most the full model")
    if not budget > 0:
        raise ConfigError(f"pruning budget {budget!r} MACs must be positive")
    scorer = importance if isinstance(importance, Scorer) else make_scorer(model, importance, batch)
    if budget >= mm.full * (1 - tol):
        unpruned = prune_to_ratios(model, 0.0, inputs, scorer, ignored=ignored, seed=seed, groups=groups)
        return unpruned, {g.name: 0.0 for g in groups}, count_macs(unpruned, inputs)
    weights = reachable_weights(mm, groups, decision_weights(groups, decision), budget, max_ratio, tol)
    target = budget
    for _ in range(max_refits):
        ratios = scaled_ratios(groups, weights, fit_alpha(mm, groups, weights, target, max_ratio, tol), max_ratio)
        pruned = prune_to_ratios(model, ratios, inputs, scorer, ignored=ignored, seed=seed, groups=groups)
        macs = count_macs(pruned, inputs)
        if macs <= budget * (1 + tol):
            return pruned, ratios, macs
        target *= budget / macs
    raise ConfigError(f"pruning budget {budget:.4g} MACs not met after {max_refits} refits (last {macs:.4g} MACs); "
                      "raise the budget (k), max_ratio or tol")
