"""The decode step and loop, everything on the backend's device: K/V written in place at a device-side
index, sampling on the device; the sampled token id is the one value the host reads per token (it
must: to stream it and to stop at EOS). On the CPU the same code runs over CPU tensors.

Per token, on the device: embed(ids) -> llm(embeds, mask, positions, K/V) -> K/V and mask written at
`index` -> sample -> ids, positions, index advanced in place. The step touches the same buffers every
time, so a capturable backend captures it once per KV-capacity bucket as a CUDA graph and replays it
(runtime/cuda_graph.py); a bucket change reallocates the cache and captures anew.
Teacher forcing (the quality report) is the same step with `ids` written by the caller between steps.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from janusflow_trt.errors import InputError
from janusflow_trt.janusflow_ref.sampling import SamplingParams

from .backends import Backend
from .cuda_graph import StepRunner
from .device_sampling import NONFINITE, OVERFLOW, sample_on_device
from .kv_cache import KVCache


class Decoder:
    """Per-request decode state on backend.device: the cache, the next input id [1, 1], its position."""

    def __init__(self, backend: Backend, cache: KVCache, logits: torch.Tensor, params: SamplingParams):
        """logits [1, V]: the prefill's last position; the first token is sampled from it."""
        self.b, self.cache, self.params = backend, cache, params
        self.ids = sample_on_device(logits, params).view(1, 1).to(torch.int64).clone()
        self.pos = torch.full((1, 1), cache.length, dtype=torch.int64, device=backend.device)
        self.logits = logits
        self.runner = StepRunner(backend, self._step)

    def _step(self) -> None:
        emb = self.b.run("embed", {"input_ids": self.ids})["inputs_embeds"]
        out = self.b.run("llm", {"inputs_embeds": emb, "attention_mask": self.cache.decode_mask,
                                 "position_ids": self.pos, **self.cache.feeds()})
        self.cache.write_one(out)
        self.pos += 1
        self.logits = out["logits"]  # [1, V]: a backend buffer, valid until the next step (teacher forcing reads it)
        self.ids.copy_(sample_on_device(self.logits, self.params).view(1, 1))

    def step(self) -> None:
        """One token on the device: self.ids in, the next sampled id in self.ids."""
        if self.cache.reserve(self.cache.length + 1):
            self.runner.reset()  # new buffers: the next step captures anew
        self.runner()
        self.cache.length += 1


def token_id(tok: torch.Tensor, position: int, params: SamplingParams) -> int:
    """THE host read of a decode step: the sampled id, or the sampler's sentinel turned into one line."""
    t = int(tok.reshape(-1)[0])
    if t == NONFINITE:
        raise InputError(f"the model produced non-finite logits (NaN or Inf) for answer token {position + 1}; "
                         "check the weights")
    if t == OVERFLOW:
        raise InputError(f"--temperature {params.temperature:g} overflows these logits; use a larger temperature")
    return t


def decode_tokens(backend: Backend, cache: KVCache, logits: torch.Tensor, params: SamplingParams,
                  eos_id: int) -> Iterator[int]:
    """Answer token ids after a prefill (`logits` [1, V]: its last position), one host read per token."""
    dec = Decoder(backend, cache, logits, params)
    for i in range(params.max_new_tokens):
        tok = token_id(dec.ids, i, params)
        yield tok
        if tok == eos_id or i + 1 == params.max_new_tokens:
            return
        dec.step()
