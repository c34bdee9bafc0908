"""A recorded calibration set: the FP32 runtime's actual inputs to each graph, during chat and during the
Euler loop. This module says what is kept (Plan), names a set (recording_key) and reads one back
(CalibrationData); the recording itself runs the runtime, so it lives above it (janusflow_trt/recording.py:
a Recorder wrapped around the seam saves the feeds of the chosen calls as DIR/<graph>/<n>.npz). What is
kept, per graph (bounded so the set stays small at every model size):
- chat, one call per photograph: siglip and the prefill embed/llm calls, plus the llm decode call
  of every `decode_stride`-th new token (CHAT_TOKENS new tokens, greedy);
- text-to-image, one image per prompt, seeded latents: the first `full_runs` prompts run all steps,
  keep every `full_stride`-th step (together: every timestep) and the prefix prefill (embed, llm), and
  feed their final latents to vae_dec; every other prompt keeps one of the first `early_steps` steps
  and stops there (see Plan).
DIR/index.json lists every file with its sha256; the set's hash is the sha256 of that list.
A set is reused when its key (checkpoint, inputs, recipe) matches.

Plans (PLANS): `default` records the whole built-in set as above; `lean` is for the full-size model,
where one FP32 Euler step is ~3 TFLOP (~20 s on this 2-core machine): a spread subset of the prompts
and photographs, one full run, and a per-graph cap on the samples walked by the range measurement
(CalibrationData.select: spread over the recorded sources and timesteps).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from janusflow_trt.errors import CheckpointError
from janusflow_trt.fingerprint import sha256_file

if TYPE_CHECKING:  # annotations only: the ModelOpt worker reads recorded sets without PIL
    from .data import InputSet

RECORDER_VERSION = 1
CHAT_TOKENS = 8


@dataclass(frozen=True)
class Plan:
    """Which calls are kept. The Euler loop is the cost (every kept step needs all steps before it), so
    a few prompts run the whole loop and cover every timestep, and the rest add prompt diversity in
    the early steps only: ~full_runs * steps + (prompts - full_runs) * early_steps / 2 Euler steps."""

    steps: int = 30
    cfg_weight: float = 2.0
    full_runs: int = 4  # prompts run through all steps; their final latents feed vae_dec
    full_stride: int = 2  # a full run keeps every full_stride-th step (offset by prompt: all timesteps)
    early_steps: int = 4  # any other prompt keeps one step among the first early_steps, then stops
    decode_stride: int = 3
    max_prompts: int | None = None  # a spread subset of the input set's prompts (None: all)
    max_pairs: int | None = None  # a spread subset of its (photograph, question) pairs (None: all)
    measure_samples: int | None = None  # per graph, samples walked by the range measurement (None: all)
    check_samples: int = 4  # per graph, samples of the FP16-vs-FP32 check after conversion
    name: str = "custom"

    def kept_steps(self, p: int) -> set[int]:
        if p < self.full_runs:
            return set(range(p % self.full_stride, self.steps, self.full_stride))
        return {p % min(self.early_steps, self.steps)}


PLANS = {
    "default": Plan(name="default"),
    # ~10 + 7 * 1.5 Euler steps and 4 chats instead of ~270 steps and 11 chats; <= 8 samples per graph
    # measured (each walked once per chunk of exposed tensors, calibration/ranges.py). Its one full run
    # takes 10 steps (timesteps 0 .. 0.9, as 30 steps cover, on a coarser grid): 20 fewer FP32 steps at
    # full size; small preset, both inits (docs/results/lean_steps_small.json, tools/experiments/
    # lean_steps.py): the FP16 variant's gate figures and islands identical to 30 steps', int8-cpu's within
    # 0.42 dB PSNR and 8e-5 latent cosine of them, either way
    "lean": Plan(steps=10, full_runs=1, full_stride=1, early_steps=2, max_prompts=8, max_pairs=4, measure_samples=8,
                 check_samples=2, name="lean"),
}


def spread(n: int, k: int | None) -> list[int]:
    """k indices of range(n), evenly spaced, first and last included (all of them when k is None or >= n)."""
    if k is None or k >= n:
        return list(range(n))
    if k <= 0:
        return []
    return [int(i) for i in np.linspace(0, n - 1, k).round()]  # spacing >= 1: distinct


def subset(inputs: InputSet, plan: Plan) -> InputSet:
    """The prompts and pairs the plan records: a spread subset of each."""
    keep = spread(len(inputs.prompts), plan.max_prompts)
    prompts = tuple(inputs.prompts[i] for i in keep)
    where = tuple(inputs.where[i] for i in keep) if inputs.where else ()
    pairs = tuple(inputs.pairs[i] for i in spread(len(inputs.pairs), plan.max_pairs))
    return replace(inputs, prompts=prompts, pairs=pairs, where=where)


def _stat(path: Path) -> list:
    files = sorted(p for p in Path(path).rglob("*.safetensors*")) if Path(path).is_dir() else []
    return [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def recording_key(model_dir: Path, vae_dir: Path | None, inputs: InputSet, plan: Plan, backend: str) -> str:
    """What the recorded set depends on: the checkpoint (config + weight files' size and mtime; hashing
    GBs of weights on every export would cost more than re-recording), the inputs, the plan and the
    backend that ran the loops (janusflow_trt/recording.py: recorder_backend)."""
    # lazy: the ModelOpt worker imports this module in ModelOpt's own environment (pinned packages) only
    # to read recorded sets; the config parser (transformers) is needed only for a key
    from janusflow_trt.janusflow_ref.config import load_config

    doc = {"v": RECORDER_VERSION, "config": load_config(model_dir).sha256, "weights": _stat(model_dir),
           "vae": _stat(vae_dir) if vae_dir else None, "inputs": inputs.sha256(),
           "plan": {k: v for k, v in plan.__dict__.items() if k != "name"}, "backend": backend}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _step(source: str) -> int:
    return int(source.rsplit(":step", 1)[1]) if ":step" in source else -1


def sample_kind(src: str, repeat: bool) -> str:
    """What call a recorded file is, from its source (see record); repeat: not the first file of its
    graph from that source (within a chat, the llm calls after the prefill are decode steps)."""
    if src.startswith("chat:"):
        return "chat decode" if repeat else "chat prefill"
    if ":step" in src:
        return "euler step"
    if src.endswith(":final"):
        return "vae"
    return "text prefill"


class CalibrationData:
    """A recorded set on disk: samples per graph, checked against index.json."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.index = json.loads((self.path / "index.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"calibration data {self.path}: unreadable index.json ({e})") from None
        if self.index.get("recorder_version") != RECORDER_VERSION:
            raise CheckpointError(f"calibration data {self.path}: recorder version "
                                  f"{self.index.get('recorder_version')!r}, expected {RECORDER_VERSION}")
        # statistics measured from this set, kept for the object's life (export/int8.py): the INT8
        # activation ranges per graph file, recipe and fixed plan (("ranges", key, skipped nodes):
        # _activation_ranges) and SmoothQuant's channel maxima per graph file (("smoothing", key, None):
        # smoothing_maxima, or the FP16 range walk's: keep_smoothing_maxima)
        self.ranges: dict[tuple, Any] = {}

    @property
    def sha256(self) -> str:
        return self.index["sha256"]

    def count(self, graph: str) -> int:
        return sum(f["graph"] == graph for f in self.index["files"])

    def _files(self, graph: str) -> list[tuple[str, dict[str, Any]]]:
        """(kind, file) of `graph`'s files in recording order (sample_kind)."""
        seen: set[str] = set()
        out = []
        for f in self.index["files"]:
            if f["graph"] == graph:
                out.append((sample_kind(f["source"], f["source"] in seen), f))
                seen.add(f["source"])
        return out

    def select(self, graph: str, limit: int | None = None) -> list[tuple[str, dict[str, Any]]]:
        """At most `limit` of `graph`'s (kind, file)s (None: all), in recording order. Deterministic and
        spread: the limit is shared out evenly over the kinds of call (chat prefill, chat decode, text
        prefill, Euler step, VAE), a kind with fewer files than its share giving the rest to the others;
        within a kind the files are evenly spaced, Euler steps ordered by timestep first so that early,
        middle and late steps are all kept."""
        files = self._files(graph)
        if limit is None or limit >= len(files):
            return files
        groups: dict[str, list[int]] = {}
        for i, (kind, _) in enumerate(files):
            groups.setdefault(kind, []).append(i)
        if "euler step" in groups:
            groups["euler step"].sort(key=lambda i: _step(files[i][1]["source"]))
        quota, left, pending = {}, limit, sorted(groups, key=lambda k: len(groups[k]))
        while pending:  # water-filling: the smallest kinds first, each up to an even share of what is left
            k = pending.pop(0)
            quota[k] = min(len(groups[k]), left // (len(pending) + 1))  # the last (largest) takes the rest
            left -= quota[k]
        keep = sorted(groups[k][j] for k in groups for j in spread(len(groups[k]), quota[k]))
        return [files[i] for i in keep]

    def kinds(self, graph: str, limit: int | None = None) -> dict[str, int]:
        """How many of the selected files are of each kind (for the recipes)."""
        out: dict[str, int] = {}
        for kind, _ in self.select(graph, limit):
            out[kind] = out.get(kind, 0) + 1
        return out

    def samples(self, graph: str, limit: int | None = None):
        """Feeds dicts of `graph` (select: at most `limit`, spread), in recording order; a file changed
        since recording is refused."""
        for _, f in self.select(graph, limit):
            p = self.path / f["file"]
            if not p.is_file() or sha256_file(p) != f["sha256"]:
                raise CheckpointError(f"calibration data {p}: missing or changed since recording; re-record")
            with np.load(p, allow_pickle=False) as z:
                yield {k: z[k] for k in z.files}
