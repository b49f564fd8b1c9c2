"""TDC's proxy-based multi-round pruning (arXiv 2312.13307): propose -> prune to budget -> proxy score -> memory bank.

Each round a proposer conditions on the memory bank of past rounds and proposes per-group ratios; the decision is
rescaled to the expert's MACs budget, a copy of the model is pruned with it and scored by a cheap proxy (lower is
better), and (decision, ratios, kept channels, MACs, score) is appended to the bank, which is rewritten atomically
as JSON after every round. Reopening the same bank resumes at the next round; rounds already in it are not redone.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from ..io import FORMAT_KEY, clip, field_problem, read_json, write_json
from .fit import budget_problem, prune_to_budget
from .importance import GradientBatch, make_scorer
from .proposers import Proposer, SearchSpace, make_proposer, ranked
from .structural import kept_units, prune_to_ratios

BANK_FORMAT = "stepwise-pruning-bank/1"
BANK_FIELDS = {FORMAT_KEY: str, "meta": dict, "rounds": list}
# one finished round, as proxy_search appends it (`stepwise.io.field_problem`)
ROUND_FIELDS = {"round": int, "proposer": str, "decision": dict, "ratios": dict, "kept": dict, "macs": (int, float),
                "params": int, "score": (int, float, type(None))}


@dataclass
class MemoryBank:
    """TDC's memory bank: the search's identity (`meta`) and one dict per finished round, persisted at `path`."""

    path: Path
    meta: dict
    rounds: list[dict] = field(default_factory=list)

    @classmethod
    def open(cls, path, meta: dict) -> MemoryBank:
        """Load the bank at `path` if it exists (its meta must equal `meta`), else start an empty one; ConfigError
        naming the file if it is corrupt (not JSON, not a bank, a round not as proxy_search writes it)."""
        path = Path(path)
        if not path.exists():
            return cls(path, meta)
        fix = "delete it to start the search over"
        data = read_json(path, "dvc repro prune", error=ConfigError, fields=BANK_FIELDS, fix=fix)
        if data[FORMAT_KEY] != BANK_FORMAT:
            raise ConfigError(f"{path}: expected a {BANK_FORMAT!r} memory bank, found {clip(data[FORMAT_KEY], 80)!r}; "
                              f"{fix}")
        differ = sorted(k for k in set(meta) | set(data["meta"]) if data["meta"].get(k) != meta.get(k))
        if differ:
            raise ConfigError(f"{path}: memory bank was written by a different search (differs in "
                              f"{clip(differ)}); use a new bank path or delete it")
        for i, entry in enumerate(data["rounds"]):
            problem = (field_problem(entry, ROUND_FIELDS) if isinstance(entry, dict)
                       else f"a {type(entry).__name__}, not a mapping")
            if problem is None and entry["round"] != i:
                problem = f"numbered {entry['round']}"
            if problem:
                raise ConfigError(f"{path}: round {i} is corrupt ({problem}); {fix}")
        return cls(path, meta, data["rounds"])

    def append(self, entry: dict) -> None:
        """Add one finished round and rewrite the bank atomically."""
        self.rounds.append(entry)
        write_json({FORMAT_KEY: BANK_FORMAT, "meta": self.meta, "rounds": self.rounds}, self.path)

    def best(self) -> dict | None:
        """The round with the lowest finite proxy score (earliest on ties), or None."""
        best = ranked(self.rounds)
        return best[0] if best else None


def finite_or_none(x: float) -> float | None:
    """JSON-safe score: non-finite proxy values are stored as null (ranked last)."""
    return x if math.isfinite(x) else None


def proxy_search(model: nn.Module, budget: float, inputs: tuple, proxy: Callable[[nn.Module], float], bank_path,
                 rounds: int = 8, proposer: str | Proposer = "evolutionary", importance: str = "magnitude",
                 batch: GradientBatch | None = None, seed: int = 0, tol: float = 0.02, max_ratio: float = 0.9,
                 ignored: tuple[str, ...] = ()) -> MemoryBank:
    """Run rounds len(bank)..rounds-1 of TDC's proxy-based pruning for one expert; return the bank (see .best()).

    `proxy(pruned copy) -> float` scores a candidate, lower is better, e.g. functools.partial(short_finetune_loss,
    diffusion=..., images=..., t_range=(lo, hi)); it runs under torch seed `seed` for every candidate alike.
    """
    if not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"pruning.rounds={rounds!r} must be a positive integer")
    proposer = make_proposer(proposer) if isinstance(proposer, str) else proposer
    problem = budget_problem(model, inputs, ignored)
    groups, full = problem.groups, problem.mm.full
    if budget > full * (1 + 1e-9):
        raise ConfigError(f"pruning budget {budget:.4g} MACs exceeds the full model's {full:.4g} MACs; "
                          "a budget must be at most the full model")
    space = SearchSpace(tuple(groups), max_ratio, budget, full)
    meta = {"budget": budget, "full_macs": full, "groups": [g.name for g in groups], "max_ratio": max_ratio,
            "tol": tol, "importance": importance, "proposer": proposer.name, "seed": seed,
            "ignored": list(ignored), "gradients": None if batch is None else
            {"t_range": list(batch.t_range), "t_stride": batch.t_stride, "thr": batch.thr}}
    bank = MemoryBank.open(bank_path, meta)
    if len(bank.rounds) >= rounds:
        return bank
    scorer = make_scorer(model, importance, batch)
    for r in range(len(bank.rounds), rounds):
        proposed = proposer.propose([dict(e) for e in bank.rounds], space, random.Random(seed * 1_000_003 + r))
        decision = {name: float(ratio) for name, ratio in proposed.items()}
        pruned, ratios, macs = prune_to_budget(model, budget, inputs, scorer, decision=decision, tol=tol,
                                               max_ratio=max_ratio, ignored=ignored, seed=seed + r,
                                               problem=problem)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the same random numbers for every candidate
            score = float(proxy(pruned))
        bank.append({"round": r, "proposer": proposer.name, "decision": decision, "ratios": ratios,
                     "kept": {g.name: kept_units(g, ratios[g.name]) for g in groups}, "macs": macs,
                     "params": sum(p.numel() for p in pruned.parameters()), "score": finite_or_none(score)})
    return bank


def candidate_model(model: nn.Module, entry: dict, inputs: tuple, importance: str = "magnitude",
                    batch: GradientBatch | None = None, seed: int = 0, ignored: tuple[str, ...] = ()) -> nn.Module:
    """The pruned, not yet fine-tuned candidate of a bank round (e.g. bank.best()), given the search's settings."""
    return prune_to_ratios(model, entry["ratios"], inputs, importance, batch, ignored=ignored,
                           seed=seed + entry["round"])
