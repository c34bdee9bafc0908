"""The one KV cache: per-layer K/V [B, n_kv, C, hd] on the backend's device, written in place.

Capacity C grows in buckets (BUCKET tokens) so attention reads at most BUCKET-1 empty slots, and a
bucket change (one device-to-device copy, amortised over BUCKET tokens) is the only time it moves.
The mask buffer [B, C + 1] is slot validity followed by a constant 1 for the one new token of a
decode step, so a decode step's attention_mask is that buffer as it stands. A decode step writes
[B, n_kv, 1, hd] per layer at the device-side `index` (no host value inside the step, so the step can
be captured as a CUDA graph); a prefill writes its S tokens at the host-known `length`.
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
        self.length = 0  # host count of written slots (the device mirror is `index`)
        self._alloc(capacity if exact else bucket(capacity))

    def _alloc(self, cap: int) -> None:
        self.capacity = cap
        b, h, _, d = self.shape
        self.buffers = [torch.zeros((b, h, cap, d), dtype=self.dtype, device=self.device)
                        for _ in self.past_names]
        self.decode_mask = torch.zeros((b, cap + 1), dtype=torch.int64, device=self.device)
        self.decode_mask[:, cap] = 1
        self.valid = self.decode_mask[:, :cap]  # a view: 1 where a slot holds an attendable key
        self.index = torch.full((1,), self.length, dtype=torch.int64, device=self.device)

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

    def feeds(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.past_names, self.buffers, strict=True))

    def mask(self, new_mask: torch.Tensor) -> torch.Tensor:
        """[B, C + S]: slot validity, then the S new tokens' own mask [B, S]."""
        return torch.cat([self.valid, new_mask.to(torch.int64)], dim=1)

    def append(self, out: dict[str, torch.Tensor], new_mask: torch.Tensor) -> None:
        """A prefill's present.{i} [B, n_kv, S, hd] written at `length` (host-known: not captured)."""
        s, at = new_mask.shape[1], self.length
        assert at + s <= self.capacity, "reserve() before running the graph"
        for buf, name in zip(self.buffers, self.present_names, strict=True):
            buf[:, :, at:at + s] = out[name]
        self.valid[:, at:at + s] = new_mask
        self.length += s
        self.index.fill_(self.length)

    def write_one(self, out: dict[str, torch.Tensor]) -> None:
        """A decode step's present.{i} [B, n_kv, 1, hd] at slot `index`, the slot made valid, index += 1:
        all on the device, so it can be captured. The host counts the token with `length += 1`."""
        for buf, name in zip(self.buffers, self.present_names, strict=True):
            buf.index_copy_(2, self.index, out[name].to(buf.dtype))
        self.decode_mask.index_fill_(1, self.index, 1)
        self.index += 1
