"""Each building block against an independent formula written here from the paper/official math."""

from __future__ import annotations

import math

import numpy as np
import torch

from janusflow_trt.janusflow_ref.config import GenDecoderConfig, GenEncoderConfig
from janusflow_trt.janusflow_ref.uvit import (
    ConvNextBlock,
    GlobalResponseNorm,
    ShallowUViTDecoder,
    ShallowUViTEncoder,
    Unpatchify,
)
from janusflow_trt.tiny import randomize

G = torch.Generator().manual_seed(1)


def rand(*shape):
    return torch.randn(*shape, generator=G, dtype=torch.float64).float()


def test_rmsnorm_formula():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    n = LlamaRMSNorm(16, eps=1e-5)
    randomize(n, G)
    x = rand(3, 5, 16)
    xn = x.numpy().astype(np.float64)
    want = xn / np.sqrt((xn**2).mean(-1, keepdims=True) + 1e-5) * n.weight.detach().numpy()
    np.testing.assert_allclose(n(x).detach().numpy(), want, rtol=1e-5, atol=1e-6)


def test_grn_formula():
    grn = GlobalResponseNorm(8)
    randomize(grn, G)
    x = rand(2, 5, 6, 8)  # NHWC
    xn = x.numpy().astype(np.float64)
    gx = np.sqrt((xn**2).sum(axis=(1, 2), keepdims=True))  # L2 over H, W per channel
    nx = gx / (gx.mean(axis=-1, keepdims=True) + 1e-6)
    w, b = grn.weight.detach().numpy(), grn.bias.detach().numpy()
    want = w * (xn * nx) + b + xn  # gamma * (x * N(x)) + beta + x  (ConvNeXt-V2)
    np.testing.assert_allclose(grn(x).detach().numpy(), want, rtol=1e-5, atol=1e-5)


def test_timestep_embedding_formula():
    enc = ShallowUViTEncoder(GenEncoderConfig(input_channels=4, block_out_channels=(8,), hidden_size=16,
                                              kernel_size=2, stride=2, padding=0))
    t = torch.tensor([0.0, 33.3333, 500.0, 966.6667])
    half = 4
    freqs = np.exp(-math.log(10000) * np.arange(half) / half)  # downscale_freq_shift=0
    args = t.numpy()[:, None].astype(np.float64) * freqs[None]
    want = np.concatenate([np.cos(args), np.sin(args)], axis=1)  # flip_sin_to_cos=True: cos first
    np.testing.assert_allclose(enc.time_proj(t).numpy(), want, rtol=1e-5, atol=1e-5)


def test_film_in_convnext_block():
    blk = ConvNextBlock(8, 1e-6, True, 0.0, hidden_size=12)
    randomize(blk, G)
    x, cond = rand(2, 8, 5, 5), rand(2, 12)
    # Same block with the FiLM mapper zeroed out -> the un-modulated residual output h.
    with torch.no_grad():
        w, b = blk.cond_embeds_mapper.weight.clone(), blk.cond_embeds_mapper.bias.clone()
        blk.cond_embeds_mapper.weight.zero_()
        blk.cond_embeds_mapper.bias.zero_()
        h = blk(x, cond)
        blk.cond_embeds_mapper.weight.copy_(w)
        blk.cond_embeds_mapper.bias.copy_(b)
        out = blk(x, cond)
    ss = (torch.nn.functional.silu(cond) @ w.T + b).numpy()
    scale, shift = ss[:, :8], ss[:, 8:]
    want = h.numpy() * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)


def test_unpatchify_pixel_shuffle_layout():
    up = Unpatchify(6, 4, 2, True, 1e-6)
    randomize(up, G)
    x = rand(1, 6, 3, 3)
    with torch.no_grad():
        y = up.unpatch_conv(up.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))  # [1, 4*2*2, 3, 3]
        out = up(x)
    y = y.numpy()
    # PixelShuffle: out[c, 2h+i, 2w+j] = y[c*4 + i*2 + j, h, w]
    for c in range(4):
        for i in range(2):
            for j in range(2):
                np.testing.assert_allclose(out[0, c, i::2, j::2].numpy(), y[0, c * 4 + i * 2 + j], rtol=1e-6)


def test_decoder_input_norm_and_concat_order():
    """Official ShallowUViTDecoder: cat([RMSNorm over channels of x, skip]) -> mid block -> out convs."""
    dec = ShallowUViTDecoder(GenDecoderConfig(in_channels=8, out_channels=4, block_out_channels=(8,), upsamples=1,
                                              hidden_size=12, norm_eps=1e-6))
    randomize(dec, G)
    x, skip, t = rand(2, 8, 6, 6), rand(2, 8, 6, 6), rand(2, 12)
    with torch.no_grad():
        v = dec(x, skip, t)
        w = dec.input_norm.weight[None, :, None, None]
        normed = x / torch.sqrt((x * x).mean(dim=1, keepdim=True) + 1e-6) * w  # RMSNorm over C
        want = dec.out_convs[0](dec.mid_block(torch.cat([normed, skip], dim=1), t))
    assert v.shape == (2, 4, 12, 12)
    np.testing.assert_allclose(v.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)


def test_cfg_and_euler_update():
    from janusflow_trt.export.graphs import cfg_combine, euler_step

    vc, vu, z = rand(2, 4, 3, 3), rand(2, 4, 3, 3), rand(2, 4, 3, 3)
    w, dt = 5.0, 1.0 / 30
    want = z.numpy() + dt * (vc.numpy() + (w - 1.0) * (vc.numpy() - vu.numpy()))  # z + dt*(vu + w*(vc-vu))
    got = euler_step(z, cfg_combine(vc, vu, torch.tensor(w)), torch.tensor(dt))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_graph_time_projection_is_bitwise_diffusers():
    """The gen_enc graph's constant frequencies reproduce diffusers' Timesteps exactly (same torch ops)."""
    from janusflow_trt.export.graphs import GenEncGraph

    class Holder(torch.nn.Module):
        pass

    enc = ShallowUViTEncoder(GenEncoderConfig(input_channels=4, block_out_channels=(64,), hidden_size=16,
                                              kernel_size=2, stride=2, padding=0))
    randomize(enc, G)
    m = Holder()
    m.vision_gen_enc_model = enc
    m.vision_gen_enc_aligner = torch.nn.Linear(64, 16)
    g = GenEncGraph(m)
    t = torch.tensor([0.0, 33.333332, 500.0, 966.6667])
    args = t[:, None] * g.freqs[None]
    ours = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    assert torch.equal(ours, enc.time_proj(t))
    z = rand(4, 4, 8, 8)
    with torch.no_grad():
        x_emb, t_emb, _ = enc(z, t)
        step_embeds, t_emb2, _ = g(z, t)
        z_emb = m.vision_gen_enc_aligner(x_emb.flatten(2).transpose(1, 2))
    assert torch.equal(t_emb, t_emb2)
    assert torch.equal(step_embeds, torch.cat([t_emb[:, None], z_emb], dim=1))  # the official llm_emb order
