"""Export-time patches, all in ONE reversible context manager. Each entry says why it is needed.
Patches must be numerically identical to the code they replace (verify.py checks ORT vs the
unpatched eager modules)."""

from __future__ import annotations

import contextlib

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from janusflow_trt.janusflow_ref import uvit


def _rms_norm_forward(self, hidden_states):
    # WHY: transformers' LlamaRMSNorm multiplies by torch.rsqrt, which exports as Sqrt + Reciprocal +
    # Mul; ONNX Runtime's SimplifiedLayerNormalization fusion only recognises x / sqrt(mean(x^2) + eps)
    # * w, so the rsqrt form runs as seven separate memory-bound ops per norm. Same math (the two forms
    # differ by float rounding only).
    dtype = hidden_states.dtype
    x = hidden_states.to(torch.float32)
    x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return self.weight * x.to(dtype)


def _spatial_l2(x):
    # WHY: torch.norm(p=2) over H, W exports as ReduceL2, which ONNX Runtime's CPU provider runs on its
    # generic reduction path for middle axes of NHWC; Pow + ReduceSum (whose middle-axes reduction has a
    # fast kernel) + Sqrt is ~4x faster (GRN of the golden widths, [2,24,24,3072]: 1.4 vs 5.3 ms). Same
    # math (the two forms differ by float rounding only). Pow, not x * x: the FP16 variant keeps a square
    # feeding a norm's reduction in FP32 (export/fp16.py), as it does RMSNorm's.
    return torch.sqrt(x.pow(2).sum(dim=(1, 2), keepdim=True))


PATCHES = [(LlamaRMSNorm, "forward", _rms_norm_forward), (uvit, "spatial_l2", _spatial_l2)]


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
