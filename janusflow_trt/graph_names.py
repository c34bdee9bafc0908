"""The exported graphs by name, and the views cut from them: the one list that export (export/specs.py
declares each graph's I/O), calibration (a view's calls calibrate its parent) and the runtime read.
Plain data, so that the lowest layers can read it."""

from __future__ import annotations

GRAPH_NAMES = ("siglip", "embed", "llm", "gen_enc", "gen_dec", "vae_dec")
# Views: a graph's output subset, for callers that read only those ("drop graph outputs nobody reads").
# An Euler step reads only the LLM's last hidden states: its view has no LM head (at full size 0.8 GB
# of FP32 weights read for nothing every step) and no K/V outputs. Derived from the parent's ONNX file
# at export (export/views.py), never exported from torch: same nodes, same weights (same data file).
# view -> (parent graph, the parent's outputs it keeps, in order)
VIEWS: dict[str, tuple[str, tuple[str, ...]]] = {"llm_gen": ("llm", ("last_hidden_state",))}
