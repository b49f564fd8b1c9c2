import pytest
import torch

from stepwise.errors import ConfigError
from stepwise.models import build_model, count_params


@pytest.mark.parametrize("cfg,size,ch", [
    (dict(name="unet", base_channels=16, channel_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[7]), 28, 1),
    (dict(name="unet", base_channels=16, channel_mult=[1, 2], num_res_blocks=2, attn_resolutions=[16]), 16, 3),
    (dict(name="dit", patch_size=2, hidden_size=32, depth=2, num_heads=2), 16, 1),
    (dict(name="dit", patch_size=4, hidden_size=32, depth=1, num_heads=4), 28, 3),
])
def test_shapes_and_grad(cfg, size, ch):
    model = build_model(cfg, size, ch)
    x, t = torch.randn(3, ch, size, size), torch.tensor([0, 500, 999])
    out = model(x, t)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert count_params(model) > 0


def test_zero_init_output():
    # output layers start at zero (DDPM/ADM/DiT convention), so an untrained model predicts 0
    for cfg in (dict(name="unet", base_channels=8, channel_mult=[1], num_res_blocks=1, attn_resolutions=[]),
                dict(name="dit", patch_size=2, hidden_size=16, depth=1, num_heads=2)):
        assert build_model(cfg, 8, 1)(torch.randn(2, 1, 8, 8), torch.tensor([1, 2])).abs().max() == 0


@pytest.mark.parametrize("cfg,match", [
    (dict(name="resnet"), "valid: \\['dit', 'unet'\\]"),
    (dict(name="unet", widht=3), "no parameter\\(s\\) \\['widht'\\]"),
    (dict(name="dit", patch_size=3), "must divide the image size"),
    (dict(name="dit", hidden_size=10, num_heads=3), "divisible"),
])
def test_config_errors(cfg, match):
    with pytest.raises(ConfigError, match=match):
        build_model(cfg, 28, 1)


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone():
    cfg = dict(name="unet", base_channels=8, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[])
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    a = build_model(cfg, 16, 1, seed=5)
    after = torch.rand(1)
    b, c = build_model(cfg, 16, 1, seed=5), build_model(cfg, 16, 1, seed=6)
    assert torch.equal(before, after)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))
