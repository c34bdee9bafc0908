"""ShallowUViT generation encoder/decoder: ConvNeXt blocks with RMSNorm, GRN and FiLM from t_emb.

Key layout and numerics follow janus/janusflow/models/uvit.py. RMSNorm is transformers'
LlamaRMSNorm (as there), the timestep embedding is diffusers' Timesteps + TimestepEmbedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from .config import GenDecoderConfig, GenEncoderConfig


def channels_last_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a last-dim norm over the channels of an NCHW tensor."""
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def spatial_l2(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of NHWC x over H and W -> [B,1,1,C] (export/patches.py swaps in the form ORT reduces fast)."""
    return torch.norm(x, p=2, dim=(1, 2), keepdim=True)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN on NHWC: x * (1 + w * N(x)) + b, N = spatial L2 norm over its channel mean."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, 1, 1, dim))
        self.bias = nn.Parameter(torch.empty(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = spatial_l2(x)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return torch.addcmul(self.bias, self.weight * nx + 1, x)


class ConvNextBlock(nn.Module):
    def __init__(self, channels: int, norm_eps: float, use_bias: bool, dropout: float, hidden_size: int,
                 ffn_factor: int = 4):
        super().__init__()
        inner = int(channels * ffn_factor)
        self.depthwise = nn.Conv2d(channels, channels, kernel_size=7, padding=3, groups=channels, bias=use_bias)
        self.norm = LlamaRMSNorm(channels, norm_eps)
        self.channelwise_linear_1 = nn.Linear(channels, inner, bias=use_bias)
        self.channelwise_act = nn.GELU()
        self.channelwise_norm = GlobalResponseNorm(inner)
        self.channelwise_linear_2 = nn.Linear(inner, channels, bias=use_bias)
        self.channelwise_dropout = nn.Dropout(dropout)
        self.cond_embeds_mapper = nn.Linear(hidden_size, channels * 2, use_bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.depthwise(x).permute(0, 2, 3, 1)
        h = self.channelwise_linear_1(self.norm(h))
        h = self.channelwise_linear_2(self.channelwise_norm(self.channelwise_act(h)))
        x = self.channelwise_dropout(h).permute(0, 3, 1, 2) + x
        scale, shift = self.cond_embeds_mapper(F.silu(cond)).chunk(2, dim=1)
        return film(x, scale, shift)


def film(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """FiLM: shift + x * (1 + scale), scale/shift [B,C] broadcast over H,W."""
    return torch.addcmul(shift[:, :, None, None], x, (1 + scale)[:, :, None, None])


class UVitBlock(nn.Module):
    """Official UVitBlock with downsample=upsample=False (the only form JanusFlow builds)."""

    def __init__(self, channels: int, num_res_blocks: int, hidden_size: int, dropout: float, norm_eps: float,
                 use_bias: bool):
        super().__init__()
        self.res_blocks = nn.ModuleList(
            ConvNextBlock(channels, norm_eps, use_bias, dropout, hidden_size) for _ in range(num_res_blocks)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for blk in self.res_blocks:
            x = blk(x, emb)
        return x


class Unpatchify(nn.Module):
    """RMSNorm over channels, 1x1 conv to out*p*p, PixelShuffle(p)."""

    def __init__(self, in_channels: int, out_channels: int, patch_size: int, bias: bool, eps: float):
        super().__init__()
        self.norm = LlamaRMSNorm(in_channels, eps)
        self.unpatch_conv = nn.Conv2d(in_channels, out_channels * patch_size * patch_size, kernel_size=1, bias=bias)
        self.pixel_shuffle = nn.PixelShuffle(patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pixel_shuffle(self.unpatch_conv(channels_last_norm(self.norm, x)))


class ShallowUViTEncoder(nn.Module):
    def __init__(self, cfg: GenEncoderConfig):
        super().__init__()
        c0 = cfg.block_out_channels[0]
        self.time_proj = Timesteps(c0, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(c0, cfg.hidden_size, sample_proj_bias=cfg.use_bias)
        self.in_conv = nn.Conv2d(cfg.input_channels, c0, kernel_size=cfg.kernel_size, stride=cfg.stride,
                                 padding=cfg.conv_padding)
        self.mid_block = (
            UVitBlock(cfg.block_out_channels[-1], cfg.layers_in_middle, cfg.hidden_size, cfg.dropout,
                      cfg.norm_eps, cfg.use_bias)
            if cfg.use_mid_block else None
        )

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B,4,48,48], timesteps [B] -> (x_emb [B,C,24,24], t_emb [B,hidden], skip = x_emb)."""
        return self.forward_from_proj(x, self.time_proj(timesteps.flatten()))

    def forward_from_proj(self, x: torch.Tensor, t_proj: torch.Tensor):
        """As forward, from the sinusoidal projection t_proj [B, C0] instead of the timesteps."""
        t_emb = self.time_embed(t_proj.view(x.shape[0], -1).to(x.dtype))
        x_emb = self.in_conv(x)
        if self.mid_block is not None:
            x_emb = self.mid_block(x_emb, t_emb)
        return x_emb, t_emb, x_emb


class ShallowUViTDecoder(nn.Module):
    def __init__(self, cfg: GenDecoderConfig):
        super().__init__()
        c = cfg.block_out_channels[-1]
        self.mid_block = (
            UVitBlock(cfg.in_channels + c, cfg.layers_in_middle, cfg.hidden_size, cfg.dropout, cfg.norm_eps,
                      cfg.use_bias)
            if cfg.use_mid_block else None
        )
        self.out_convs = nn.ModuleList()
        for rank in range(cfg.upsamples):
            cin = c + cfg.in_channels if rank == 0 else c
            cout = cfg.out_channels if rank == cfg.upsamples - 1 else c
            self.out_convs.append(Unpatchify(cin, cout, 2, cfg.use_bias, cfg.norm_eps))
        self.input_norm = LlamaRMSNorm(cfg.in_channels, cfg.norm_eps)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        """x [B,C,24,24] (aligned LLM states), skip [B,C,24,24], t_emb [B,hidden] -> velocity [B,4,48,48]."""
        x = torch.cat([channels_last_norm(self.input_norm, x), skip], dim=1)
        if self.mid_block is not None:
            x = self.mid_block(x, t_emb)
        for out_conv in self.out_convs:
            x = out_conv(x)
        return x
