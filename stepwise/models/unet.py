"""A DDPM/ADM-style UNet denoiser (Ho et al. 2020, arXiv 2006.11239, App. B; Dhariwal & Nichol 2021, arXiv 2105.05233).

Plain nn.Conv2d / nn.GroupNorm / nn.Linear layers only, so Torch-Pruning's dependency graph can prune channels
structurally. Attention runs through F.scaled_dot_product_attention.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t (B,) -> (B, dim) (Vaswani et al. 2017, Sec. 3.5; DDPM App. B)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)  # (half,)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    return F.pad(emb, (0, dim % 2))  # (B, dim)


def norm(ch: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups that divide the channel count."""
    groups = math.gcd(32, ch)
    return nn.GroupNorm(groups, ch)


class ResBlock(nn.Module):
    """Residual block with FiLM time conditioning (ADM 'use_scale_shift_norm', Dhariwal & Nichol 2021, Sec. 3)."""

    def __init__(self, cin: int, cout: int, temb: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(temb, 2 * cout)
        self.norm2, self.drop, self.conv2 = norm(cout), nn.Dropout(dropout), nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, cout, H, W)
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # 2 x (B, cout, 1, 1)
        h = torch.addcmul(shift, self.norm2(h), 1 + scale)  # norm2(h) * (1 + scale) + shift, one pass
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over spatial positions (ADM, Dhariwal & Nichol 2021, Sec. 3)."""

    def __init__(self, ch: int, head_dim: int = 32):
        super().__init__()
        self.heads = max(1, ch // head_dim)
        self.norm, self.qkv, self.proj = norm(ch), nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)  # (B, 3, h, d, HW)
        # one copy to head-major layout: SDPA's fused kernels need d contiguous (else it falls back to plain matmuls)
        q, k, v = qkv.transpose(-1, -2).contiguous().unbind(1)  # 3 x (B, h, HW, d)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, h, HW, d)
        h = h.permute(0, 1, 3, 2).reshape(B, C, H, W)
        return x + self.proj(h)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution."""

    def __init__(self, ch: int):
        super().__init__()
        self.channels = ch
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x, emb=None):
        return self.conv(x)


def nearest_x2_phase_kernels(w: torch.Tensor) -> torch.Tensor:
    """A 3x3 kernel applied after nearest-neighbour x2 upsampling, as four 2x2 kernels on the low-resolution grid,
    one per output-pixel parity (sub-pixel convolution, Shi et al. 2016, arXiv 1609.05158, Sec. 2.2):
    (O, I, 3, 3) -> (2, 2, O, I, 2, 2), indexed (row parity, column parity, ...).

    Output row 2i+p reads upsampled rows 2i+p-1 .. 2i+p+1, which are low-resolution rows (i-1, i, i) for p = 0 and
    (i, i, i+1) for p = 1: the taps that read the same row add up, leaving 2 taps per axis, 16 instead of 36
    multiply-adds per output pixel and channel pair.
    """
    def fold(k: torch.Tensor, dim: int) -> torch.Tensor:  # 3 taps along dim -> (2 parities, ..., 2 taps, ...)
        a, b, c = k.unbind(dim)
        return torch.stack([torch.stack([a, b + c], dim), torch.stack([a + b, c], dim)])

    return fold(fold(w, 2), 4).transpose(0, 1)  # (2, 2, O, I, 2, 2)


def observed(module: nn.Module) -> bool:
    """Whether forward hooks on `module` watch it (Torch-Pruning's tracer, MAC counters), so it must run as itself.
    (Global module hooks, as torch's FlopCounterMode installs, do not count: they should see what runs.)"""
    return bool(module._forward_hooks or module._forward_pre_hooks)


class Upsample(nn.Module):
    """Nearest-neighbour x2 (to an explicit size, so odd sizes such as 7 -> 14 round-trip) then 3x3 convolution.

    An exact doubling runs as the equivalent sub-pixel convolution on the low-resolution input
    (`nearest_x2_phase_kernels`: same parameters, same output up to float rounding, 16/36 of the multiply-adds);
    other sizes, and a convolution watched by hooks, run literally.
    """

    def __init__(self, ch: int):
        super().__init__()
        self.channels = ch
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, emb=None, size=None):
        B, C, H, W = x.shape
        if (size is not None and tuple(size) != (2 * H, 2 * W)) or observed(self.conv):
            return self.conv(F.interpolate(x, size=size, scale_factor=None if size else 2, mode="nearest"))
        out = self.conv.out_channels
        kernels = nearest_x2_phase_kernels(self.conv.weight).reshape(4 * out, C, 2, 2)  # (4 O, C, 2, 2)
        bias = self.conv.bias.repeat(4) if self.conv.bias is not None else None  # (4 O,)
        y = F.conv2d(x, kernels, bias, padding=1).view(B, 2, 2, out, H + 1, W + 1)  # (B, 2, 2, O, H+1, W+1)
        # parity (p, q) holds output pixels (2i+p, 2j+q): rows p..p+H, columns q..q+W of its padded map
        phases = torch.stack([torch.stack([y[:, p, q, :, p:p + H, q:q + W] for q in (0, 1)], -1)
                              for p in (0, 1)], -3)  # (B, O, H, 2, W, 2)
        return phases.reshape(B, out, 2 * H, 2 * W)  # (B, O, 2H, 2W)


class UNet(nn.Module):
    """Denoiser eps/x0/v_theta(x_t, t) with channel multipliers per resolution and attention at chosen resolutions."""

    def __init__(
        self,
        image_size: int = 28,
        in_channels: int = 1,
        out_channels: int | None = None,
        base_channels: int = 64,
        channel_mult: tuple = (1, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: tuple = (14,),
        dropout: float = 0.0,
        head_dim: int = 32,
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        temb = 4 * base_channels
        self.base_channels = base_channels
        self.time_embed = nn.Sequential(nn.Linear(base_channels, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down, skips, ch, res = nn.ModuleList(), [base_channels], base_channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                blocks = [ResBlock(ch, base_channels * mult, temb, dropout)]
                ch = base_channels * mult
                if res in attn_resolutions:
                    blocks.append(AttnBlock(ch, head_dim))
                self.down.append(nn.ModuleList(blocks))
                skips.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(ch)]))
                skips.append(ch)
                res = (res + 1) // 2
        self.mid = nn.ModuleList([ResBlock(ch, ch, temb, dropout), AttnBlock(ch, head_dim), ResBlock(ch, ch, temb, dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                blocks = [ResBlock(ch + skips.pop(), base_channels * mult, temb, dropout)]
                ch = base_channels * mult
                if res in attn_resolutions:
                    blocks.append(AttnBlock(ch, head_dim))
                if level and i == num_res_blocks:
                    blocks.append(Upsample(ch))
                    res *= 2
                self.up.append(nn.ModuleList(blocks))
        self.norm_out, self.conv_out = norm(ch), nn.Conv2d(ch, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(t, self.base_channels))  # (B, temb)
        h = self.conv_in(x)  # (B, C0, H, W)
        hs = [h]
        for blocks in self.down:
            for block in blocks:
                h = block(h, emb)
            hs.append(h)
        for block in self.mid:
            h = block(h, emb)
        for blocks in self.up:
            h = torch.cat([h, hs.pop()], dim=1)  # (B, C + C_skip, H, W)
            for block in blocks:
                h = block(h, emb, size=hs[-1].shape[-2:]) if isinstance(block, Upsample) else block(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C_out, H, W)
