"""TDC proxy-based multi-round pruning: memory bank, resume, determinism, budget (docs/checklist.md item 15)."""
import functools
import json
import random

import pytest
import torch

from stepwise.diffusion import Diffusion
from stepwise.errors import ConfigError
from stepwise.models.unet import UNet
from stepwise.pruning import (
    EvolutionaryProposer,
    MemoryBank,
    SearchSpace,
    candidate_model,
    count_macs,
    example_inputs,
    make_proposer,
    proxy_search,
    prunable_groups,
    prune_to_ratios,
    short_finetune_loss,
)

INPUTS = example_inputs(1, 16)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = UNet(image_size=16, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                 attn_resolutions=(8,), head_dim=8)
    diffusion = Diffusion("linear", 100)
    images = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    proxy = functools.partial(short_finetune_loss, diffusion=diffusion, images=images, t_range=(0, 50), steps=2,
                              batch_size=4, eval_points=2)
    return model, 0.6 * count_macs(model, INPUTS), proxy


class CountingProxy:
    """Wraps a proxy and counts its calls."""

    def __init__(self, proxy):
        self.proxy, self.calls = proxy, 0

    def __call__(self, model):
        self.calls += 1
        return self.proxy(model)


def evolving():
    """Uniform, one random round, then evolution: the third round already conditions on the bank."""
    return EvolutionaryProposer(warmup=1)


def test_bank_persists_and_resumes_without_redoing_rounds(setup, tmp_path):
    model, budget, proxy = setup
    first = CountingProxy(proxy)
    proxy_search(model, budget, INPUTS, first, tmp_path / "bank.json", rounds=2, proposer=evolving())
    assert first.calls == 2 and len(json.loads((tmp_path / "bank.json").read_text())["rounds"]) == 2
    resumed = CountingProxy(proxy)
    bank = proxy_search(model, budget, INPUTS, resumed, tmp_path / "bank.json", rounds=3, proposer=evolving())
    assert resumed.calls == 1 and [e["round"] for e in bank.rounds] == [0, 1, 2]
    again = CountingProxy(proxy)
    proxy_search(model, budget, INPUTS, again, tmp_path / "bank.json", rounds=3, proposer=evolving())
    assert again.calls == 0
    straight = proxy_search(model, budget, INPUTS, proxy, tmp_path / "straight.json", rounds=3, proposer=evolving())
    assert straight.rounds == json.loads((tmp_path / "bank.json").read_text())["rounds"]  # resume == uninterrupted


def test_search_is_deterministic_for_fixed_seed(setup, tmp_path):
    model, budget, proxy = setup
    a = proxy_search(model, budget, INPUTS, proxy, tmp_path / "a.json", rounds=3, seed=3, proposer=evolving())
    b = proxy_search(model, budget, INPUTS, proxy, tmp_path / "b.json", rounds=3, seed=3, proposer=evolving())
    assert a.rounds == b.rounds
    assert a.best() == min(a.rounds, key=lambda e: e["score"])
    c = proxy_search(model, budget, INPUTS, lambda m: 0.0, tmp_path / "c.json", rounds=2, seed=4, proposer=evolving())
    assert c.rounds[1]["decision"] != a.rounds[1]["decision"]


@pytest.mark.parametrize("proposer", ["random", "evolutionary"])
def test_proposer_respects_budget(setup, tmp_path, proposer):
    model, budget, _ = setup
    score = lambda m: sum(p.detach().abs().sum().item() for p in m.parameters())
    bank = proxy_search(model, budget, INPUTS, score, tmp_path / "bank.json", rounds=4, proposer=proposer, tol=0.02)
    assert all(entry["macs"] <= budget * 1.02 for entry in bank.rounds)
    last = bank.rounds[-1]
    assert count_macs(candidate_model(model, last, INPUTS), INPUTS) == last["macs"]


class OneGroupProposer:
    """A user proposer (e.g. where an LLM would sit) that puts all pruning on one group: too little to reach budget."""

    name = "one_group"

    def propose(self, bank, space, rng):
        return {space.groups[0].name: 0.9}


def test_custom_proposer_is_repaired_to_budget(setup, tmp_path):
    model, budget, _ = setup
    bank = proxy_search(model, budget, INPUTS, lambda m: 0.0, tmp_path / "bank.json", rounds=1,
                        proposer=OneGroupProposer())
    entry = bank.rounds[0]
    assert entry["proposer"] == "one_group" and entry["macs"] <= budget * 1.02
    assert sum(r > 0 for r in entry["ratios"].values()) > 1  # blended towards uniform


def test_evolutionary_proposal_is_conditioned_on_bank(setup):
    model, budget, _ = setup
    groups = prunable_groups(model, INPUTS)
    space = SearchSpace(tuple(groups), 0.9, budget, 1.0)
    rng = random.Random(0)
    bank = [{"round": i, "ratios": {g.name: 0.1 * i for g in groups}, "score": s} for i, s in enumerate([3., 1., 2.])]
    elitist = EvolutionaryProposer(warmup=0, elite=1, p_mutate=0.0, p_crossover=0.0)
    assert elitist.propose(bank, space, rng) == bank[1]["ratios"]  # the best round's decision
    assert EvolutionaryProposer().propose([], space, rng) == {g.name: 0.45 for g in groups}  # uniform first


def test_bank_from_other_search_or_unknown_proposer_raises(setup, tmp_path):
    model, budget, _ = setup
    proxy_search(model, budget, INPUTS, lambda m: 0.0, tmp_path / "bank.json", rounds=1)
    with pytest.raises(ConfigError, match=r"different search \(differs in \['budget'\]\)"):
        proxy_search(model, 0.7 * budget, INPUTS, lambda m: 0.0, tmp_path / "bank.json", rounds=1)
    with pytest.raises(ConfigError, match=r"valid: \['evolutionary', 'random'\]"):
        make_proposer("gpt4")
    with pytest.raises(ConfigError, match="exceeds the full model"):
        proxy_search(model, 2 * budget, INPUTS, lambda m: 0.0, tmp_path / "other.json", rounds=1)
    assert MemoryBank.open(tmp_path / "missing.json", {}).rounds == []


def test_short_finetune_loss_is_deterministic_and_validates(setup):
    model, _, proxy = setup
    a, b = proxy(prune_to_ratios(model, 0.3, INPUTS)), proxy(prune_to_ratios(model, 0.3, INPUTS))
    assert a == b and a > 0
    with pytest.raises(ConfigError, match="t_range"):
        short_finetune_loss(model, Diffusion("linear", 100), torch.zeros(2, 1, 16, 16), (50, 50))
