"""JanusFlow config: the official config.json schema (model_type multi_modality) as frozen dataclasses.

Every parameter the official constructors accept is accepted here with the official default
(CLIPVisionTower, create_siglip_vit, ShallowUViTEncoder, ShallowUViTDecoder). The official code
hard-codes the aligner widths (1024->2048, 768->2048, 2048->768); here they derive from the
config so that tiny checkpoints work, and come out identical for the real config.

Extension (ignored by the official code, which would build SigLIP-L regardless): the
vision_und_enc params may override the SigLIP preset with `width`, `layers`, `heads`,
`patch_size`, `mlp_ratio`. Our tiny/small checkpoints use that; official checkpoints never do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import LlamaConfig

from janusflow_trt.errors import CheckpointError

from .config_schema import schema_problems

# Official SigLIP presets (janus/janusflow/models/siglip_vit.py: SigLIP_MODEL_CONFIG).
SIGLIP_PRESETS: dict[str, dict[str, Any]] = {
    "siglip_so400m_patch14_384": dict(width=1152, layers=27, heads=16, patch_size=14, mlp_ratio=3.7362),
    "siglip_so400m_patch14_224": dict(width=1152, layers=27, heads=16, patch_size=14, mlp_ratio=3.7362),
    "siglip_large_patch16_384": dict(width=1024, layers=24, heads=16, patch_size=16, mlp_ratio=4.0),
    "siglip_large_patch16_256": dict(width=1024, layers=24, heads=16, patch_size=16, mlp_ratio=4.0),
}

# The SDXL-VAE latent the official demo hard-codes: [B, 4, 48, 48] for 384x384 images.
LATENT_CHANNELS = 4
LATENT_SIZE = 48


@dataclass(frozen=True)
class SigLIPConfig:
    """CLIPVisionTower(model_name, image_size, select_feature, select_layer, ...) with a SigLIP tower."""

    model_name: str = "siglip_large_patch16_384"
    image_size: int = 336  # CLIPVisionTower's own default; the real config says 384
    select_feature: str = "patch"
    select_layer: int = -2
    pixel_mean: tuple[float, ...] | None = None
    pixel_std: tuple[float, ...] | None = None
    width: int = 1024
    preset_layers: int = 24
    heads: int = 16
    patch_size: int = 16
    mlp_ratio: float = 4.0

    @property
    def depth(self) -> int:
        """Blocks actually built (create_siglip_vit truncates the tower at select_layer)."""
        if self.select_layer <= 0:
            return min(self.preset_layers, self.preset_layers + self.select_layer + 1)
        return min(self.preset_layers, self.select_layer)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclass(frozen=True)
class GenEncoderConfig:
    """ShallowUViTEncoder parameters, official defaults."""

    input_channels: int = 3
    stride: int = 4
    kernel_size: int = 7
    padding: int | None = None
    block_out_channels: tuple[int, ...] = (768,)
    layers_in_middle: int = 2
    hidden_size: int = 2048
    elementwise_affine: bool = True
    use_bias: bool = True
    norm_eps: float = 1e-6
    dropout: float = 0.0
    use_mid_block: bool = True

    @property
    def conv_padding(self) -> int:
        return math.ceil(self.kernel_size - self.stride) if self.padding is None else self.padding

    @property
    def channels(self) -> int:
        return self.block_out_channels[-1]


@dataclass(frozen=True)
class GenDecoderConfig:
    """ShallowUViTDecoder parameters, official defaults."""

    in_channels: int = 768
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (768,)
    upsamples: int = 2
    layers_in_middle: int = 2
    hidden_size: int = 2048
    elementwise_affine: bool = True
    norm_eps: float = 1e-6
    use_bias: bool = True
    dropout: float = 0.0
    use_mid_block: bool = True


@dataclass(frozen=True)
class JanusFlowConfig:
    siglip: SigLIPConfig
    gen_enc: GenEncoderConfig
    gen_dec: GenDecoderConfig
    llm: LlamaConfig = field(compare=False)
    raw: dict[str, Any] = field(compare=False, repr=False)
    sha256: str = ""
    source: Path | None = field(default=None, compare=False)  # the checkpoint dir load_config read

    @property
    def hidden(self) -> int:
        return int(self.llm.hidden_size)

    @property
    def latent_grid(self) -> int:
        """Side of the generation token grid: the encoder's conv output on a 48x48 latent."""
        e = self.gen_enc
        return (LATENT_SIZE + 2 * e.conv_padding - e.kernel_size) // e.stride + 1

    @property
    def num_gen_tokens(self) -> int:
        return self.latent_grid**2

    @property
    def max_context(self) -> int:
        return int(self.llm.max_position_embeddings)

    @property
    def num_layers(self) -> int:
        return int(self.llm.num_hidden_layers)

    @property
    def kv_heads(self) -> int:
        """Key/value heads (fewer than the attention heads under grouped-query attention)."""
        return int(getattr(self.llm, "num_key_value_heads", None) or self.llm.num_attention_heads)

    @property
    def head_dim(self) -> int:
        return int(getattr(self.llm, "head_dim", None) or self.hidden // self.llm.num_attention_heads)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """One image's SDXL-VAE latent [C, H, W]."""
        return (LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)


def _int_tuple(v: Any) -> tuple[int, ...]:
    return tuple(int(x) for x in v)


def _sub(raw: dict[str, Any], key: str, expect_cls: str) -> dict[str, Any]:
    sub = raw.get(key, {})
    if not isinstance(sub, dict):
        raise CheckpointError(f"config.json: '{key}' must be an object")
    cls = sub.get("cls", "")
    if expect_cls not in str(cls):
        raise CheckpointError(f"config.json: '{key}.cls' is {cls!r}; JanusFlow needs {expect_cls}")
    params = sub.get("params", {})
    if not isinstance(params, dict):
        raise CheckpointError(f"config.json: '{key}.params' must be an object")
    return params


def _build(dc: type, params: dict[str, Any], where: str, tuples: tuple[str, ...] = ()) -> Any:
    known = {f.name for f in dataclasses.fields(dc)}
    kwargs = {}
    for k, v in params.items():
        if k in known:
            kwargs[k] = _int_tuple(v) if k in tuples else v
        # Unknown keys are ignored, as the official constructors swallow them in **kwargs.
    try:
        return dc(**kwargs)
    except TypeError as e:
        raise CheckpointError(f"config.json: bad {where} params: {e}") from None


def parse_config(raw: dict[str, Any], sha256: str = "") -> JanusFlowConfig:
    if raw.get("model_type") != "multi_modality":
        raise CheckpointError(
            f"config.json: model_type is {raw.get('model_type')!r}, expected 'multi_modality' (JanusFlow)"
        )
    und = _sub(raw, "vision_und_enc_config", "CLIPVisionTower")
    _sub(raw, "vision_gen_enc_config", "ShallowUViTEncoder")
    _sub(raw, "vision_gen_dec_config", "ShallowUViTDecoder")
    problems = schema_problems(raw)
    if problems:
        raise CheckpointError("config.json: " + "; ".join(problems))
    model_name = und.get("model_name", "siglip_large_patch16_384")
    if not isinstance(model_name, str) or model_name not in SIGLIP_PRESETS:
        raise CheckpointError(
            f"config.json: vision_und_enc_config.params.model_name {model_name!r} is not one of "
            f"{sorted(SIGLIP_PRESETS)}"
        )
    preset = dict(SIGLIP_PRESETS[model_name])
    for k in ("width", "heads", "patch_size", "mlp_ratio"):
        if k in und:
            preset[k] = und[k]
    siglip = SigLIPConfig(
        model_name=model_name,
        image_size=int(und.get("image_size", 336)),
        select_feature=str(und.get("select_feature", "patch")),
        select_layer=int(und.get("select_layer", -2)),
        pixel_mean=tuple(und["pixel_mean"]) if und.get("pixel_mean") is not None else None,
        pixel_std=tuple(und["pixel_std"]) if und.get("pixel_std") is not None else None,
        width=int(preset["width"]),
        preset_layers=int(und.get("layers", preset["layers"])),
        heads=int(preset["heads"]),
        patch_size=int(preset["patch_size"]),
        mlp_ratio=float(preset["mlp_ratio"]),
    )
    if isinstance(und.get("image_size"), (list, tuple)):
        raise CheckpointError("config.json: only square SigLIP image_size is supported")
    gen_enc = _build(GenEncoderConfig, _sub(raw, "vision_gen_enc_config", "ShallowUViTEncoder"),
                     "vision_gen_enc_config", ("block_out_channels",))
    gen_dec = _build(GenDecoderConfig, _sub(raw, "vision_gen_dec_config", "ShallowUViTDecoder"),
                     "vision_gen_dec_config", ("block_out_channels",))
    lang = raw.get("language_config", {})
    if not isinstance(lang, dict):
        raise CheckpointError("config.json: 'language_config' must be an object")
    try:
        llm = LlamaConfig(**lang)
    except Exception as e:  # transformers validates with several exception types
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"config.json: bad language_config: {msg}") from None
    cfg = JanusFlowConfig(siglip=siglip, gen_enc=gen_enc, gen_dec=gen_dec, llm=llm, raw=raw, sha256=sha256)
    _validate(cfg)
    return cfg


