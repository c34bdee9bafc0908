"""Next-token choice as the official demo gets it from transformers 4.x `generate`.

Official: do_sample = temperature != 0; GenerationConfig defaults of transformers 4.x apply, so
sampling runs Temperature -> TopK(50) -> TopP warpers, softmax, then torch.multinomial on the
global RNG (seeded by torch.manual_seed). Greedy takes argmax of the float32 logits.
(transformers 5 no longer defaults top_k to 50; the warpers themselves are unchanged.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from janusflow_trt.errors import InputError

DEFAULT_TOP_K = 50  # transformers 4.x GenerationConfig default, in force for the official demo
# logits / T must stay finite in float32: with |logits| up to ~1e4, T >= 1e-3 keeps them below 1e7
MIN_TEMPERATURE = 1e-3


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 -> greedy
    top_p: float = 1.0
    top_k: int = DEFAULT_TOP_K
    max_new_tokens: int = 512

    def __post_init__(self):
        t = self.temperature
        if not (t == 0.0 or MIN_TEMPERATURE <= t <= 100):
            raise InputError(f"--temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, 100], got {t}")
        if not (0.0 < self.top_p <= 1.0):
            raise InputError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise InputError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def warp(scores: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """scores [B,V] float32 -> warped scores, in the order transformers 4.x applies them."""
    if p.temperature != 1.0:
        scores = TemperatureLogitsWarper(p.temperature)(None, scores)
    if p.top_k:
        scores = TopKLogitsWarper(top_k=p.top_k, min_tokens_to_keep=1)(None, scores)
    if p.top_p < 1.0:
        scores = TopPLogitsWarper(top_p=p.top_p, min_tokens_to_keep=1)(None, scores)
    return scores


def next_token(logits: torch.Tensor, p: SamplingParams, position: int | None = None) -> torch.Tensor:
    """logits [B,V] -> token ids [B] (long); position: the answer token being chosen (for errors)."""
    logits = logits.to(torch.float32)
    if not bool(torch.isfinite(logits).all()):  # the host reads the token right after anyway
        where = f" for answer token {position + 1}" if position is not None else ""
        raise InputError(f"the model produced non-finite logits (NaN or Inf){where}; check the weights")
    if p.greedy:
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(warp(logits, p), dim=-1)
    if not bool(torch.isfinite(probs).all()):  # logits / temperature overflowed float32
        raise InputError(f"--temperature {p.temperature:g} overflows these logits; use a larger temperature")
    return torch.multinomial(probs, num_samples=1).squeeze(1)
