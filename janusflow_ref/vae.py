"""SDXL-VAE in diffusers layout (AutoencoderKL); the scaling factor comes from its config."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import CheckpointError


def resolve_vae_dir(model_dir: str | Path, vae_dir: str | Path | None) -> Path:
    if vae_dir is not None:
        return Path(vae_dir)
    default = Path(model_dir) / "vae"
    if default.is_dir():
        return default
    raise CheckpointError(f"no --vae given and {default} does not exist (point --vae at an SDXL-VAE directory)")


def load_vae(vae_dir: str | Path, dtype: torch.dtype = torch.float32):
    from diffusers import AutoencoderKL

    vae_dir = Path(vae_dir)
    if not (vae_dir / "config.json").is_file():
        raise CheckpointError(f"VAE directory {vae_dir} has no config.json (expected diffusers AutoencoderKL layout)")
    try:
        # low_cpu_mem_usage would need accelerate (not a dependency) and warns without it; the VAE is small
        vae = AutoencoderKL.from_pretrained(str(vae_dir), torch_dtype=dtype, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot load VAE from {vae_dir}: {str(e).splitlines()[0]}") from None
    if vae.config.latent_channels != 4:
        raise CheckpointError(f"VAE in {vae_dir} has {vae.config.latent_channels} latent channels; JanusFlow needs 4")
    return vae.eval()