U, E, D = ("vision_und_enc_config.params", "vision_gen_enc_config.params", "vision_gen_dec_config.params")


def _validate(cfg: JanusFlowConfig) -> None:
    """Cross-field consistency (types and ranges were checked by config_schema)."""
    s, e, d = cfg.siglip, cfg.gen_enc, cfg.gen_dec
    problems = []
    for name, v in (("SigLIP width", s.width), ("SigLIP heads", s.heads), ("image_size", s.image_size),
                    ("patch_size", s.patch_size), ("LLM hidden_size", cfg.hidden),
                    ("LLM layers", cfg.llm.num_hidden_layers), ("vocab_size", cfg.llm.vocab_size)):
        if not isinstance(v, int) or v <= 0:
            problems.append(f"{name} must be a positive integer, got {v!r}")
    if not problems:
        if s.width % s.heads:
            problems.append(f"{U}.width {s.width} is not divisible by {U}.heads {s.heads}")
        if s.depth <= 0:
            problems.append(f"{U}.select_layer {s.select_layer} leaves no SigLIP blocks")
        if s.image_size % s.patch_size:
            problems.append(f"{U}.image_size {s.image_size} is not a multiple of {U}.patch_size {s.patch_size}")
        if s.select_feature not in ("patch", "cls_patch", "same"):
            problems.append(f"unknown select_feature {s.select_feature!r}")
        if e.input_channels != LATENT_CHANNELS or d.out_channels != LATENT_CHANNELS:
            problems.append(
                f"{E}.input_channels ({e.input_channels}) and {D}.out_channels "
                f"({d.out_channels}) must both be the SDXL-VAE latent channels ({LATENT_CHANNELS})"
            )
        if e.hidden_size != cfg.hidden or d.hidden_size != cfg.hidden:
            problems.append(f"{E}.hidden_size and {D}.hidden_size must equal language_config.hidden_size {cfg.hidden}")
        if d.in_channels != e.channels or d.block_out_channels[-1] != e.channels:
            problems.append(
                f"{D}.in_channels ({d.in_channels}) and block_out_channels[-1] must equal "
                f"{E}.block_out_channels[-1] ({e.channels}): the skip tensor is concatenated"
            )
        if cfg.latent_grid <= 0 or cfg.latent_grid * 2**d.upsamples != LATENT_SIZE:
            problems.append(
                f"{E} stride/kernel_size/padding give a {cfg.latent_grid} grid; x 2^{D}.upsamples "
                f"({d.upsamples}) does not give back the {LATENT_SIZE}x{LATENT_SIZE} latent"
            )
    if problems:
        raise CheckpointError("config.json: " + "; ".join(problems))


def load_config(model_dir: str | Path) -> JanusFlowConfig:
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise CheckpointError(f"model directory not found: {model_dir}")
    if not path.is_file():
        raise CheckpointError(f"no config.json in {model_dir}")
    data = path.read_bytes()
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return dataclasses.replace(parse_config(raw, hashlib.sha256(data).hexdigest()), source=Path(model_dir))
