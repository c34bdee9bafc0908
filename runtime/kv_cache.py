"""The one KV cache: per-layer K/V [B, n_kv, C, hd] on the backend's device, written in place.

Capacity C grows in buckets (BUCKET tokens) so attention reads at most BUCKET-1 empty slots, and a
bucket change (one device-to-device copy, amortised over BUCKET tokens) is the only time it moves.
The mask buffer [B, C + 1] is slot validity followed by a constant 1 for the one new token of a
decode step, so a decode step's attention_mask is that buffer as it stands. A decode step writes
[B, n_kv, 1, hd] per layer, each row at its own device-side `index[b]` (no host value inside the step,
so the step can be captured as a CUDA graph); a prefill writes its S tokens at the host-known
`length` on every row.

Rows are independent (continuous batching, runtime/decode.py): each has its own host count
`lengths[b]` and device `index[b]`; a row is filled from a prefilled one-row cache or moved from
another row (`fill_row`) and freed (`free_row`) between steps; a decode step may run the first n rows
only (`feeds(n)`, `write_one` of n rows). `length` is the longest row (what the capacity must hold).
"""

from __future__ import annotations

import torch

from janusflow_trt.janusflow_ref.config import JanusFlowConfig

BUCKET = 128


def bucket(n: int) -> int:
    return max(BUCKET, -(-n // BUCKET) * BUCKET)


class KVCache:
    def __init__(self, cfg: JanusFlowConfig, batch: int, capacity: int, device: torch.device, dtype: torch.dtype,
                 exact: bool = False):
        """exact: capacity as given (a cache that never grows: the Euler loop's prompt prefix)."""
        self.batch, self.device, self.dtype = batch, device, dtype
        self.shape = (batch, cfg.kv_heads, 0, cfg.head_dim)
        kv = [(i, n) for i in range(cfg.num_layers) for n in ("key", "value")]
        self.past_names = [f"past_key_values.{i}.{n}" for i, n in kv]
        self.present_names = [f"present.{i}.{n}" for i, n in kv]
        self.lengths = [0] * batch  # host count of written slots per row (the device mirror is `index`)
        self.index = torch.zeros((batch,), dtype=torch.int64, device=device)  # [B], kept across growth
        self._alloc(capacity if exact else bucket(capacity))

    def _alloc(self, cap: int) -> None:
        self.capacity = cap
        b, h, _, d = self.shape
        self.buffers = [torch.zeros((b, h, cap, d), dtype=self.dtype, device=self.device)
                        for _ in self.past_names]
        self.decode_mask = torch.zeros((b, cap + 1), dtype=torch.int64, device=self.device)
        self.decode_mask[:, cap] = 1
        self.valid = self.decode_mask[:, :cap]  # a view: 1 where a slot holds an attendable key

    @property
    def length(self) -> int:
        """The longest row's written slots."""
        return max(self.lengths)

    def reserve(self, needed: int) -> bool:
        """Room for `needed` slots in total, contents kept (bucketed growth); True if the buffers moved
        (a captured step over them must be captured again)."""
        if needed <= self.capacity:
            return False
        old, old_valid, n = self.buffers, self.valid, self.length
        self._alloc(bucket(needed))
        for new, o in zip(self.buffers, old, strict=True):
            new[:, :, :n] = o[:, :, :n]
        self.valid[:, :n] = old_valid[:, :n]
        return True

    def feeds(self, rows: int | None = None) -> dict[str, torch.Tensor]:
        """The past K/V inputs: all rows, or the first `rows` (views: rows are the leading dimension)."""
        return dict(zip(self.past_names, self.buffers if rows is None else [b[:rows] for b in self.buffers],
                        strict=True))

    def mask(self, new_mask: torch.Tensor) -> torch.Tensor:
        """[B, C + S]: slot validity, then the S new tokens' own mask [B, S]."""
        return torch.cat([self.valid, new_mask.to(torch.int64)], dim=1)

    def append(self, out: dict[str, torch.Tensor], new_mask: torch.Tensor) -> None:
        """A prefill's present.{i} [B, n_kv, S, hd] written at `length` (host-known: not captured)."""
        s, at = new_mask.shape[1], self.length
        assert self.lengths == [at] * self.batch, f"a prefill writes rows of one length, got {self.lengths}"
        assert at + s <= self.capacity, "reserve() before running the graph"
        for buf, name in zip(self.buffers, self.present_names, strict=True):
            buf[:, :, at:at + s] = out[name]
        self.valid[:, at:at + s] = new_mask
        self.lengths = [at + s] * self.batch
        self.index.fill_(at + s)

    def write_one(self, out: dict[str, torch.Tensor], live: torch.Tensor) -> None:
        """A decode step's present.{i} [n, n_kv, 1, hd] for the first n rows (n <= B: a step over the
        live rows only), row b at slot `index[b]`, the slot made valid and index advanced where live [B]
        (int64 0/1) is 1 (0 on every row from n on); a free row (0) writes into a slot it leaves invalid
        and stays put. All on the device, so it can be captured. The host counts each live row's token
        in `lengths`."""
        n = out[self.present_names[0]].shape[0]
        _, h, _, d = self.shape
        at = self.index[:n].view(n, 1, 1, 1).expand(n, h, 1, d)
        for buf, name in zip(self.buffers, self.present_names, strict=True):
            buf[:n].scatter_(2, at, out[name].to(buf.dtype))
        self.decode_mask[:n].scatter_(1, self.index[:n].view(n, 1), live[:n].view(n, 1))
        self.index += live

    def fill_row(self, r: int, src: KVCache, s: int = 0) -> None:
        """Row r <- row s of `src` (a prefilled one-row cache, or this cache: a row moved): its K/V,
        validity and length (between steps)."""
        n = src.lengths[s]
        assert src.shape[1:] == self.shape[1:], "fill_row takes a cache of this model"
        assert src is not self or r != s, "a row onto itself"
        self.reserve(n)
        self.lengths[r] = n
        for buf, sb in zip(self.buffers, src.buffers, strict=True):
            buf[r, :, :n] = sb[s, :, :n]
        self.valid[r] = 0
        self.valid[r, :n] = src.valid[s, :n]
        self.index[r] = n

    def free_row(self, r: int) -> None:
        """Row r holds nothing: no slot valid, length 0."""
        self.valid[r] = 0
        self.lengths[r] = 0
        self.index[r] = 0
