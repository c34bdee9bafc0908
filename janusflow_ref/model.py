"""MultiModalityCausalLM equivalent: the official attribute names, so state-dict keys match.

Widths derive from the config (official: hard-coded 1024->2048, 768->2048, 2048->768).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from .config import JanusFlowConfig
from .siglip import VisionTower
from .uvit import ShallowUViTDecoder, ShallowUViTEncoder


class JanusFlow(nn.Module):
    def __init__(self, cfg: JanusFlowConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden
        self.vision_und_enc_model = VisionTower(cfg.siglip)
        self.vision_und_enc_aligner = nn.Linear(cfg.siglip.width, h, bias=True)
        self.beg_of_und_embed = nn.Parameter(torch.empty(1, h))
        self.vision_gen_enc_model = ShallowUViTEncoder(cfg.gen_enc)
        self.vision_gen_enc_aligner = nn.Linear(cfg.gen_enc.channels, h, bias=True)
        self.vision_gen_dec_model = ShallowUViTDecoder(cfg.gen_dec)
        self.language_model = LlamaForCausalLM(cfg.llm)
        self.vision_gen_dec_aligner_norm = LlamaRMSNorm(h, eps=cfg.llm.rms_norm_eps)
        self.vision_gen_dec_aligner = nn.Linear(h, cfg.gen_dec.in_channels, bias=True)

    # -- understanding -------------------------------------------------------------------------
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B,3,S,S] -> [B, 1+N, hidden]: begin-of-understanding embedding, then N aligned patches."""
        feats = self.vision_und_enc_aligner(self.vision_und_enc_model(pixel_values))
        beg = self.beg_of_und_embed[0].view(1, 1, -1).expand(feats.shape[0], 1, -1)
        return torch.cat([beg.to(feats.dtype), feats], dim=1)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_input_embeddings()(input_ids)

    # -- generation ----------------------------------------------------------------------------
    def gen_encode(self, z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [B,4,48,48], t [B] -> (image-side embeddings [B,G,hidden], t_emb [B,hidden], skip [B,C,g,g])."""
        z_emb, t_emb, skip = self.vision_gen_enc_model(z, t)
        z_emb = self.vision_gen_enc_aligner(z_emb.flatten(2).permute(0, 2, 1))
        return z_emb, t_emb, skip

    def gen_decode(self, hidden: torch.Tensor, skip: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        """hidden [B,G,hidden] (LLM states of the G image positions) -> velocity [B,4,48,48]."""
        g = self.cfg.latent_grid
        x = self.vision_gen_dec_aligner(self.vision_gen_dec_aligner_norm(hidden))
        x = x.reshape(x.shape[0], g, g, x.shape[-1]).permute(0, 3, 1, 2)
        return self.vision_gen_dec_model(x, skip, t_emb)
