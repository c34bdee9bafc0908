"""`janusflow make-tiny`: random checkpoints in the official JanusFlow-1.3B layout.

Presets keep every official spatial shape (384x384 images, 576 understanding and generation
tokens, 4x48x48 latents) and shrink widths, depths and the vocabulary:
  tiny  - tests (seconds); small - CPU benchmarks (real width ratios / 4, 2 layers);
  full  - the real JanusFlow-1.3B shapes (scale tests; never in CI);
  golden - the official hard-coded widths (SigLIP-L 1024 cut to 2 blocks by select_layer, LLM 2048,
           generation 768) with 2 small LLM layers: the official code loads it (tests/golden/);
  tiny-gqa - tiny with 2 KV heads for 4 query heads (grouped-query attention).
Every tensor is random (norm weights around 1, biases, GRN, the begin embedding included):
zeros and ones from init would hide bugs.

Initialisations (`--init`, INITS): `default` scales every matrix by 1/sqrt(fan_in) (the checkpoints the
INT8 recipe was tuned on); `peaked` is issue 24's checkpoint unlike ours: token embedding N(0, 1), q/k
projections N(0, 0.04), LM head N(0, 0.1), every other matrix N(0, 0.02), norm weights U(0.5, 1.5)
(peaked attention, large embedding activations, wide greedy margins). Both leave the VAE at `default`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from .errors import JanusFlowError
from .files import check_out_dir, dir_transaction
from .janusflow_ref.config import parse_config
from .janusflow_ref.weights import expected_shapes
from .tokenizer_factory import build_tokenizer

SYSTEM = "siglip_large_patch16_384"

PRESETS: dict[str, dict[str, Any]] = {
    # siglip: width, heads, layers; llm: hidden, layers, heads, inter, vocab; gen: channels
    "tiny": dict(sw=32, sh=2, sl=2, h=64, L=2, nh=4, inter=128, vocab=512, gc=32, tok_vocab=512,
                 vae=(8, 16, 16, 16), vae_layers=1, vae_groups=4, dtype=torch.float32),
    "small": dict(sw=256, sh=4, sl=2, h=512, L=2, nh=8, inter=1408, vocab=25600, gc=192, tok_vocab=2048,
                  vae=(32, 64, 128, 128), vae_layers=1, vae_groups=32, dtype=torch.float32),
    "full": dict(sw=1024, sh=16, sl=24, h=2048, L=24, nh=16, inter=5632, vocab=102400, gc=768, tok_vocab=4096,
                 vae=(128, 256, 512, 512), vae_layers=2, vae_groups=32, dtype=torch.bfloat16),
    # official SigLIP-L (no extension keys), select_layer 2 keeps 2 blocks; official aligner widths
    "golden": dict(sw=1024, sh=16, sl=24, select_layer=2, official_siglip=True, h=2048, L=2, nh=16, inter=256, mid=1,
                   vocab=512, gc=768, tok_vocab=512, vae=(8, 16, 16, 16), vae_layers=1, vae_groups=4,
                   dtype=torch.float32),
}
PRESETS["tiny-gqa"] = {**PRESETS["tiny"], "nkv": 2}


def model_config(size: str, vocab: int) -> dict[str, Any]:
    p = PRESETS[size]
    und: dict[str, Any] = {"image_size": 384, "model_name": SYSTEM, "select_feature": "same",
                           "select_layer": p.get("select_layer", -1)}
    # extension keys (see config.py); full and golden build the official SigLIP-L
    if size != "full" and not p.get("official_siglip"):
        und.update(width=p["sw"], heads=p["sh"], layers=p["sl"])
    gen_common = {"block_out_channels": [p["gc"]], "elementwise_affine": True, "hidden_size": p["h"],
                  "layers_in_middle": p.get("mid", 2), "norm_eps": 1e-05, "use_bias": True, "use_mid_block": True}
    return {
        "architectures": ["MultiModalityCausalLM"],
        "model_type": "multi_modality",
        "torch_dtype": "bfloat16" if p["dtype"] == torch.bfloat16 else "float32",
        "language_config": {
            "hidden_size": p["h"], "intermediate_size": p["inter"], "max_position_embeddings": 4096,
            "model_type": "llama", "num_attention_heads": p["nh"], "num_hidden_layers": p["L"],
            "num_key_value_heads": p.get("nkv", p["nh"]), "vocab_size": max(p["vocab"], vocab), "rms_norm_eps": 1e-06,
            "rope_theta": 10000.0, "torch_dtype": "bfloat16",
        },
        "vision_und_enc_config": {"cls": "CLIPVisionTower", "model_type": "vision_und_enc", "params": und},
        "vision_gen_enc_config": {
            "cls": "ShallowUViTEncoder", "model_type": "vision_gen_enc",
            "params": {**gen_common, "input_channels": 4, "kernel_size": 2, "padding": 0, "stride": 2},
        },
        "vision_gen_dec_config": {
            "cls": "ShallowUViTDecoder", "model_type": "vision_gen_dec",
            "params": {**gen_common, "in_channels": p["gc"], "out_channels": 4, "upsamples": 1},
        },
    }


PREPROCESSOR_CONFIG = {
    "background_color": [127, 127, 127], "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "VLMImageProcessor", "image_size": 384, "image_std": [0.5, 0.5, 0.5],
    "min_size": 14, "processor_class": "VLChatProcessor", "rescale_factor": 0.00392156862745098,
}
PROCESSOR_CONFIG = {
    "add_special_token": False, "ignore_id": -100, "image_tag": "<image_placeholder>", "mask_prompt": True,
    "num_image_tokens": 576, "processor_class": "VLChatProcessor", "sft_format": "deepseek",
}


def random_like(name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """Random values with sane scales: ~1/sqrt(fan_in) weights, norm weights near 1, small biases."""
    t = torch.randn(tuple(shape), generator=gen)
    vector = sum(1 for s in shape if s != 1) <= 1
    leaf = name.rsplit(".", 1)[-1]
    if "norm" in name or ".ln" in name or name.endswith("gamma"):
        return 1.0 + 0.1 * t if leaf == "weight" else 0.1 * t
    if leaf == "bias" or vector and leaf != "weight":
        return 0.05 * t
    if "embed_tokens" in name or name.endswith(("pos_embed", "latent", "beg_of_und_embed")):
        return 0.5 * t
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
    return t / math.sqrt(max(fan_in, 1))


INITS = ("default", "peaked")


def peaked_like(name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """issue 24's distribution: N(0, 1) token embedding, N(0, 0.04) q/k, N(0, 0.1) LM head, N(0, 0.02)
    other matrices, U(0.5, 1.5) norm weights; vectors, biases and learned embeddings as `default`."""
    leaf = name.rsplit(".", 1)[-1]
    is_norm = "norm" in name or ".ln" in name or name.endswith("gamma")
    if is_norm and leaf == "weight":
        return 0.5 + torch.rand(tuple(shape), generator=gen)
    matrix = leaf == "weight" and sum(1 for s in shape if s != 1) >= 2 and not is_norm
    if not matrix:
        return random_like(name, shape, gen)
    std = (1.0 if "embed_tokens" in name else 0.04 if name.endswith(("q_proj.weight", "k_proj.weight"))
           else 0.1 if "lm_head" in name else 0.02)
    return std * torch.randn(tuple(shape), generator=gen)


def randomize(module: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(random_like(name, p.shape, gen))


def write_vae(out: Path, size: str, gen: torch.Generator) -> None:
    p = PRESETS[size]
    n = len(p["vae"])
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=p["vae"], layers_per_block=p["vae_layers"],
        latent_channels=4, norm_num_groups=p["vae_groups"], sample_size=1024, scaling_factor=0.13025,
        force_upcast=True,
    )
    randomize(vae, gen)
    vae.save_pretrained(str(out), safe_serialization=True)


MARKER = ".janusflow-make-tiny"  # written into every checkpoint we make: --force replaces only those


def is_tiny_dir(d: Path) -> bool:
    return (d / MARKER).is_file()


def make_tiny(out_dir: str | Path, size: str = "tiny", seed: int = 0, force: bool = False,
              init: str = "default") -> Path:
    """An existing DIR is replaced only if it is empty, or a checkpoint of ours and force is set.
    init: the weights' distribution (INITS; the VAE is always `default`)."""
    if size not in PRESETS:
        raise JanusFlowError(f"unknown --size {size!r}; choose from {', '.join(PRESETS)}")
    if init not in INITS:
        raise JanusFlowError(f"unknown --init {init!r}; choose from {', '.join(INITS)}")
    draw = peaked_like if init == "peaked" else random_like
    out = check_out_dir(out_dir, "DIR", force, is_tiny_dir, "a checkpoint written by make-tiny")
    gen = torch.Generator().manual_seed(seed)
    with dir_transaction(out, "DIR") as tmp:
        (tmp / MARKER).write_text(json.dumps({"size": size, "seed": seed, "init": init}) + "\n")
        tok = build_tokenizer(tmp, PRESETS[size]["tok_vocab"])
        raw = model_config(size, tok.get_vocab_size())
        (tmp / "config.json").write_text(json.dumps(raw, indent=2))
        (tmp / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
        (tmp / "processor_config.json").write_text(json.dumps(PROCESSOR_CONFIG, indent=2))
        cfg = parse_config(raw)
        dtype = PRESETS[size]["dtype"]
        state = {k: draw(k, s, gen).to(dtype).contiguous() for k, s in expected_shapes(cfg).items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del state
        write_vae(tmp / "vae", size, gen)
    return out
