"""TDC-style pruning of timestep-group experts (arXiv 2312.13307): progressive MACs budgets, channel importances
(random, magnitude, Taylor, Diff-Pruning), structural pruning with Torch-Pruning, and the multi-round proxy search.
See docs/methods.md."""
from ..flops import count_macs, example_inputs
from .budgets import DIRECTIONS, progressive_budgets
from .fit import prune_to_budget
from .importance import IMPORTANCES, GradientBatch, Scorer, make_scorer
from .model_file import PRUNED_FORMAT, load_pruned
from .proposers import (
    PROPOSERS,
    EvolutionaryProposer,
    Proposer,
    RandomProposer,
    SearchSpace,
    make_proposer,
)
from .proxy import short_finetune_loss
from .search import MemoryBank, candidate_model, proxy_search
from .structural import ChannelGroup, prunable_groups, prune_to_ratios

__all__ = [
    "DIRECTIONS", "IMPORTANCES", "PRUNED_FORMAT", "PROPOSERS", "load_pruned", "ChannelGroup", "EvolutionaryProposer", "GradientBatch", "MemoryBank",
    "Proposer", "RandomProposer", "Scorer", "SearchSpace", "candidate_model", "count_macs", "example_inputs",
    "make_proposer", "make_scorer", "progressive_budgets", "proxy_search", "prunable_groups", "prune_to_budget",
    "prune_to_ratios", "short_finetune_loss",
]
