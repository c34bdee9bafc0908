"""The decode step and loop, everything on the backend's device: K/V written in place at a device-side
index, sampling on the device; the sampled token id is the one value the host reads per token (it
must: to stream it and to stop at EOS). On the CPU the same code runs over CPU tensors.

Per token, on the device: embed(ids) -> llm(embeds, mask, positions, K/V) -> K/V and mask written at
`index` -> sample -> ids, positions, index advanced in place. The step touches the same buffers every
time, so a capturable backend captures it once per KV-capacity bucket as a CUDA graph and replays it
(runtime/cuda_graph.py); a bucket change reallocates the cache and captures anew.
Teacher forcing (the quality report) is the same step with `ids` written by the caller between steps.

Batching is rows (DecodeRows): each row its own position, cache slot index, mask row and sampler
(a seeded request owns its torch.Generator, so its tokens do not depend on its companions); a
scheduler starts and stops rows between steps (janusflow_trt/batch.py). The live rows are kept compact
at the front of the cache (a leaving row's place is taken by the last live row, KVCache.fill_row), so
the step runs the graphs over the first `count` rows only (views of the static buffers, no copy): one
request in an 8-row batch costs a 1-row step. A captured step (CUDA graph) records one row count; the
count only changes when a row starts or stops, which already drops the capture (the rows' samplers are
part of it), so the next step captures at the new count. One request (Decoder) is the B = 1 case of the
same step, drawing from the default RNG as the official demo does.
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


class DecodeRows:
    """Decode state of up to B rows over one KVCache, on backend.device: each row's next input id [B, 1],
    its position [B, 1], whether it is live [B] (int64 0/1) and its sampler. The live rows are rows
    0 .. count-1 (`start` takes row `count`; `stop` moves the last live row into the freed one), and
    the step runs those rows only. Rows start and stop between steps: the step knows nothing of requests."""

    def __init__(self, backend: Backend, cache: KVCache):
        n, dev = cache.batch, backend.device
        self.b, self.cache = backend, cache
        self.count = 0  # live rows: 0 .. count-1
        self.ids = torch.zeros((n, 1), dtype=torch.int64, device=dev)
        self.pos = torch.zeros((n, 1), dtype=torch.int64, device=dev)
        self.live = torch.zeros((n,), dtype=torch.int64, device=dev)  # 1 on rows < count
        # per row: its SamplingParams and generator (None: the device's default RNG), None when free
        self.samplers: list[tuple[SamplingParams, torch.Generator | None] | None] = [None] * n
        self.logits = torch.zeros((n, 0))  # [count, V] after a step: a backend buffer, valid until the next one
        self.runner = StepRunner(backend, self._step)

    def start(self, r: int, logits: torch.Tensor, params: SamplingParams,
              generator: torch.Generator | None = None) -> None:
        """Row r (= count: the first free one) decodes from here: its cache row holds its prompt, `logits`
        [1, V] its last position, from which its first token is sampled (into ids[r]) with its own generator."""
        assert r == self.count < self.cache.batch, f"row {r} is not the first free row ({self.count})"
        dev = self.b.device
        self.runner.write(self.ids[r], sample_on_device(logits, params, generator).to(torch.int64))
        self.runner.write(self.pos[r], torch.full((1,), self.cache.lengths[r], dtype=torch.int64, device=dev))
        self.runner.write(self.live[r:r + 1], torch.ones((1,), dtype=torch.int64, device=dev))
        self.samplers[r] = (params, generator)
        self.count += 1
        self.runner.reset()  # the rows' samplers and count are part of what a capture records

    def stop(self, r: int) -> int | None:
        """Row r is free; the last live row moves into it (K/V, validity, position, next id, sampler) so the
        live rows stay compact. -> the row that moved into r (its old index), None if r was the last."""
        last = self.count - 1
        assert 0 <= r <= last, f"row {r} is not live"
        moved = None
        if r != last:
            self.cache.fill_row(r, self.cache, last)
            self.runner.write(self.ids[r], self.ids[last])
            self.runner.write(self.pos[r], self.pos[last])
            self.samplers[r], moved = self.samplers[last], last
        self.runner.write(self.live[last:last + 1], torch.zeros((1,), dtype=torch.int64, device=self.b.device))
        self.samplers[last] = None
        self.cache.free_row(last)
        self.count -= 1
        self.runner.reset()
        return moved

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [count, V] -> ids [count, 1]: each live row by its own sampler."""
        rows = [s for s in self.samplers[:self.count] if s is not None]
        assert len(rows) == self.count, "live rows are compact"
        if len(rows) == 1 or all(p.greedy for p, _ in rows):  # one call: no per-row split (argmax is per row)
            return sample_on_device(logits, *rows[0]).view(-1, 1)
        return torch.cat([sample_on_device(logits[r:r + 1], *s) for r, s in enumerate(rows)]).view(-1, 1)

    def _step(self) -> None:
        n = self.count  # the graphs run the live rows only: views of the first n rows of every buffer
        emb = self.b.run("embed", {"input_ids": self.ids[:n]})["inputs_embeds"]
        out = self.b.run("llm", {"inputs_embeds": emb, "attention_mask": self.cache.decode_mask[:n],
                                 "position_ids": self.pos[:n], **self.cache.feeds(n)})
        self.cache.write_one(out, self.live)
        self.pos += self.live.view(-1, 1)
        self.logits = out["logits"]  # [n, V]: a backend buffer, valid until the next step (teacher forcing reads it)
        self.ids[:n].copy_(self._sample(self.logits))

    def step(self) -> None:
        """One token for every live row on the device: self.ids in, the next sampled ids in self.ids."""
        if self.count == 0:
            return
        if self.cache.reserve(self.cache.length + 1):
            self.runner.reset()  # new buffers: the next step captures anew
        self.runner()
        for r in range(self.count):
            self.cache.lengths[r] += 1


