"""Continuous batching of chat (janusflow_trt/batch.py over runtime/decode.py's DecodeRows): the KV
cache's row operations against hand-built tensors, and batched answers against each request's solo
Pipeline.chat (greedy and seeded sampling, requests joining and leaving mid-way)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from janusflow_trt.api import Pipeline
from janusflow_trt.batch import ChatBatch, ChatRequest
from janusflow_trt.janusflow_ref.config import load_config
from janusflow_trt.janusflow_ref.sampling import SamplingParams
from janusflow_trt.runtime.backends import SeamWrapper
from janusflow_trt.runtime.kv_cache import BUCKET, KVCache


def _present(cache: KVCache, rows: int, s: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    _, h, _, d = cache.shape
    return {n: torch.randn((rows, h, s, d), generator=g) for n in cache.present_names}


def test_kv_rows_fill_write_free_and_grow(tiny_dir):
    cfg = load_config(tiny_dir)
    cpu = torch.device("cpu")
    src = KVCache(cfg, 1, 5, cpu, torch.float32)
    src.append(_present(src, 1, 5, 0), torch.tensor([[1, 1, 0, 1, 1]]))
    cache = KVCache(cfg, 3, 1, cpu, torch.float32)
    cache.fill_row(1, src)
    assert cache.lengths == [0, 5, 0] and cache.index.tolist() == [0, 5, 0]
    for buf, s in zip(cache.buffers, src.buffers, strict=True):
        assert torch.equal(buf[1, :, :5], s[0, :, :5]) and not buf[[0, 2]].any() and not buf[1, :, 5:].any()
    want = torch.zeros((3, cache.capacity + 1), dtype=torch.int64)
    want[:, -1] = 1
    want[1, :5] = torch.tensor([1, 1, 0, 1, 1])
    assert torch.equal(cache.decode_mask, want)

    # a decode write: each row at its own index; a free row (live 0) marks nothing and stays put
    out = _present(cache, 3, 1, 1)
    cache.write_one(out, torch.tensor([1, 1, 0]))
    for buf, name in zip(cache.buffers, cache.present_names, strict=True):
        assert torch.equal(buf[0, :, 0], out[name][0, :, 0]) and torch.equal(buf[1, :, 5], out[name][1, :, 0])
    for buf, s in zip(cache.buffers, src.buffers, strict=True):
        assert torch.equal(buf[1, :, :5], s[0, :, :5])
    want[0, 0] = want[1, 5] = 1
    assert torch.equal(cache.decode_mask, want) and cache.index.tolist() == [1, 6, 0]

    # growth keeps every row; freeing a row clears its validity and index only
    cache.lengths = [1, 6, 0]
    big = KVCache(cfg, 1, BUCKET + 3, cpu, torch.float32)
    big.append(_present(big, 1, BUCKET + 3, 2), torch.ones((1, BUCKET + 3), dtype=torch.int64))
    before = [b.clone() for b in cache.buffers]
    cache.fill_row(2, big)
    assert cache.capacity == 2 * BUCKET and cache.lengths == [1, 6, BUCKET + 3]
    for buf, old, s in zip(cache.buffers, before, big.buffers, strict=True):
        assert torch.equal(buf[:2, :, :6], old[:2, :, :6]) and torch.equal(buf[2, :, :BUCKET + 3], s[0, :, :BUCKET + 3])
    assert torch.equal(cache.valid[:2, :6], want[:2, :6]) and cache.valid[2].sum() == BUCKET + 3
    assert cache.index.tolist() == [1, 6, BUCKET + 3]
    cache.free_row(1)
    assert not cache.valid[1].any() and cache.lengths == [1, 0, BUCKET + 3]
    assert cache.index.tolist() == [1, 0, BUCKET + 3]
    assert cache.decode_mask[1, -1] == 1 and cache.valid[0, 0] == 1


def test_kv_row_move_and_a_step_over_the_first_rows(tiny_dir):
    """A row moved within the cache (a leaving row's place taken by the last one) carries its K/V,
    validity and index; a decode write of the first n rows touches no row beyond them."""
    cfg = load_config(tiny_dir)
    cpu = torch.device("cpu")
    cache = KVCache(cfg, 3, 1, cpu, torch.float32)
    for r, (n, seed) in enumerate([(4, 0), (2, 1), (6, 2)]):
        src = KVCache(cfg, 1, n, cpu, torch.float32)
        src.append(_present(src, 1, n, seed), torch.tensor([[1] * (n - 1) + [0]]))
        cache.fill_row(r, src)
    row2 = [b[2].clone() for b in cache.buffers]
    valid2 = cache.valid[2].clone()
    cache.fill_row(0, cache, 2)
    cache.free_row(2)
    for buf, old in zip(cache.buffers, row2, strict=True):
        assert torch.equal(buf[0, :, :6], old[:, :6]) and not buf[0, :, 6:].any()
    assert torch.equal(cache.valid[0], valid2) and not cache.valid[2].any()
    assert cache.lengths == [6, 2, 0] and cache.index.tolist() == [6, 2, 0]

    before = [b.clone() for b in cache.buffers]
    mask_before = cache.decode_mask.clone()
    out = _present(cache, 2, 1, 3)
    cache.write_one(out, torch.tensor([1, 1, 0]))
    for buf, old, name in zip(cache.buffers, before, cache.present_names, strict=True):
        assert torch.equal(buf[0, :, 6], out[name][0, :, 0]) and torch.equal(buf[1, :, 2], out[name][1, :, 0])
        assert torch.equal(buf[2], old[2]) and torch.equal(buf[0, :, :6], old[0, :, :6])
    assert cache.valid[0, 6] == 1 and cache.valid[1, 2] == 1 and torch.equal(cache.decode_mask[2], mask_before[2])
    assert cache.index.tolist() == [7, 3, 0]
    assert [f.shape[0] for f in cache.feeds(2).values()] == [2] * len(cache.past_names)
    assert all(f.data_ptr() == b.data_ptr() for f, b in zip(cache.feeds(2).values(), cache.buffers, strict=True))


@pytest.fixture(scope="module")
def pipe(tiny_dir, tiny_onnx):
    return Pipeline.from_pretrained(tiny_dir, backend="ort", artifacts=tiny_onnx, threads=2)


# (question, temperature, top_p, seed, max_new_tokens): prompts of different lengths, greedy and sampled
REQUESTS = [("What is in the picture?", 0.0, 1.0, 42, 9), ("Describe it.", 0.8, 0.9, 7, 12),
            ("Is there a cat here, and what colour is it?", 0.0, 1.0, 1, 6), ("Count.", 1.0, 1.0, 42, 10)]


def _solo(pipe: Pipeline, image, q, temperature, top_p, seed, n) -> list[int]:
    return pipe.chat(image, q, max_new_tokens=n, temperature=temperature, top_p=top_p, seed=seed).token_ids


def _request(pipe: Pipeline, image, q, temperature, top_p, seed, n) -> ChatRequest:
    return ChatRequest(pipe.processor.chat_inputs(image, q),
                       SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=n), seed)


@pytest.fixture(scope="module")
def solo(pipe, test_image):
    image = Image.open(test_image)
    return [_solo(pipe, image, *r) for r in REQUESTS]


def _batch(pipe: Pipeline, max_batch: int) -> ChatBatch:
    return ChatBatch(pipe.engine.backend, pipe.cfg, pipe.processor.eos_id, max_batch)


def _drain(batch: ChatBatch, rounds: int = 1000) -> None:
    for _ in range(rounds):
        if not batch.busy:
            return
        batch.step()


def test_batched_answers_equal_solo(pipe, test_image, solo):
    image = Image.open(test_image)
    batch = _batch(pipe, 4)
    reqs = [_request(pipe, image, *r) for r in REQUESTS]
    for q in reqs:
        batch.submit(q)
    _drain(batch)
    assert [q.tokens for q in reqs] == solo
    assert [q.finish for q in reqs] == ["length"] * 4 and batch.cache.lengths == [0] * 4


def test_joining_and_leaving_mid_way_change_nobody(pipe, test_image, solo):
    """Two rows run; a third joins after 3 rounds, a fourth waits for a free row (max_batch 3); one row
    is cancelled after its 4th token: the others' answers are their solo ones."""
    image = Image.open(test_image)
    batch = _batch(pipe, 3)
    a, b, c, d = (_request(pipe, image, *r) for r in REQUESTS)
    batch.submit(a)
    batch.submit(b)
    for _ in range(3):
        batch.step()
    batch.submit(c)
    batch.submit(d)
    while len(b.tokens) < 4:
        batch.step()
    batch.cancel(b)
    assert b.finish == "cancelled" and b.tokens == solo[1][:4]
    _drain(batch)
    assert [a.tokens, c.tokens, d.tokens] == [solo[0], solo[2], solo[3]]


def test_ignore_eos_answers_run_to_their_limit(pipe, test_image):
    """ignore_eos (the server's fixed-length load-test extension): the end-of-sentence token is kept as any
    token and the answer runs to max_new_tokens; up to that EOS it is the ordinary answer."""
    image = Image.open(test_image)
    q = "What is in this image?"
    plain = _solo(pipe, image, q, 0.0, 1.0, 42, 3000)
    eos = pipe.processor.eos_id
    assert plain[-1] == eos and len(plain) < 3000  # this tiny model ends its answer early (353 tokens)
    n = len(plain) + 20
    batch = _batch(pipe, 2)
    req = _request(pipe, image, q, 0.0, 1.0, 42, n)
    req.ignore_eos = True
    stops = _request(pipe, image, q, 0.0, 1.0, 42, n)  # beside it, without: ends at EOS as before
    batch.submit(req)
    batch.submit(stops)
    _drain(batch)
    assert req.finish == "length" and len(req.tokens) == n and req.tokens[:len(plain)] == plain
    assert stops.finish == "stop" and stops.tokens == plain


def test_chunked_prefill_does_not_stall_running_rows(pipe, test_image, solo):
    """A request joins while another decodes: every round still gives the running row its token, the
    joining prompt goes in `prefill_chunk` tokens per round (after a round of its own for SigLIP), and
    both answers are their solo ones."""
    image = Image.open(test_image)
    chunk = 16
    batch = ChatBatch(pipe.engine.backend, pipe.cfg, pipe.processor.eos_id, 2, prefill_chunk=chunk)
    long = (*REQUESTS[0][:4], 80)
    want_a = _solo(pipe, image, *long)
    a, b = _request(pipe, image, *long), _request(pipe, image, *REQUESTS[2])
    a.ignore_eos = True  # a decodes all through b's prefill
    batch.submit(a)
    assert batch.step() == [(a, want_a[0])]  # alone: the whole prompt in one round, its first token
    batch.submit(b)
    prompt = b.inputs.input_ids.shape[1]
    rounds = 1 + -(-prompt // chunk)  # SigLIP round + chunks; b's first token comes in its last one
    seen = []
    for i in range(rounds):
        events = batch.step()
        assert [q for q, _ in events if q is a] == [a], i  # a got its token this round
        assert batch.joining is not None and batch.joining.done == min(i * chunk, prompt) or i == rounds - 1, i
        seen += [q for q, _ in events if q is b]
    assert seen == [b] and b.tokens == [solo[2][0]] and len(a.tokens) == 1 + rounds
    _drain(batch)
    assert a.tokens[:len(want_a)] == want_a and len(a.tokens) == 80 and b.tokens == solo[2]


class _DecodeRowsSeen(SeamWrapper):
    """The batch size of every decode step the backend runs (its embed call over one id per row)."""

    def __init__(self, inner):
        super().__init__(inner)
        self.sizes: list[int] = []

    def run(self, graph, feeds):
        if graph == "embed" and feeds["input_ids"].shape[1] == 1:
            self.sizes.append(feeds["input_ids"].shape[0])
        return self.inner.run(graph, feeds)


class _CaptureAtCount:
    """A StepRunner as a CUDA-graph capture sees it (the CPU runs none): a capture holds the row count it
    was made at until `reset`; replaying it at another count would run the wrong shapes."""

    def __init__(self, rows):
        self.rows, self.inner, self.captured = rows, rows.runner, None

    def reset(self):
        self.captured = None
        self.inner.reset()

    def write(self, dst, src):
        self.inner.write(dst, src)

    def __call__(self):
        assert self.captured in (None, self.rows.count), "a capture replayed at another row count"
        self.captured = self.rows.count
        self.inner()


def test_decode_steps_run_the_live_rows_only(pipe, test_image, solo):
    """A 4-row batch with 1, up to 4, then (a middle row cancelled) 3, 2, 1 running requests: each decode
    step runs exactly the running rows, a (CUDA-graph) capture is dropped whenever that count changes,
    and every answer is still its solo one."""
    image = Image.open(test_image)
    seen = _DecodeRowsSeen(pipe.engine.backend)
    batch = ChatBatch(seen, pipe.cfg, pipe.processor.eos_id, 4, prefill_chunk=1000)  # a join: 2 rounds
    batch.rows.runner = _CaptureAtCount(batch.rows)  # type: ignore[assignment]
    long = (*REQUESTS[0][:4], 30)
    want_a = _solo(pipe, image, *long)
    a, b, c, d = _request(pipe, image, *long), *(_request(pipe, image, *r) for r in REQUESTS[1:])
    a.ignore_eos = True  # a runs all through
    batch.submit(a)
    batch.step()  # a joins (alone: no decode step yet)
    want: list[int] = []
    for _ in range(2):
        want.append(1)
        batch.step()
    for q in (b, c, d):
        batch.submit(q)
    while d.row is None:  # rounds with 1, 2, 3 running rows while b, c, d join one by one
        want.append(sum(q is not None for q in batch.active))
        batch.step()
    want.append(4)
    batch.step()  # all four rows
    assert batch.rows.count == 4 and b.row not in (None, 3)
    batch.cancel(b)  # a middle row leaves: the last one moves into its place
    assert batch.rows.count == 3 and sorted(q.row for q in (a, c, d)) == [0, 1, 2]
    while batch.busy:
        want.append(batch.rows.count)
        batch.step()
    assert seen.sizes == want and want[:2] == [1, 1] and {2, 3} < set(want)
    assert a.tokens[:len(want_a)] == want_a and len(a.tokens) == 30
    assert [c.tokens, d.tokens] == [solo[2], solo[3]] and b.tokens == solo[1][:len(b.tokens)]
