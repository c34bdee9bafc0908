"""SDXL-VAE in diffusers layout (AutoencoderKL); the scaling factor comes from its config."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from diffusers.utils import logging as dlog
from safetensors import safe_open

from janusflow_trt.errors import CheckpointError

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors header names


def resolve_vae_dir(model_dir: str | Path, vae_dir: str | Path | None) -> Path:
    if vae_dir is not None:
        return Path(vae_dir)
    default = Path(model_dir) / "vae"
    if default.is_dir():
        return default
    raise CheckpointError(f"no --vae given and {default} does not exist (point --vae at an SDXL-VAE directory)")


def check_vae_dir(vae_dir: Path) -> None:
    """Ours to judge before diffusers sees it: its config class, and safetensors weights (never pickle)."""
    cfg_file = vae_dir / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"VAE directory {vae_dir} has no config.json (expected diffusers AutoencoderKL layout)")
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("_class_name") != "AutoencoderKL":
        got = raw.get("_class_name") if isinstance(raw, dict) else None
        raise CheckpointError(f"{vae_dir} is not a diffusers AutoencoderKL directory (config _class_name {got!r})")
    if not list(vae_dir.glob("*.safetensors")):
        pickled = sorted(p.name for p in vae_dir.glob("*.bin"))
        if pickled:
            raise CheckpointError(f"VAE in {vae_dir} has only pickle weights ({pickled[0]}); pickle is never loaded: "
                                  "convert it to safetensors")
        raise CheckpointError(f"no *.safetensors weights in VAE directory {vae_dir}")
    for f in sorted(vae_dir.glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt") as st:
                dtypes = {k: st.get_slice(k).get_dtype() for k in st.keys()}
        except Exception as e:  # safetensors raises its own SafetensorError
            raise CheckpointError(f"{f}: corrupt or unreadable safetensors file ({str(e).splitlines()[0]})") from None
        bad = [(k, d) for k, d in dtypes.items() if d not in FLOAT_DTYPES]
        if bad:  # from_pretrained would cast them to float silently
            raise CheckpointError(f"{f}: tensor {bad[0][0]} is {bad[0][1]}; VAE weights must be floating point")


def load_vae(vae_dir: str | Path, dtype: torch.dtype = torch.float32):
    vae_dir = Path(vae_dir)
    check_vae_dir(vae_dir)
    level = dlog.get_verbosity()
    dlog.set_verbosity_error()  # its warnings about config keys would precede our one line
    try:
        # low_cpu_mem_usage would need accelerate (not a dependency) and warns without it; the VAE is small
        vae = AutoencoderKL.from_pretrained(str(vae_dir), torch_dtype=dtype, use_safetensors=True,
                                            low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as e:
        raise CheckpointError(f"cannot load VAE from {vae_dir}: {str(e).splitlines()[0] if str(e) else e!r}") from None
    finally:
        dlog.set_verbosity(level)

    if vae.config.latent_channels != 4:
        raise CheckpointError(f"VAE in {vae_dir} has {vae.config.latent_channels} latent channels; JanusFlow needs 4")
    return vae.eval()
