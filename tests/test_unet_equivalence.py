"""The UNet's faster forms compute what the literal formulas compute: same parameters, outputs and gradients up to
float rounding (sub-pixel upsampling convolution, fused FiLM)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stepwise.models.unet import (AttnBlock, Downsample, ResBlock, UNet, Upsample, nearest_x2_phase_kernels,
                                  timestep_embedding)


def literal_upsample(block: Upsample, x, size=None):
    """The previous Upsample.forward: nearest-neighbour x2 then the 3x3 convolution."""
    return block.conv(F.interpolate(x, size=size, scale_factor=None if size else 2, mode="nearest"))


def literal_resblock(block: ResBlock, x, emb):
    """The previous ResBlock.forward: FiLM as norm2(h) * (1 + scale) + shift."""
    h = block.conv1(F.silu(block.norm1(x)))
    scale, shift = block.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
    h = block.norm2(h) * (1 + scale) + shift
    h = block.conv2(block.drop(F.silu(h)))
    return block.skip(x) + h


def literal_unet(model: UNet, x, t):
    """The previous UNet.forward with the literal blocks."""
    def run(block, h, emb, size=None):
        if isinstance(block, Upsample):
            return literal_upsample(block, h, size)
        if isinstance(block, ResBlock):
            return literal_resblock(block, h, emb)
        assert isinstance(block, (AttnBlock, Downsample))  # unchanged
        return block(h, emb)

    emb = model.time_embed(timestep_embedding(t, model.base_channels))
    h = model.conv_in(x)
    hs = [h]
    for blocks in model.down:
        for block in blocks:
            h = run(block, h, emb)
        hs.append(h)
    for block in model.mid:
        h = run(block, h, emb)
    for blocks in model.up:
        h = torch.cat([h, hs.pop()], dim=1)
        for block in blocks:
            h = run(block, h, emb, size=hs[-1].shape[-2:] if isinstance(block, Upsample) else None)
    return model.conv_out(F.silu(model.norm_out(h)))


def grads(out, params, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, params, g)


def assert_close_grads(a, b, rtol=1e-4):
    scale = max(x.abs().max().item() for x in a)  # parameters whose exact gradient is 0 (biases before a
    for x, y in zip(a, b):                        # GroupNorm) carry only rounding noise: compare on one scale
        torch.testing.assert_close(y, x, rtol=0, atol=rtol * scale)


def test_phase_kernels_sum_the_taps_that_read_the_same_row():
    w = torch.arange(9.0).reshape(1, 1, 3, 3)  # rows (0 1 2), (3 4 5), (6 7 8)
    k = nearest_x2_phase_kernels(w)
    assert k.shape == (2, 2, 1, 1, 2, 2)
    assert k[0, 0, 0, 0].tolist() == [[0, 1 + 2], [3 + 6, 4 + 5 + 7 + 8]]
    assert k[1, 1, 0, 0].tolist() == [[0 + 1 + 3 + 4, 2 + 5], [6 + 7, 8]]
    assert k.sum().item() == 4 * w.sum().item()  # every tap lands in each parity exactly once


@pytest.mark.parametrize("cin, cout, h, w", [(8, 8, 7, 7), (6, 4, 14, 10), (3, 5, 1, 2)])
def test_subpixel_upsample_equals_nearest_then_conv(cin, cout, h, w):
    torch.manual_seed(0)
    block = Upsample(cin)
    block.conv = nn.Conv2d(cin, cout, 3, padding=1)  # as after channel pruning: in and out may differ
    x = torch.randn(2, cin, h, w, requires_grad=True)
    fast, ref = block(x, size=(2 * h, 2 * w)), literal_upsample(block, x)
    assert fast.shape == ref.shape == (2, cout, 2 * h, 2 * w)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    params = (x, block.conv.weight, block.conv.bias)
    assert_close_grads(grads(ref, params), grads(fast, params))
    torch.testing.assert_close(block(x), ref, rtol=1e-5, atol=1e-5)  # size None: x2


def test_upsample_runs_literally_for_odd_sizes_and_when_hooked():
    block = Upsample(4)
    x = torch.randn(1, 4, 7, 7)
    torch.testing.assert_close(block(x, size=(13, 13)), literal_upsample(block, x, (13, 13)))  # 7 -> 13: no x2
    calls = []
    handle = block.conv.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    try:
        block(x, size=(14, 14))
    finally:
        handle.remove()
    assert calls == [torch.Size([1, 4, 14, 14])]  # tracers and MAC counters see the convolution they hook


@pytest.mark.parametrize("size, mult, res", [(28, (1, 2, 4), (7,)), (16, (1, 2), (8,)), (25, (1, 2, 2), (13,))])
def test_unet_matches_the_literal_formulas(size, mult, res):
    torch.manual_seed(0)
    model = UNet(image_size=size, base_channels=16, channel_mult=mult, num_res_blocks=1, attn_resolutions=res)
    with torch.no_grad():
        for p in model.parameters():  # the zero-initialised output layers would hide differences
            p.add_(0.05 * torch.randn_like(p))
    x, t = torch.randn(3, 1, size, size), torch.tensor([0, 500, 999])
    fast, ref = model(x, t), literal_unet(model, x, t)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    params = list(model.parameters())
    assert_close_grads(grads(ref, params), grads(fast, params))


def test_flop_counter_sees_the_subpixel_convolution():
    """FlopCounterMode's global module hooks must not switch Upsample to the literal form: count what runs."""
    from torch.utils.flop_counter import FlopCounterMode

    model = UNet(image_size=16, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=())
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([1, 2])
    counts = []
    for forward in (model, lambda x, t: literal_unet(model, x, t)):
        with FlopCounterMode(display=False) as counter:
            forward(x, t)
        counts.append(counter.get_total_flops())
    up = model.up[1][-1].conv  # the one Upsample: 16 ch, 8x8 -> 16x16
    pairs = 2 * 2 * up.in_channels * up.out_channels  # multiply-add x batch x channel pairs
    assert counts[1] - counts[0] == pairs * (16 * 16 * 9 - 9 * 9 * 4 * 4)  # 9 taps at 16x16 vs 4 phases x 4 taps at 9x9
