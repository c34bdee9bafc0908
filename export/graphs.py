"""The torch modules behind each exported graph. The torch backend runs these same modules eagerly,
so "torch backend" and "ORT backend" differ only in who executes the graph.

LLM cache contract (static buffers written at an index; see runtime/kv_cache.py):
- the runtime owns per-layer buffers K,V [B, n_kv, C, hd] (C = capacity, grown in buckets);
- a call passes the whole buffers as past_key_values.{i}.key/value plus attention_mask [B, C+S]
  (1 = a valid slot / new token, 0 = an empty or masked slot) and position_ids [B, S];
- the graph returns present.{i}.key/value for the S NEW positions only [B, n_kv, S, hd] (keys
  after RoPE); the runtime writes them into its buffers at the write index. Nothing in a decode
  step copies the cache: attention reads it once, as two score blocks (past, new) whose softmax
  is taken jointly, so the graph never concatenates K/V.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from janusflow_trt.janusflow_ref.model import JanusFlow

NEG = -1e9  # additive mask value; finite so a row never becomes all -inf/NaN
EXP_FLOOR = -60.0  # softmax's exp(s - max) argument floor (see _attend)


class SigLIPGraph(nn.Module):
    """pixel_values [B,3,S,S] -> image_embeds [B,1+N,H] (begin-of-understanding embedding first)."""

    def __init__(self, model: JanusFlow):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)


class EmbedGraph(nn.Module):
    """input_ids [B,S] int64 -> inputs_embeds [B,S,H]."""

    def __init__(self, model: JanusFlow):
        super().__init__()
        self.embed = model.language_model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)


def _exporting() -> bool:
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


def _attend(layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past_k: torch.Tensor,
            past_v: torch.Tensor, bias_past: torch.Tensor, bias_new: torch.Tensor, keep_past: torch.Tensor):
    """Attention over [cached slots | new tokens] without concatenating K/V: the softmax is taken
    jointly over the two score blocks (shared max, shared denominator)."""
    attn = layer.self_attn
    b, s, _ = x.shape
    hd = attn.head_dim
    q = attn.q_proj(x).view(b, s, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(b, s, -1, hd).transpose(1, 2)
    v = attn.v_proj(x).view(b, s, -1, hd).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    groups = attn.num_key_value_groups
    kp, vp, kn, vn = (t.repeat_interleave(groups, dim=1) if groups > 1 else t for t in (past_k, past_v, k, v))
    if s > 1 and not _exporting():
        # Eager runs only (the torch-fast backend): one fused SDPA over [cache | new] is much faster in
        # PyTorch; the exported graph keeps the two-block form below, which never copies the cache.
        mask = torch.cat([bias_past.expand(b, 1, s, -1), bias_new.expand(b, 1, s, s)], dim=-1)
        out = F.scaled_dot_product_attention(q, torch.cat([kp, kn], 2), torch.cat([vp, vn], 2), attn_mask=mask,
                                             scale=attn.scaling)
        return attn.o_proj(out.transpose(1, 2).reshape(b, s, -1)), k, v
    q = q * attn.scaling
    sp = q @ kp.transpose(-1, -2) + bias_past  # [B,nh,S,C]
    sn = q @ kn.transpose(-1, -2) + bias_new  # [B,nh,S,S]
    m = torch.maximum(sp.amax(-1, keepdim=True), sn.amax(-1, keepdim=True))
    # exp's argument floored at EXP_FLOOR: exp(NEG - m) would take the slow underflow path of ORT's CPU Exp
    # (8.2 vs 3.4 ms for a 2x8x577x577 causal block, with the Clip). Any term under the floor weighs < e^-60
    # of the row's largest (below FP32 resolution); cache slots that are masked or empty are then zeroed
    # (keep_past), so whatever a buffer holds there never reaches the output. A masked new position keeps
    # its e^-60 (its V is this call's own, finite), so a fully masked row (a pad query) stays finite.
    ep = torch.exp((sp - m).clamp_min(EXP_FLOOR)) * keep_past
    en = torch.exp((sn - m).clamp_min(EXP_FLOOR))
    out = (ep @ vp + en @ vn) / (ep.sum(-1, keepdim=True) + en.sum(-1, keepdim=True))
    out = attn.o_proj(out.transpose(1, 2).reshape(b, s, -1))
    return out, k, v


class LLMGraph(nn.Module):
    """One graph for prefill, decode and the Euler step over a cached prefix.

    inputs_embeds [B,S,H], attention_mask [B,C+S] int64, position_ids [B,S] int64,
    past_key_values.{i}.key/value [B,n_kv,C,hd]
    -> last_hidden_state [B,S,H] (after the final norm), logits [B,V] (last position),
       present.{i}.key/value [B,n_kv,S,hd] (new positions only).
    """

    def __init__(self, model: JanusFlow, hidden_only: bool = False):
        """hidden_only: return last_hidden_state alone (the llm_gen view: no LM head), as the Euler step reads."""
        super().__init__()
        self.lm = model.language_model
        self.num_layers = len(self.lm.model.layers)
        self.hidden_only = hidden_only

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        base = self.lm.model
        s = inputs_embeds.shape[1]
        c = past[0].shape[2]
        valid = attention_mask.to(torch.bool)
        bias_past = torch.where(valid[:, None, None, :c], 0.0, NEG).to(inputs_embeds.dtype)  # [B,1,1,C]
        keep_past = valid[:, None, None, :c].to(inputs_embeds.dtype)
        causal = torch.ones(s, s, dtype=torch.bool, device=inputs_embeds.device).tril()
        new_ok = causal[None, None] & valid[:, None, None, c:]
        bias_new = torch.where(new_ok, 0.0, NEG).to(inputs_embeds.dtype)
        cos, sin = base.rotary_emb(inputs_embeds, position_ids)
        h = inputs_embeds
        presents = []
        for i, layer in enumerate(base.layers):
            a, k, v = _attend(layer, layer.input_layernorm(h), cos, sin, past[2 * i], past[2 * i + 1],
                              bias_past, bias_new, keep_past)
            h = h + a
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            presents += [k, v]
        h = base.norm(h)
        if self.hidden_only:
            return h
        logits = self.lm.lm_head(h[:, -1, :]).float()
        return (h, logits, *presents)


def timestep_freqs(time_proj: nn.Module) -> torch.Tensor:
    """The frequencies diffusers' Timesteps computes at every call, computed once by torch the same way.

    Kept as a constant of the graph: with t up to 1000, one ulp of a differently rounded exp() moves
    sin/cos(t * f) by ~3e-5, which is visible after the encoder's FiLM layers."""
    half = time_proj.num_channels // 2
    exponent = -math.log(10000) * torch.arange(0, half, dtype=torch.float32) / (half - time_proj.downscale_freq_shift)
    return torch.exp(exponent)