class Decoder(DecodeRows):
    """One request: the B = 1 case, sampling from the device's default RNG (torch.manual_seed), as the
    official demo does."""

    def __init__(self, backend: Backend, cache: KVCache, logits: torch.Tensor, params: SamplingParams):
        """logits [1, V]: the prefill's last position; the first token is sampled from it."""
        assert cache.batch == 1, "Decoder is one row; DecodeRows decodes several"
        super().__init__(backend, cache)
        self.logits = logits
        self.start(0, logits, params)


def token_id(tok: torch.Tensor, position: int, params: SamplingParams) -> int:
    """THE host read of a decode step: the sampled id, or the sampler's sentinel turned into one line."""
    return checked_id(int(tok.reshape(-1)[0]), position, params)


def checked_id(t: int, position: int, params: SamplingParams) -> int:
    """A sampled id read by the host, or its sentinel (device_sampling.py) as one InputError line."""
    if t == NONFINITE:
        raise InputError(f"the model produced non-finite logits (NaN or Inf) for answer token {position + 1}; "
                         "check the weights")
    if t == OVERFLOW:
        raise InputError(f"--temperature {params.temperature:g} overflows these logits; use a larger temperature")
    return t


def decode_tokens(backend: Backend, cache: KVCache, logits: torch.Tensor, params: SamplingParams,
                  eos_id: int, logits_out: list[torch.Tensor] | None = None) -> Iterator[int]:
    """Answer token ids after a prefill (`logits` [1, V]: its last position), one host read per token.
    logits_out: given, the logits each token was sampled from are appended to it ([1, V] FP32 CPU copies:
    the quality report's margins)."""
    dec = Decoder(backend, cache, logits, params)
    for i in range(params.max_new_tokens):
        if logits_out is not None:
            logits_out.append(dec.logits.to("cpu", torch.float32, copy=True))  # a buffer the next step reuses
        tok = token_id(dec.ids, i, params)
        yield tok
        if tok == eos_id or i + 1 == params.max_new_tokens:
            return
        dec.step()
