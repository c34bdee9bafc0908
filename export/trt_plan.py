"""What `janusflow build` will build, derived from the specs alone (no TensorRT needed): one engine per
graph, its optimisation profiles, and the bytes of every I/O buffer at the largest shapes a profile
admits (the budget `build --dry-run` prints and the runtime allocates once).

Profiles:
- llm: "prefill" (S >= 2 new tokens; opt = one Euler step's 1 + G tokens over a cache of the spec's opt
  capacity) and "decode" (S = 1), so each gets kernels tuned for its shapes;
- llm_gen (the LLM without LM head and K/V outputs, export/views.py): "euler", S = 1 + G exactly;
- every other graph: one profile straight from its spec (the generation graphs' batch axis is the CFG
  batch 2n, min 2; TensorRT cannot say "even", so the runtime refuses odd batches before enqueueing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .specs import GraphSpec

Shape = tuple[int, ...]
Range = tuple[Shape, Shape, Shape]  # min, opt, max
WHICH = ("min", "opt", "max")


@dataclass(frozen=True)
class Profile:
    name: str
    shapes: dict[str, Range]  # input name -> (min, opt, max)

    def to_json(self) -> dict:
        return {"name": self.name, "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()}}

    @staticmethod
    def from_json(d: dict) -> Profile:
        return Profile(str(d["name"]), {k: tuple(tuple(int(x) for x in s) for s in v)  # type: ignore[misc]
                                        for k, v in d["shapes"].items()})


def _profile(spec: GraphSpec, name: str, **fixed: tuple[int, int, int]) -> Profile:
    """fixed: symbol -> (min, opt, max) overriding the spec's range for this profile."""
    shapes = {t.name: tuple(spec.shape(t, w, **{s: r[i] for s, r in fixed.items()}) for i, w in enumerate(WHICH))
              for t in spec.inputs}
    return Profile(name, shapes)  # type: ignore[arg-type]


def engine_profiles(specs: dict[str, GraphSpec], graph: str) -> list[Profile]:
    spec = specs[graph]
    if graph not in ("llm", "llm_gen"):
        return [_profile(spec, "all")]
    s = spec.syms["S"]
    step_tokens = specs["gen_enc"].outputs[0].shape[1]  # step_embeds [B, 1 + G, H]: one Euler step's new tokens
    assert isinstance(step_tokens, int), "gen_enc step_embeds must have a static token axis"
    if graph == "llm_gen":  # only ever run by the Euler step: its exact token count
        return [_profile(spec, "euler", S=(step_tokens, step_tokens, step_tokens))]
    prefill_opt = min(max(step_tokens, 2), s.max)
    return [_profile(spec, "prefill", S=(2, prefill_opt, s.max)), _profile(spec, "decode", S=(1, 1, 1))]


def max_sizes(spec: GraphSpec, profile: Profile) -> dict[str, int]:
    """Symbol -> its largest size under `profile` (read back from the profile's max input shapes)."""
    sizes: dict[str, int] = {}
    for t in spec.inputs:
        for d, n in zip(t.shape, profile.shapes[t.name][2], strict=True):
            if isinstance(d, str):
                sizes[d] = max(sizes.get(d, 0), n)
    return sizes


@dataclass(frozen=True)
class Buffer:
    engine: str  # graph name
    profile: str
    tensor: str
    shape: Shape
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    @property
    def is_kv_cache(self) -> bool:
        return self.tensor.startswith("past_key_values.")


def plan_buffers(spec: GraphSpec, profiles: list[Profile], dtypes: dict[str, str] | None = None) -> list[Buffer]:
    """Every I/O tensor of every profile at its max shape. dtypes: tensor -> dtype as the ONNX file
    declares it (a precision variant changes them); default: the spec's."""
    dtypes = dtypes or {}
    out = []
    for p in profiles:
        sizes = max_sizes(spec, p)
        for t in spec.inputs:
            out.append(Buffer(spec.name, p.name, t.name, p.shapes[t.name][2], dtypes.get(t.name, t.dtype)))
        for t in spec.outputs:
            shape = tuple(d if isinstance(d, int) else sizes[d] for d in t.shape)
            out.append(Buffer(spec.name, p.name, t.name, shape, dtypes.get(t.name, t.dtype)))
    return out


def budget(buffers: list[Buffer]) -> dict[str, int]:
    """Bytes the runtime allocates: per engine the largest profile's I/O (profiles of one engine run one at
    a time and share bindings), the KV cache counted once (prefill and decode write the same buffers)."""
    per: dict[str, dict[str, int]] = {}
    kv: dict[str, int] = {}
    for b in buffers:
        if b.is_kv_cache:
            kv[b.tensor] = max(kv.get(b.tensor, 0), b.nbytes)
            continue
        per.setdefault(b.engine, {}).setdefault(b.profile, 0)
        per[b.engine][b.profile] += b.nbytes
    out = {e: max(p.values()) for e, p in per.items()}
    out["kv_cache"] = sum(kv.values())
    out["total"] = sum(out.values())
    return out
