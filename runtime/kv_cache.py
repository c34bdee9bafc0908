"""Static KV cache: per-layer buffers [B, n_kv, C, hd] written in place at the write index.

Capacity C grows in buckets (BUCKET tokens) so attention reads at most BUCKET-1 empty slots, and
a bucket change (one copy, amortised over BUCKET tokens) is the only time the cache moves.
A decode step writes [B, n_kv, 1, hd] per layer and copies nothing else.
"""

from __future__ import annotations

import numpy as np

BUCKET = 128


def bucket(n: int) -> int:
    return max(BUCKET, -(-n // BUCKET) * BUCKET)


class StaticKVCache:
    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype=np.float32, exact: bool = False):
        self.num_layers, self.batch, self.kv_heads, self.head_dim = num_layers, batch, kv_heads, head_dim
        self.dtype = dtype
        self.length = 0
        kv = [(i, n) for i in range(num_layers) for n in ("key", "value")]
        self.past_names = [f"past_key_values.{i}.{n}" for i, n in kv]
        self.present_names = [f"present.{i}.{n}" for i, n in kv]
        self._alloc(capacity if exact else bucket(capacity))

    def _alloc(self, cap: int) -> None:
        self.capacity = cap
        shape = (self.batch, self.kv_heads, cap, self.head_dim)
        self.buffers = [np.zeros(shape, self.dtype) for _ in range(2 * self.num_layers)]
        # [B, cap + 1]: slot validity, then a constant 1 for the one new token of a decode step, so a
        # decode step's attention_mask is this buffer as it stands (no per-token concatenation)
        self._decode_mask = np.zeros((self.batch, cap + 1), np.int64)
        self._decode_mask[:, cap] = 1
        self.valid = self._decode_mask[:, :cap]  # 1 where a slot holds an attendable key

    def reserve(self, needed: int) -> None:
        """Make room for `needed` slots in total, keeping the contents (bucketed growth)."""
        if needed <= self.capacity:
            return
        old, old_valid, n = self.buffers, self.valid, self.length
        self._alloc(bucket(needed))
        for new, o in zip(self.buffers, old, strict=True):
            new[:, :, :n] = o[:, :, :n]
        self.valid[:, :n] = old_valid[:, :n]

    def past_feeds(self) -> dict[str, np.ndarray]:
        return dict(zip(self.past_names, self.buffers, strict=True))

    def mask(self, new_mask: np.ndarray) -> np.ndarray:
        """[B, C + S]: slot validity, then the new tokens' own mask."""
        if new_mask.shape[1] == 1 and new_mask.all():
            return self._decode_mask
        return np.concatenate([self.valid, new_mask.astype(np.int64)], axis=1)

    def append(self, outputs: dict[str, np.ndarray], new_mask: np.ndarray) -> None:
        """Write the graph's present.{i}.key/value [B, n_kv, S, hd] at the write index."""
        s = new_mask.shape[1]
        assert self.length + s <= self.capacity, "reserve() before running the graph"
        at = self.length
        for name, buf in zip(self.present_names, self.buffers, strict=True):
            buf[:, :, at:at + s] = outputs[name]
        self.valid[:, at:at + s] = new_mask
        self.length += s
