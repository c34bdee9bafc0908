"""Incremental detokenisation against full decoding by the tokenizers library (byte-level BPE)."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import PreTrainedTokenizerBase

from janusflow_trt.runtime.detok import IncrementalDecoder

TEXTS = [
    "狐狸在秋天的树叶里。これは猫です。여우가 있다.",
    "A fox 🦊 and a family 👨‍👩‍👧 on a 🌈, é à ñ ü, ∑ x² ≤ ∞",
    "Hello , world . I don 't know ! Is it ? It 's fine , they 're here and we 've gone ' ok ' .",
    "  spaces   around  .  and , commas ,and n't 'm  ' s",
]


def stream(processor, ids, clean_up):
    calls = []

    def decode_raw(window):
        calls.append(len(window))
        return processor.tokenizer.decode(list(window), skip_special_tokens=True)

    dec = IncrementalDecoder(decode_raw, clean_up)
    pieces = [dec.put(t) for t in ids]
    pieces.append(dec.end())
    return pieces, calls


def full(processor, ids, clean_up):
    text = processor.tokenizer.decode(ids, skip_special_tokens=True)
    return PreTrainedTokenizerBase.clean_up_tokenization(None, text) if clean_up else text


@pytest.mark.parametrize("clean_up", [False, True])
@pytest.mark.parametrize("text", TEXTS)
def test_pieces_join_to_full_decoding(processor, text, clean_up):
    ids = processor.tokenizer.encode(text, add_special_tokens=False).ids
    ids = ids[:7] + [processor.eos_id] + ids[7:]  # a special token inside a multi-byte run: skipped by both
    pieces, calls = stream(processor, ids, clean_up)
    want = full(processor, ids, clean_up)
    assert "".join(pieces) == want
    shown = ""
    for p in pieces:  # every piece is final: what was shown is never taken back
        assert "\ufffd" not in p
        shown += p
        assert want.startswith(shown)
    assert max(calls) <= 12, "the decoded window must stay a few ids, not the whole answer"


def test_random_ids_with_broken_utf8(processor):
    """Sampled ids from a random model: invalid byte runs become U+FFFD exactly where full decoding puts them."""
    rng = np.random.default_rng(0)
    vocab = len(processor.tokenizer.get_vocab())
    for _ in range(30):
        ids = [int(i) for i in rng.integers(0, vocab, size=80)]
        for clean_up in (False, True):
            pieces, _ = stream(processor, ids, clean_up)
            assert "".join(pieces) == full(processor, ids, clean_up)


def test_decode_window_does_not_grow_with_the_answer(processor):
    ids = processor.tokenizer.encode("狐狸 fox 🦊 " * 200, add_special_tokens=False).ids
    _, calls = stream(processor, ids, True)
    assert len(ids) > 1000 and max(calls) <= 12
