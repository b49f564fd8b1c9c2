"""Structural pruning, progressive budgets and importances (docs/checklist.md, items 13 and 14)."""
import math

import pytest
import torch
from torch import nn

from stepwise.diffusion import Diffusion
from stepwise.errors import ConfigError
from stepwise.flops import module_macs
from stepwise.models.dit import DiT
from stepwise.models.unet import AttnBlock, Downsample, UNet, Upsample
from stepwise.pruning import (
    GradientBatch,
    count_macs,
    example_inputs,
    make_scorer,
    progressive_budgets,
    prunable_groups,
    prune_to_budget,
    prune_to_ratios,
)
from stepwise.pruning.fit import budget_problem, predicted_macs
from stepwise.pruning.structural import kept_units


def tiny_unet():
    torch.manual_seed(0)
    return UNet(image_size=16, in_channels=1, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                attn_resolutions=(8,), head_dim=8)


def tiny_dit():
    torch.manual_seed(0)
    return DiT(image_size=16, in_channels=1, patch_size=4, hidden_size=32, depth=2, num_heads=2)


INPUTS = example_inputs(1, 16)


pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_progressive_budgets_hand_computed():
    # FLOPs(i) = (i/N + (N-i)/N k) F with F=100, N=4, k=0.2: i=1..4 -> 40, 60, 80, 100
    assert progressive_budgets(100.0, 4, 0.2, "high_t_largest") == pytest.approx([40, 60, 80, 100])
    assert progressive_budgets(100.0, 4, 0.2) == pytest.approx([100, 80, 60, 40])  # default: low t hardest, largest
    assert progressive_budgets(100.0, 3, 1.0) == pytest.approx([100, 100, 100])
    assert progressive_budgets(7.0, 1, 0.5) == pytest.approx([7.0])


@pytest.mark.parametrize("kwargs, match", [
    ({"k": 0.0}, r"k=0.0 must lie in \(0, 1\]"), ({"k": 1.5}, "must lie in"), ({"num_groups": 0}, "positive integer"),
    ({"direction": "middle"}, r"valid: \['high_t_largest', 'low_t_largest'\]"),
])
def test_progressive_budgets_invalid(kwargs, match):
    args = {"full_macs": 100.0, "num_groups": 4, "k": 0.5, **kwargs}
    with pytest.raises(ConfigError, match=match):
        progressive_budgets(**args)


def test_count_macs_counts_products_not_elementwise_work():
    # AttnBlock(16) on 8x8: qkv 1x1 conv 64*16*48, proj 64*16*16, QK^T + AV 2 * (HW)^2 * C; GroupNorm, biases: none
    block = AttnBlock(16, head_dim=8)
    inputs = (torch.zeros(1, 16, 8, 8), torch.zeros(1))
    assert count_macs(block, inputs) == 64 * 16 * 48 + 64 * 16 * 16 + 2 * 64**2 * 16
    total, own = module_macs(block, inputs)
    assert total == sum(own.values()) and own == {"qkv": 64 * 16 * 48, "proj": 64 * 16 * 16, "": 2 * 64**2 * 16}
    # timm Attention (DiT) on 16 tokens of width 32, 2 heads: its products count whatever kernel runs them
    dit = tiny_dit()
    total, own = module_macs(dit, INPUTS)
    assert own["blocks.0.attn"] == 2 * 16**2 * 32 and own["blocks.0.attn.qkv"] == 16 * 32 * 96
    assert total == count_macs(dit, INPUTS) == sum(own.values())


