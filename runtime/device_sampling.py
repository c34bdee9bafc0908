"""Next-token choice on the logits' own device, with no host sync: the official chain (transformers 4.x
`generate`: temperature -> top-k -> top-p, softmax, torch.multinomial; greedy = argmax), written out
so that nothing in it reads a value back (the reference, janusflow_ref/sampling.py, checks finiteness
with two host syncs). Non-finite logits come back as token id NONFINITE (-1), probabilities that
overflowed (logits / temperature beyond float32) as OVERFLOW (-2): the token id is the one value the
host reads per step, so the checks ride on it.

Same ops, same order, same dtype as transformers' warpers, so on the same RNG state it draws the same
token as the reference (tests/test_device_decode.py checks that on the CPU).
"""

from __future__ import annotations

import torch

from janusflow_trt.janusflow_ref.sampling import SamplingParams

NONFINITE, OVERFLOW = -1, -2


def warp_on_device(scores: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """scores [B,V] float32 -> warped scores (filtered entries -inf)."""
    if p.temperature != 1.0:
        scores = scores / p.temperature  # TemperatureLogitsWarper
    if p.top_k:  # TopKLogitsWarper: below the k-th largest -> -inf
        kth = torch.topk(scores, min(p.top_k, scores.size(-1)))[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if p.top_p < 1.0:  # TopPLogitsWarper: ascending sort, drop the mass <= 1 - top_p, keep the largest
        sorted_logits, sorted_idx = torch.sort(scores, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= (1 - p.top_p)
        drop[..., -1:] = 0
        scores = scores.masked_fill(drop.scatter(1, sorted_idx, drop), -float("inf"))
    return scores


def sample_on_device(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None = None
                     ) -> torch.Tensor:
    """logits [B,V] -> token ids [B] int64 on the same device (NONFINITE where the logits or the warped
    probabilities are not finite). generator None: the device's default RNG (torch.manual_seed)."""
    logits = logits.to(torch.float32)
    finite = torch.isfinite(logits).all(dim=-1)
    if p.greedy:
        tok = torch.argmax(logits, dim=-1)
        return torch.where(finite, tok, torch.full_like(tok, NONFINITE))
    probs = torch.softmax(warp_on_device(logits, p), dim=-1)
    ok = finite & torch.isfinite(probs).all(dim=-1)
    # multinomial refuses non-finite rows (a host-side error): those rows draw from a harmless uniform
    # instead and are reported by their sentinel; valid rows keep their probabilities bit for bit
    probs = torch.where(ok[:, None], probs, torch.ones_like(probs))
    tok = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
    tok = torch.where(ok, tok, torch.full_like(tok, OVERFLOW))
    return torch.where(finite, tok, torch.full_like(tok, NONFINITE))
