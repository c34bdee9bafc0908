"""Incremental detokenisation: each new token costs a decode of a few ids, not of the whole answer.

The pieces joined equal `Processor.decode(all ids)` exactly, for two reasons:
- byte-level BPE splits multi-byte characters (CJK, emoji) across tokens; a window of ids is decoded
  from the start of the last complete piece (prefix_offset) and only what lies past the text already
  shown (read_offset) is new, and nothing is shown while the window ends inside a character (U+FFFD),
  as text-generation-inference and vLLM do;
- `clean_up_tokenization` rewrites " ." -> "." and the like; every pattern starts with a space and is
  at most 4 characters long, so text is cleaned and shown only up to a cut with no space in the 3
  characters before it: no pattern occurrence can straddle such a cut, hence
  clean(a + b) == clean(a) + clean(b) there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from janusflow_trt.janusflow_ref.processor import clean_up_tokenization

_CLEAN_REACH = 3  # longest clean-up pattern (" n't", " 've", " 're") minus its leading space


class IncrementalDecoder:
    def __init__(self, decode_raw: Callable[[Sequence[int]], str], clean_up_spaces: bool):
        """decode_raw: ids -> text without the clean-up (special tokens skipped)."""
        self.decode_raw = decode_raw
        self.clean_up = clean_up_spaces
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.pending = ""  # raw text decoded but not yet cleaned and shown
        self.shown_tail = ""  # the last raw characters already shown (for the cut rule)

    def put(self, token: int) -> str:
        """Append one token id; return the text it completes ("" while a character is incomplete)."""
        self.ids.append(token)
        prefix = self.decode_raw(self.ids[self.prefix_offset:self.read_offset])
        text = self.decode_raw(self.ids[self.prefix_offset:])
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""
        self.pending += text[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(final=False)

    def end(self) -> str:
        """The rest: an incomplete character shows as U+FFFD, as full decoding shows it."""
        rest = self.decode_raw(self.ids[self.prefix_offset:])
        prefix = self.decode_raw(self.ids[self.prefix_offset:self.read_offset])
        self.pending += rest[len(prefix):]
        self.prefix_offset = self.read_offset = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if not self.clean_up:
            out, self.pending = self.pending, ""
            return out
        cut = len(self.pending) if final else self._last_cut()
        if cut == 0:
            return ""
        head, self.pending = self.pending[:cut], self.pending[cut:]
        self.shown_tail = (self.shown_tail + head)[-_CLEAN_REACH:]
        return clean_up_tokenization(head)

    def _last_cut(self) -> int:
        """Largest c <= len(pending) with no space among the 3 raw characters before c."""
        text = self.shown_tail + self.pending
        base = len(self.shown_tail)
        for c in range(len(text), base, -1):
            if " " not in text[max(0, c - _CLEAN_REACH):c]:
                return c - base
        return 0