@pytest.mark.parametrize("importance", ["random", "magnitude"])
def test_pruned_unet_keeps_shapes_and_runs(importance):
    m = tiny_unet()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 70])
    before = m(x, t)
    pruned = prune_to_ratios(m, 0.5, INPUTS, importance=importance)
    out = pruned(x, t)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.equal(m(x, t), before)  # the original is untouched
    assert n_params(pruned) < 0.4 * n_params(m)
    assert 0.2 < count_macs(pruned, INPUTS) / count_macs(m, INPUTS) < 0.4  # ~ (1 - 0.5)^2 for conv in x out
    for mod in pruned.modules():
        if isinstance(mod, (Upsample, Downsample)):
            assert mod.channels == mod.conv.in_channels
        if isinstance(mod, AttnBlock):
            assert mod.qkv.out_channels == 3 * mod.proj.in_channels and mod.proj.in_channels % mod.heads == 0
        if isinstance(mod, nn.GroupNorm):
            assert mod.num_channels % mod.num_groups == 0
    assert pruned.conv_out.out_channels == 1


def test_pruned_dit_keeps_shapes_and_runs():
    m = tiny_dit()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 70])
    pruned = prune_to_ratios(m, 0.5, INPUTS, importance="magnitude")
    assert pruned(x, t).shape == x.shape
    attn = pruned.blocks[0].attn
    assert attn.num_heads == 2 and attn.head_dim == 8 and attn.qkv.out_features == 3 * attn.attn_dim
    assert pruned.hidden_size == 16 and pruned.pos_embed.shape == (1, 16, 16)


def test_pruning_a_dead_channel_preserves_the_function():
    m = tiny_unet()
    with torch.no_grad():
        for p in m.parameters():  # leave the zero init: every layer must matter
            p.normal_(0, 0.3)
        for gn in (mod for mod in m.modules() if isinstance(mod, nn.GroupNorm)):
            gn.bias.zero_()
        block, j = m.down[0][0], 5  # ResBlock(16 -> 16): FiLM group = conv1 out, emb rows j and 16 + j, conv2 in
        block.conv1.weight[j] = 0
        block.conv1.bias[j] = 0
        block.emb.weight[[j, 16 + j]] = 0
        block.emb.bias[[j, 16 + j]] = 0
        block.conv2.weight[:, j] = 0
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 70])
    name = "down.0.0.conv1"
    assert name in [g.name for g in prunable_groups(m, INPUTS)]
    pruned = prune_to_ratios(m, {name: 1 / 16}, INPUTS, importance="magnitude")
    assert pruned.down[0][0].conv1.out_channels == 15 and pruned.down[0][0].norm2.num_groups == 15  # 1 ch / group
    assert torch.allclose(pruned(x, t), m(x, t), atol=1e-5)
    live = prune_to_ratios(m, {name: 1 / 16}, INPUTS, importance="random", seed=1)
    assert not torch.allclose(live(x, t), m(x, t), atol=1e-3)  # removing a live channel does change it


def test_attention_groups_are_pruned_per_head():
    groups = {g.name: g for g in prunable_groups(tiny_unet(), INPUTS)}
    residual = [g for g in groups.values() if g.chunks > 1]
    assert residual and all(g.units == 32 and g.chunks == 4 for g in residual)  # 32 channels, head_dim 8
    assert kept_units(residual[0], 0.3) == 4 * math.floor(8 * 0.7)


def test_predicted_macs_match_measured():
    m = tiny_unet()
    problem = budget_problem(m, INPUTS)
    assert sum(macs for macs, _, _ in problem.mm.terms) == problem.mm.full  # every product scales with some layer
    ratios = {g.name: 0.1 * (i % 5) for i, g in enumerate(problem.groups)}
    kept = {g.name: kept_units(g, ratios[g.name]) for g in problem.groups}
    measured = count_macs(prune_to_ratios(m, ratios, INPUTS), INPUTS)
    assert predicted_macs(problem.mm, problem.groups, kept) == pytest.approx(measured, rel=0.01)


