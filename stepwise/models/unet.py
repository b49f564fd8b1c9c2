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
        h = self.norm2(h) * (1 + scale) + shift
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
        q, k, v = qkv.permute(1, 0, 2, 4, 3).unbind(0)  # 3 x (B, h, HW, d)
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


class Upsample(nn.Module):
    """Nearest-neighbour x2 (to an explicit size, so odd sizes such as 7 -> 14 round-trip) then 3x3 convolution."""

    def __init__(self, ch: int):
        super().__init__()
        self.channels = ch
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, emb=None, size=None):
        return self.conv(F.interpolate(x, size=size, scale_factor=None if size else 2, mode="nearest"))


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
