"""The decode loop with everything on the backend's device: static buffers, K/V written in place at a
device-side index, sampling on the device; the sampled token id is the one value the host reads per
token (it must: to stream it, and to stop at EOS). On the CPU the same code runs over CPU tensors.

Per request (not per token): the prefilled cache moves to the device once. Per token, on the device:
embed(ids) -> llm(embeds, mask, positions, K/V) -> K/V and mask written at `index` -> sample -> ids,
positions, index advanced in place. The step touches the same buffers every time, so a GPU backend
(`capturable`) captures it once per KV-capacity bucket as a CUDA graph (runtime/cuda_graph.py) and
replays it; a bucket change (every kv_cache.BUCKET tokens) reallocates on the device and recaptures.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from janusflow_trt.errors import InputError
from janusflow_trt.janusflow_ref.sampling import SamplingParams

from .device_sampling import NONFINITE, OVERFLOW, sample_on_device
from .kv_cache import StaticKVCache, bucket


class DeviceKV:
    """A StaticKVCache's contents as device tensors: K/V [B, n_kv, C, hd] per layer, the decode mask
    [B, C + 1] (slot validity, then 1 for the new token) and the write index [1]."""

    def __init__(self, cache: StaticKVCache, device: torch.device, dtype: torch.dtype | None = None):
        """dtype: the device cache's dtype if not the host cache's (torch-cuda's BF16)."""
        self.past_names, self.present_names = cache.past_names, cache.present_names
        self.length, self.device = cache.length, device  # host mirror of index: the host counts its tokens
        # once per request: the host cache's buffers to the device (zero-copy views on the CPU)
        past = [torch.as_tensor(b, device=device) for b in cache.buffers]
        self._load([p.to(dtype) for p in past] if dtype is not None else past,
                   torch.as_tensor(cache.valid, device=device), cache.capacity)

    def _load(self, past: list[torch.Tensor], valid: torch.Tensor, capacity: int) -> None:
        self.capacity, self.past = capacity, past
        self.mask = torch.zeros((valid.shape[0], capacity + 1), dtype=torch.int64, device=self.device)
        self.mask[:, capacity] = 1
        self.mask[:, :valid.shape[1]] = valid
        self.index = torch.full((1,), self.length, dtype=torch.int64, device=self.device)

    def grow(self) -> None:
        """Next bucket, on the device (device-to-device copies, once per BUCKET tokens)."""
        old, n = self.past, self.length
        cap = bucket(n + 1)
        bufs = [torch.zeros((*o.shape[:2], cap, o.shape[3]), dtype=o.dtype, device=self.device) for o in old]
        for b, o in zip(bufs, old, strict=True):
            b[:, :, :n] = o[:, :, :n]
        self._load(bufs, self.mask[:, :n], cap)

    def feeds(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.past_names, self.past, strict=True))

    def write(self, out: dict[str, torch.Tensor]) -> None:
        """present.{i} [B, n_kv, 1, hd] -> slot `index`; the slot becomes valid; index += 1 (all in place)."""
        for buf, name in zip(self.past, self.present_names, strict=True):
            buf.index_copy_(2, self.index, out[name].to(buf.dtype))
        self.mask.index_fill_(1, self.index, 1)
        self.index += 1


class DeviceDecoder:
    """Static per-request state of the decode step, on backend.device."""

    def __init__(self, backend: Any, cache: StaticKVCache, first: torch.Tensor):
        """first: the token sampled from the prefill's logits [1] (on the device)."""
        self.b, self.device = backend, backend.device
        self.kv = DeviceKV(cache, self.device, getattr(backend, "kv_torch_dtype", None))
        self.ids = first.view(1, 1).to(self.device, torch.int64).clone()  # [1, 1]: the next step's input
        self.pos = torch.full((1, 1), cache.length, dtype=torch.int64, device=self.device)
        self.capture = bool(getattr(backend, "capturable", False))
        self.step_graph: Any = None  # CapturedStep of the current bucket

    @torch.inference_mode()
    def _step(self, params: SamplingParams) -> None:
        emb = self.b.run_tensors("embed", {"input_ids": self.ids})["inputs_embeds"]
        out = self.b.run_tensors("llm", {"inputs_embeds": emb, "attention_mask": self.kv.mask,
                                         "position_ids": self.pos, **self.kv.feeds()})
        self.kv.write(out)
        self.pos += 1
        self.ids.copy_(sample_on_device(out["logits"], params).view(1, 1))

    def step(self, params: SamplingParams) -> None:
        """One token on the device; the result is in self.ids."""
        if self.kv.length + 1 > self.kv.capacity:
            self.kv.grow()
            self.step_graph = None  # new buffers: the next step captures anew
        if self.capture:
            from .cuda_graph import CapturedStep

            if self.step_graph is None:
                self.step_graph = CapturedStep(lambda stream: self._on(stream, params), self.b.stream)
            self.step_graph()
            torch.cuda.current_stream().wait_stream(self.b.stream)
        else:
            self._step(params)
        self.kv.length += 1

    def _on(self, stream: Any, params: SamplingParams) -> None:
        with torch.cuda.stream(stream):
            self._step(params)


def token_id(tok: torch.Tensor, position: int, params: SamplingParams) -> int:
    """THE host read of a decode step: the sampled id, or the sampler's sentinel turned into one line."""
    t = int(tok.reshape(-1)[0])
    if t == NONFINITE:
        raise InputError(f"the model produced non-finite logits (NaN or Inf) for answer token {position + 1}; "
                         "check the weights")
    if t == OVERFLOW:
        raise InputError(f"--temperature {params.temperature:g} overflows these logits; use a larger temperature")
    return t


def decode_tokens(backend: Any, cache: StaticKVCache, logits: np.ndarray, params: SamplingParams,
                  eos_id: int) -> Iterator[int]:
    """Answer token ids after a prefill (`logits` [1, V]: its last position), one host read per token."""
    first = sample_on_device(torch.as_tensor(logits, device=backend.device), params)
    dec = DeviceDecoder(backend, cache, first)
    for i in range(params.max_new_tokens):
        tok = token_id(dec.ids, i, params)
        yield tok
        if tok == eos_id or i + 1 == params.max_new_tokens:
            return
        dec.step(params)