@pytest.mark.parametrize("build", [tiny_unet, tiny_dit])
def test_budgets_met_within_tolerance(build):
    m = build()
    full = count_macs(m, INPUTS)
    for budget in progressive_budgets(full, 3, 0.4)[1:]:
        pruned, ratios, macs = prune_to_budget(m, budget, INPUTS, tol=0.03)
        assert macs == count_macs(pruned, INPUTS) and max(ratios.values()) > 0
        assert budget * 0.95 <= macs <= budget * 1.03
        assert pruned(*INPUTS).shape == INPUTS[0].shape


def test_budget_above_model_raises():
    m = tiny_unet()
    with pytest.raises(ConfigError, match="exceeds the full model"):
        prune_to_budget(m, 1.1 * count_macs(m, INPUTS), INPUTS)


def test_budget_below_reachable_raises():
    m = tiny_unet()
    with pytest.raises(ConfigError, match="below the smallest reachable model"):
        prune_to_budget(m, 0.01 * count_macs(m, INPUTS), INPUTS)


def test_invalid_ratios_and_importance():
    m = tiny_unet()
    with pytest.raises(ConfigError, match=r"must lie in \[0, 1\)"):
        prune_to_ratios(m, 1.0, INPUTS)
    with pytest.raises(ConfigError, match="unknown channel group"):
        prune_to_ratios(m, {"nope": 0.5}, INPUTS)
    with pytest.raises(ConfigError, match=r"valid: \['diff_pruning', 'magnitude', 'random', 'taylor'\]"):
        prune_to_ratios(m, 0.5, INPUTS, importance="l1")
    with pytest.raises(ConfigError, match="needs a GradientBatch"):
        prune_to_ratios(m, 0.5, INPUTS, importance="taylor")


class Identity1x1(nn.Module):
    """eps_hat = w * x_t + b with w = 1, b = 0: with x0 = 0 the loss is L_t = (1 - sqrt(1 - abar_t))^2 mean(eps^2)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)
        nn.init.ones_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x, t):
        return self.conv(x)


@pytest.mark.parametrize("lo, stride", [(0, 1), (100, 7)])
def test_diff_pruning_stops_at_expected_t(lo, stride):
    diffusion = Diffusion("linear", 1000)
    images, noise = torch.zeros(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    batch = GradientBatch(diffusion, images, noise, (lo, 1000), t_stride=stride, thr=0.05)
    # hand: L_t / L_lo = ((1 - s_t) / (1 - s_lo))^2 with s_t = sqrt(1 - abar_t), decreasing in t
    s = (1 - diffusion.schedule.abar).sqrt()
    ratio = lambda t: ((1 - s[t]) / (1 - s[lo])).item() ** 2
    expected = next(t for t in range(lo, 1000, stride) if ratio(t) < 0.05)
    scorer = make_scorer(Identity1x1(), "diff_pruning", batch)
    assert scorer.timesteps == list(range(lo, expected + 1, stride))
    assert scorer.model.conv.weight.grad is not None and scorer.model.conv.weight.grad.abs().item() > 0


def test_taylor_accumulates_every_t_in_range():
    batch = GradientBatch(Diffusion("linear", 1000), torch.zeros(2, 1, 2, 2), torch.randn(2, 1, 2, 2), (10, 40),
                          t_stride=10)
    assert make_scorer(Identity1x1(), "taylor", batch).timesteps == [10, 20, 30]


def test_gradient_importances_prune_runnable_models():
    m = tiny_unet()
    images = torch.randn(4, 1, 16, 16)
    batch = GradientBatch(Diffusion("linear", 100), images, torch.randn_like(images), (0, 50), t_stride=25)
    for name in ("taylor", "diff_pruning"):
        pruned = prune_to_ratios(m, 0.3, INPUTS, importance=name, batch=batch)
        assert pruned(*INPUTS).shape == INPUTS[0].shape


def test_gradient_batch_validates():
    d = Diffusion("linear", 100)
    with pytest.raises(ConfigError, match="t_range"):
        GradientBatch(d, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), (50, 200))
    with pytest.raises(ConfigError, match="thr"):
        GradientBatch(d, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), (0, 50), thr=1.5)
