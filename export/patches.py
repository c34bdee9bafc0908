"""Export-time patches, all in ONE reversible context manager. Each entry says why it is needed.
Patches must be numerically identical to the code they replace (verify.py checks ORT vs the
unpatched eager modules)."""

from __future__ import annotations

import contextlib

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from . import graphs


def _gen_dec_forward(self, hidden, skip, t_emb, z, cfg_weight, dt):
    # WHY: GenDecGraph.forward splits the CFG batch with `Tensor.chunk(2)`. On a symbolic batch
    # dynamo lowers chunk to SplitToSequence, and onnxscript's constant folding then crashes on it
    # ("Error during constant folding for node ... SplitToSequence"). Slicing at B // 2 gives the
    # same halves (B = 2 * B_div is declared even) and exports as two Slice nodes.
    v = self.model.gen_decode(hidden[:, -self.model.cfg.num_gen_tokens:], skip, t_emb)
    n = v.shape[0] // 2
    z_half = graphs.euler_step(z[:n], graphs.cfg_combine(v[:n], v[n:], cfg_weight), dt)
    return v, torch.cat([z_half, z_half], dim=0)


def _rms_norm_forward(self, hidden_states):
    # WHY: transformers' LlamaRMSNorm multiplies by torch.rsqrt, which exports as Sqrt + Reciprocal +
    # Mul; ONNX Runtime's SimplifiedLayerNormalization fusion only recognises x / sqrt(mean(x^2) + eps)
    # * w, so the rsqrt form runs as seven separate memory-bound ops per norm. Same math (the two forms
    # differ by float rounding only).
    dtype = hidden_states.dtype
    x = hidden_states.to(torch.float32)
    x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return self.weight * x.to(dtype)


PATCHES = [(graphs.GenDecGraph, "forward", _gen_dec_forward), (LlamaRMSNorm, "forward", _rms_norm_forward)]


@contextlib.contextmanager
def export_patches():
    """Apply every patch; restore the originals on exit, also on error."""
    saved = [(owner, attr, owner.__dict__[attr]) for owner, attr, _ in PATCHES]
    try:
        for owner, attr, new in PATCHES:
            setattr(owner, attr, new)
        yield
    finally:
        for owner, attr, old in saved:
            setattr(owner, attr, old)
