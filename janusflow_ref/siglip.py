"""SigLIP ViT for understanding, written to the timm VisionTransformer key layout (no timm).

Official: create_siglip_vit -> timm VisionTransformer(class_token=False, global_pool="map",
ignore_head=True): patch_embed.proj, pos_embed, blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2},
norm, and an attn_pool (AttentionPoolLatent) that is built, saved in the checkpoint, but never run
because ignore_head=True. LayerNorm eps 1e-6, exact GELU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import SigLIPConfig


class PatchEmbed(nn.Module):
    def __init__(self, cfg: SigLIPConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,3,H,W] -> [B,N,C]
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)  # bidirectional, scale 1/sqrt(head_dim)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, cfg: SigLIPConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.attn = Attention(cfg.width, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.mlp = Mlp(cfg.width, cfg.mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class AttentionPoolLatent(nn.Module):
    """Parameters of timm's AttentionPoolLatent (latent_len=1, qkv_bias=True): loaded, never run."""

    def __init__(self, cfg: SigLIPConfig):
        super().__init__()
        d = cfg.width
        self.latent = nn.Parameter(torch.empty(1, 1, d))
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.mlp = Mlp(d, cfg.mlp_hidden)


class SigLIPViT(nn.Module):
    def __init__(self, cfg: SigLIPConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.num_patches, cfg.width))
        self.blocks = nn.Sequential(*[Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)
        self.attn_pool = AttentionPoolLatent(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # forward_features: [B,3,H,W] -> [B,N,C]
        x = self.patch_embed(x) + self.pos_embed
        return self.norm(self.blocks(x))


class VisionTower(nn.Module):
    """CLIPVisionTower with a SigLIP tower: optional pixel normalisation, then the ViT features."""

    def __init__(self, cfg: SigLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = SigLIPViT(cfg)
        if cfg.pixel_mean is not None and cfg.pixel_std is not None:
            self.register_buffer("_mean", torch.tensor(cfg.pixel_mean).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("_std", torch.tensor(cfg.pixel_std).view(1, -1, 1, 1), persistent=False)
        else:
            self._mean = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self._mean is not None:
            images = (images - self._mean) / self._std
        # SigLIP towers force select_feature "same": every patch token, no cls to drop.
        return self.vision_tower(images)
