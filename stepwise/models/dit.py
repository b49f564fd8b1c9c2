"""DiT: a diffusion transformer with adaLN-Zero blocks (Peebles & Xie 2023, arXiv 2212.09748), from timm layers."""
from __future__ import annotations

import torch
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Attention
from torch import nn

from .unet import timestep_embedding


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x * (1 + scale) + shift (DiT, Sec. 3.2)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (DiT, Sec. 3.2, Fig. 3)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads=heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada[-1].weight)
        nn.init.zeros_(self.ada[-1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, dim=1)  # 6 x (B, D)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), sh1, sc1))  # (B, N, D)
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), sh2, sc2))


class DiT(nn.Module):
    """Patchify -> N adaLN-Zero blocks -> linear decoder -> unpatchify (DiT, Sec. 3)."""

    def __init__(
        self,
        image_size: int = 28,
        in_channels: int = 1,
        out_channels: int | None = None,
        patch_size: int = 2,
        hidden_size: int = 192,
        depth: int = 6,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        self.out_channels, self.patch_size, self.hidden_size = out_channels or in_channels, patch_size, hidden_size
        self.x_embed = PatchEmbed(image_size, patch_size, in_channels, hidden_size, strict_img_size=True)
        self.grid = image_size // patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid**2, hidden_size))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.t_embed = nn.Sequential(nn.Linear(256, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear_out = nn.Linear(hidden_size, patch_size**2 * self.out_channels)
        for layer in (self.ada_out[-1], self.linear_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        c = self.t_embed(timestep_embedding(t, 256))  # (B, D)
        h = self.x_embed(x) + self.pos_embed  # (B, N, D)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.ada_out(c).chunk(2, dim=1)  # 2 x (B, D)
        h = self.linear_out(modulate(self.norm_out(h), shift, scale))  # (B, N, p*p*C)
        p, g = self.patch_size, self.grid
        h = h.reshape(B, g, g, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4)  # (B, C, g, p, g, p)
        return h.reshape(B, self.out_channels, H, W)
