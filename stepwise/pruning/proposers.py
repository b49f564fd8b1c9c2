"""Proposers of per-group pruning decisions for TDC's multi-round proxy-based pruning (arXiv 2312.13307).

TDC v3 asks an LLM (GPT-4) for each round's decision, conditioned on a memory bank of past (decision, score) pairs.
The proposers here run offline. A decision maps channel-group names to ratios in [0, max_ratio]; only its *shape*
matters, since the search rescales it (and, if needed, blends it towards uniform) until the budget is met.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Protocol

from ..errors import ConfigError
from .structural import ChannelGroup


@dataclass(frozen=True)
class SearchSpace:
    """What a proposer decides over: the channel groups, the ratio cap, the MACs budget and the full model's MACs."""

    groups: tuple[ChannelGroup, ...]
    max_ratio: float
    budget: float
    full_macs: float


class Proposer(Protocol):
    """Returns the next decision {group name: ratio} from the bank's past rounds (dicts with 'ratios', 'score').

    Must be deterministic given `rng`. An LLM proposer (TDC v3) would implement this by rendering `space` (group
    names, widths, members) and the bank (ratios, MACs, proxy scores) into a prompt and parsing a JSON dict of
    ratios from the reply; none is shipped, and the search never calls a network.
    """

    name: str

    def propose(self, bank: list[dict], space: SearchSpace, rng: random.Random) -> dict[str, float]: ...


def uniform_decision(space: SearchSpace) -> dict[str, float]:
    """The same ratio for every group (a global ratio, as in Diff-Pruning, arXiv 2305.10924)."""
    return {g.name: space.max_ratio / 2 for g in space.groups}


def random_decision(space: SearchSpace, rng: random.Random) -> dict[str, float]:
    """Independent ratios r_g ~ U[0, max_ratio]."""
    return {g.name: rng.uniform(0, space.max_ratio) for g in space.groups}


def ranked(bank: list[dict]) -> list[dict]:
    """Past rounds best first: lowest finite proxy score, ties by round."""
    scored = [e for e in bank if e.get("score") is not None and math.isfinite(e["score"])]
    return sorted(scored, key=lambda e: (e["score"], e["round"]))


@dataclass
class RandomProposer:
    """Random search: every round an independent random decision (ignores the bank)."""

    name: str = "random"

    def propose(self, bank: list[dict], space: SearchSpace, rng: random.Random) -> dict[str, float]:
        return random_decision(space, rng)


@dataclass
class EvolutionaryProposer:
    """Uniform first, `warmup` random rounds, then a child of the bank's `elite` best: uniform crossover of two
    parents with probability `p_crossover`, Gaussian mutation N(0, (mutation * max_ratio)^2) per group with
    probability `p_mutate`, clipped to [0, max_ratio]."""

    name: str = "evolutionary"
    warmup: int = 2
    elite: int = 4
    mutation: float = 0.15
    p_mutate: float = 0.5
    p_crossover: float = 0.5

    def propose(self, bank: list[dict], space: SearchSpace, rng: random.Random) -> dict[str, float]:
        parents = ranked(bank)[: self.elite]
        if not bank:
            return uniform_decision(space)
        if len(bank) <= self.warmup or not parents:
            return random_decision(space, rng)
        a = rng.choice(parents)["ratios"]
        b = rng.choice(parents)["ratios"] if rng.random() < self.p_crossover else a
        child = {g.name: (a if rng.random() < 0.5 else b)[g.name] for g in space.groups}
        for name in child:
            if rng.random() < self.p_mutate:
                child[name] += rng.gauss(0, self.mutation * space.max_ratio)
        child = {n: min(max(r, 0.0), space.max_ratio) for n, r in child.items()}
        return child if max(child.values()) > 0 else uniform_decision(space)


PROPOSERS = {"evolutionary": EvolutionaryProposer, "random": RandomProposer}


def make_proposer(name: str) -> Proposer:
    """PROPOSERS[name]() with default settings."""
    if name not in PROPOSERS:
        raise ConfigError(f"pruning.proposer={name!r} is not a proposer; valid: {sorted(PROPOSERS)} "
                          "(an LLM proposer is passed as an object implementing Proposer)")
    return PROPOSERS[name]()