class GenEncGraph(nn.Module):
    """z [B,4,48,48], t [B] -> step_embeds [B,1+G,H] (the Euler step's LLM input: t_emb, then the G
    aligned latent tokens, as the official loop concatenates them), t_emb [B,H], skip [B,C,g,g]."""

    def __init__(self, model: JanusFlow):
        super().__init__()
        self.model = model
        tp = model.vision_gen_enc_model.time_proj
        assert tp.flip_sin_to_cos and tp.scale == 1 and tp.num_channels % 2 == 0, "JanusFlow's Timesteps config"
        self.register_buffer("freqs", timestep_freqs(tp), persistent=False)

    def forward(self, z: torch.Tensor, t: torch.Tensor):
        args = t[:, None].float() * self.freqs[None, :]
        t_proj = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # flip_sin_to_cos: cos first
        z_emb, t_emb, skip = self.model.vision_gen_enc_model.forward_from_proj(z, t_proj)
        z_emb = self.model.vision_gen_enc_aligner(z_emb.flatten(2).permute(0, 2, 1))
        return torch.cat([t_emb.unsqueeze(1), z_emb], dim=1), t_emb, skip


def cfg_combine(v_cond: torch.Tensor, v_uncond: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance exactly as the official demo writes it."""
    return w * v_cond - (w - 1.0) * v_uncond


def euler_step(z: torch.Tensor, v: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    return z + dt * v


class GenDecGraph(nn.Module):
    """hidden [B,1+G,H] (the LLM's last_hidden_state of the step; the last G positions are used, as the
    official hidden_states[:, -576:]), skip, t_emb, z [B,4,48,48] (cond rows then
    uncond rows, both halves equal), cfg_weight [1], dt [1]
    -> velocity [B,4,48,48], z_next [B,4,48,48] (CFG + Euler applied, duplicated to both halves so it
    feeds the next step's encoder directly)."""

    def __init__(self, model: JanusFlow):
        super().__init__()
        self.model = model

    def forward(self, hidden, skip, t_emb, z, cfg_weight, dt):
        v = self.model.gen_decode(hidden[:, -self.model.cfg.num_gen_tokens:], skip, t_emb)
        # slices, not chunk(2): on a symbolic batch dynamo lowers chunk to SplitToSequence, which
        # onnxscript's constant folding cannot handle; B is declared even, so the halves are the same
        n = v.shape[0] // 2
        z_half = euler_step(z[:n], cfg_combine(v[:n], v[n:], cfg_weight), dt)
        return v, torch.cat([z_half, z_half], dim=0)


class VAEDecGraph(nn.Module):
    """latents [B,4,48,48] -> image [B,3,384,384] in [-1,1]-ish (unclamped).

    The scaling factor is applied HERE and only here: image = vae.decode(latents / scaling_factor).
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scaling_factor).sample
