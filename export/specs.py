"""One I/O spec per exported graph: names, dtypes, symbolic shapes with (min, opt, max) ranges, and the
FP32 parity thresholds that verify.py applies to each output.

The runtime imports these to allocate buffers; the exporter turns the symbols into torch.export.Dim
(dynamo) or dynamic_axes (legacy); trt_profiles() turns them into TensorRT optimisation profiles.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from janusflow_trt.janusflow_ref.config import LATENT_SIZE, JanusFlowConfig
from janusflow_trt.precision import EXPORTED

GRAPH_NAMES = ("siglip", "embed", "llm", "gen_enc", "gen_dec", "vae_dec")
# Views: a graph's output subset, for callers that read only those ("drop graph outputs nobody reads").
# An Euler step reads only the LLM's last hidden states: its view has no LM head (at full size 0.8 GB
# of FP32 weights read for nothing every step) and no K/V outputs. Derived from the parent's ONNX file
# at export (export/views.py), never exported from torch: same nodes, same weights (same data file).
VIEWS: dict[str, tuple[str, tuple[str, ...]]] = {"llm_gen": ("llm", ("last_hidden_state",))}


@dataclass(frozen=True)
class Sym:
    """A symbolic axis. `example` is the size used to trace (>= 2: dynamo specialises size-1 examples).
    `multiple_of` > 1: the size must be a multiple (CFG batches: cond rows + uncond rows).
    `sum_of`: a derived symbol whose size is the sum of others (mask length = C + S)."""

    name: str
    min: int
    opt: int
    max: int
    example: int
    multiple_of: int = 1
    sum_of: tuple[str, ...] = ()


@dataclass(frozen=True)
class Tol:
    """Parity thresholds: cosine > cos_min and |ort - ref| <= atol + rtol * |ref| everywhere
    (atol is the floor for tiny values, where a relative error means nothing)."""

    cos_min: float = 0.99999
    rtol: float = 1e-4
    atol: float = 1e-5


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype string: "float32", "int64"
    shape: tuple[int | str, ...]  # ints are static, strings name a Sym
    tol: Tol | None = None  # outputs only


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    syms: dict[str, Sym] = field(default_factory=dict)
    view_of: str | None = None  # set on a view (VIEWS): the graph whose outputs this is a subset of

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def size(self, sym: str, which: str) -> int:
        """Size of a symbol at 'min' | 'opt' | 'max' | 'example' (derived symbols add up their parts)."""
        s = self.syms[sym]
        if s.sum_of:
            return sum(self.size(p, which) for p in s.sum_of)
        return getattr(s, which)

    def shape(self, t: TensorSpec, which: str = "example", **sizes: int) -> tuple[int, ...]:
        """Concrete shape; keyword sizes override symbols (e.g. shape(t, C=1, S=5))."""
        def one(d):
            if isinstance(d, int):
                return d
            s = self.syms[d]
            if s.sum_of and d not in sizes:
                return sum(sizes.get(p, self.size(p, which)) for p in s.sum_of)
            return sizes.get(d, self.size(d, which))
        return tuple(one(d) for d in t.shape)


def T(name: str, dtype: str, *shape: int | str, tol: Tol | None = None) -> TensorSpec:
    return TensorSpec(name, dtype, tuple(shape), tol)


def kv_names(num_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def build_specs(cfg: JanusFlowConfig, vae_upscale: int = 8) -> dict[str, GraphSpec]:
    """vae_upscale: SDXL-VAE decoder upsampling (48x48 latent -> 384x384 image)."""
    h, llm = cfg.hidden, cfg.llm
    n_kv, hd = cfg.kv_heads, cfg.head_dim
    L, V, ctx = int(llm.num_hidden_layers), int(llm.vocab_size), cfg.max_context
    S_img, N = cfg.siglip.image_size, cfg.siglip.num_patches
    G, g, Cg = cfg.num_gen_tokens, cfg.latent_grid, cfg.gen_enc.channels
    lat = cfg.latent_shape
    f32 = "float32"
    default, loose = Tol(), Tol(atol=1e-4)  # loose: outputs that sum many terms (logits, VAE pixels)

    specs = {}
    syms = {"B": Sym("B", 1, 1, 8, 2)}
    specs["siglip"] = GraphSpec("siglip", [T("pixel_values", f32, "B", 3, S_img, S_img)],
                                [T("image_embeds", f32, "B", 1 + N, h, tol=default)], syms)
    syms = {"B": Sym("B", 1, 2, 16, 2), "S": Sym("S", 1, 128, ctx, 5)}
    specs["embed"] = GraphSpec("embed", [T("input_ids", "int64", "B", "S")],
                               [T("inputs_embeds", f32, "B", "S", h, tol=Tol(atol=1e-7))], syms)
    # LLM: B rows (CFG: 2 * num_images), S new tokens, C cache capacity, M = C + S mask length.
    syms = {"B": Sym("B", 1, 2, 16, 2), "S": Sym("S", 1, 1, ctx, 3), "C": Sym("C", 1, 1024, ctx, 4),
            "M": Sym("M", 2, 1025, 2 * ctx, 7, sum_of=("C", "S"))}
    specs["llm"] = GraphSpec(
        "llm",
        [T("inputs_embeds", f32, "B", "S", h), T("attention_mask", "int64", "B", "M"),
         T("position_ids", "int64", "B", "S"),
         *[T(n, f32, "B", n_kv, "C", hd) for n in kv_names(L, "past_key_values")]],
        [T("last_hidden_state", f32, "B", "S", h, tol=default), T("logits", f32, "B", V, tol=loose),
         *[T(n, f32, "B", n_kv, "S", hd, tol=default) for n in kv_names(L, "present")]],
        syms)
    syms = {"B": Sym("B", 2, 2, 16, 4, multiple_of=2)}
    specs["gen_enc"] = GraphSpec("gen_enc", [T("z", f32, "B", *lat), T("t", f32, "B")],
                                 [T("step_embeds", f32, "B", 1 + G, h, tol=default),
                                  T("t_emb", f32, "B", h, tol=default),
                                  T("skip", f32, "B", Cg, g, g, tol=default)], syms)
    specs["gen_dec"] = GraphSpec(
        "gen_dec",
        [T("hidden", f32, "B", 1 + G, h), T("skip", f32, "B", Cg, g, g), T("t_emb", f32, "B", h),
         T("z", f32, "B", *lat), T("cfg_weight", f32, 1), T("dt", f32, 1)],
        [T("velocity", f32, "B", *lat, tol=default), T("z_next", f32, "B", *lat, tol=default)], syms)
    side = LATENT_SIZE * vae_upscale
    syms = {"B": Sym("B", 1, 1, 8, 2)}
    specs["vae_dec"] = GraphSpec("vae_dec", [T("latents", f32, "B", *lat)],
                                 [T("image", f32, "B", 3, side, side, tol=loose)], syms)
    for view in VIEWS:
        specs[view] = view_spec(specs, view)
    return specs


def view_spec(specs: dict[str, GraphSpec], view: str) -> GraphSpec:
    """The parent's spec with only the view's outputs (same inputs, symbols, tolerances)."""
    parent, keep = VIEWS[view]
    p = specs[parent]
    outs = [t for t in p.outputs if t.name in keep]
    assert [t.name for t in outs] == list(keep), f"view {view}: {keep} are not outputs of {parent} in that order"
    return GraphSpec(view, list(p.inputs), outs, p.syms, view_of=parent)


def max_images(specs: dict[str, GraphSpec]) -> int:
    """Most images one text-to-image run may ask for: the smallest batch limit along its graphs
    (gen_enc / gen_dec / llm carry 2 CFG rows per image, vae_dec one)."""
    rows = min(specs[g].syms["B"].max for g in ("gen_enc", "gen_dec", "llm", "embed"))
    return min(rows // 2, specs["vae_dec"].syms["B"].max)


def trt_profiles(spec: GraphSpec) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """TensorRT-style optimisation profile: input name -> (min, opt, max) shapes."""
    return {t.name: (spec.shape(t, "min"), spec.shape(t, "opt"), spec.shape(t, "max")) for t in spec.inputs}


def dummy_inputs(spec: GraphSpec, seed: int = 0, **sizes: int) -> dict[str, np.ndarray]:
    """Seeded inputs with realistic values: masks of 0/1 with some zeros (never a fully masked row),
    positions continuing after the valid past, t in [0, 1000), CFG batches with equal halves."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for t in spec.inputs:
        shape = spec.shape(t, "example", **sizes)
        if t.name == "input_ids":
            out[t.name] = rng.integers(0, 100, shape, dtype=np.int64)
        elif t.name == "attention_mask":
            c = spec.shape(spec.inputs[3], "example", **sizes)[2]  # past capacity
            m = (rng.random(shape) > 0.3).astype(np.int64)
            m[:, 0] = 1  # the first (BOS) slot is always attendable
            m[:, c:] = 1  # new tokens are real
            out[t.name] = m
        elif t.name == "position_ids":
            b, s = shape
            c = spec.shape(spec.inputs[3], "example", **sizes)[2]
            out[t.name] = np.broadcast_to(np.arange(c, c + s, dtype=np.int64), (b, s)).copy()
        elif t.name == "t":
            out[t.name] = np.full(shape, rng.uniform(0, 1000), np.float32)
        elif t.name == "cfg_weight":
            out[t.name] = np.array([2.0], np.float32)
        elif t.name == "dt":
            out[t.name] = np.array([1.0 / 30], np.float32)
        else:
            x = rng.standard_normal(shape).astype(t.dtype)
            if spec.name == "gen_dec" and t.name == "z":  # cond and uncond halves carry the same z
                x[shape[0] // 2:] = x[:shape[0] // 2]
            out[t.name] = x
    return out


def compare(out: np.ndarray, ref: np.ndarray, tol: Tol) -> dict[str, float | bool]:
    """max abs, max rel, cosine; ok when within `tol` (shape mismatch -> not ok). max rel is taken where
    the relative term dominates the bound (|ref| > atol / rtol): elsewhere only the abs floor means much."""
    if out.shape != ref.shape:
        return {"max_abs": float("inf"), "max_rel": float("inf"), "cosine": 0.0, "ok": False}
    a, r = out.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    if a.size == 0:
        return {"max_abs": 0.0, "max_rel": 0.0, "cosine": 1.0, "ok": True}
    err = np.abs(a - r)
    big = np.abs(r) > tol.atol / tol.rtol
    max_rel = float((err[big] / np.abs(r[big])).max()) if big.any() else 0.0
    na, nr = np.linalg.norm(a), np.linalg.norm(r)
    cosine = float(a @ r / (na * nr)) if na > 0 and nr > 0 else float(na == nr)
    finite = bool(np.isfinite(a).all())
    ok = finite and cosine > tol.cos_min and bool((err <= tol.atol + tol.rtol * np.abs(r)).all())
    return {"max_abs": float(err.max()), "max_rel": max_rel, "cosine": cosine, "ok": ok}


# -- precision variants of a spec ------------------------------------------------------------------
PRECISIONS = tuple(p.value for p in EXPORTED)  # bf16 is a torch-backend dtype, never exported
# verify's bar for FP16 graphs vs the torch modules: ~1e-3 relative per op, accumulated over the graph
FP16_TOL = Tol(cos_min=0.9995, rtol=0.1, atol=0.5)
INT8_TOL = Tol(cos_min=0.99, rtol=0.5, atol=2.0)  # verify's bar for Q/DQ graphs: per-tensor 8-bit activations
FP16_IO = ("past_key_values.", "present.")  # boundary tensors that are FP16 in the fp16 variant


def precision_variant(spec: GraphSpec, precision: str) -> GraphSpec:
    """The same graph at another precision: fp16 carries the KV cache in FP16 (half its memory and
    read bandwidth, and the FP16 attention reads it as is); everything else keeps FP32 at the boundary
    (logits for sampling, latents through the Euler update, pixels, and the hidden states / t_emb /
    skip that cross between graphs: casting those is a cheap node inside the graph)."""
    if precision == "fp32":
        return spec
    if precision in ("int8", "int8-cpu"):  # Q/DQ inside the graph; the boundary stays FP32
        return GraphSpec(spec.name, [TensorSpec(t.name, t.dtype, t.shape, INT8_TOL if t.tol else None)
                                     for t in spec.inputs],
                         [TensorSpec(t.name, t.dtype, t.shape, INT8_TOL if t.tol else None) for t in spec.outputs],
                         spec.syms, spec.view_of)
    if precision != "fp16":
        raise ValueError(f"unknown precision {precision!r}")

    def var(t: TensorSpec) -> TensorSpec:
        if t.name.startswith(FP16_IO) and t.dtype == "float32":
            return TensorSpec(t.name, "float16", t.shape, FP16_TOL if t.tol else None)
        return TensorSpec(t.name, t.dtype, t.shape, FP16_TOL if t.tol else None)

    return GraphSpec(spec.name, [var(t) for t in spec.inputs], [var(t) for t in spec.outputs], spec.syms, spec.view_of)


def fp16_boundary(spec: GraphSpec) -> list[str]:
    """Names of the I/O tensors that become FP16 in the fp16 variant."""
    v = precision_variant(spec, "fp16")
    return [t.name for t in v.inputs + v.outputs if t.dtype == "float16"]
