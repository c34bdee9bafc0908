"""Strict safetensors loading with the official key names (single file or sharded with an index)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from .config import JanusFlowConfig, load_config
from .errors import CheckpointError
from .fingerprint import quick_digest
from .model import JanusFlow

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def checkpoint_files(model_dir: Path) -> list[Path]:
    if (model_dir / INDEX).is_file():
        try:
            index = json.loads((model_dir / INDEX).read_text())
            names = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{model_dir / INDEX}: not a valid safetensors index ({e})") from None
        files = [model_dir / n for n in names]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"shard listed in {INDEX} is missing: {f}")
        return files
    if (model_dir / SINGLE).is_file():
        return [model_dir / SINGLE]
    if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")):
        raise CheckpointError(
            f"{model_dir} has only pickle weights (*.bin/*.pt); convert them to safetensors (pickle is not loaded)"
        )
    raise CheckpointError(f"no {SINGLE} or {INDEX} in {model_dir}")


def weights_fingerprint(model_dir: str | Path) -> str | None:
    """Cheap fingerprint of the weight files (size + first/last MiB each); None when there are none."""
    model_dir = Path(model_dir)
    try:
        files = checkpoint_files(model_dir)
    except CheckpointError:
        return None
    h = hashlib.sha256()
    for f in files:
        try:
            h.update(f"{f.name}\0{quick_digest(f)}\0".encode())
        except OSError as e:
            raise CheckpointError(f"cannot read {f}: {e.strerror or e}") from None
    return h.hexdigest()


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def read_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in checkpoint_files(model_dir):
        try:
            part = load_file(str(f))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{f}: corrupt or unreadable safetensors file ({str(e).splitlines()[0]})") from None
        bad = [(k, v.dtype) for k, v in part.items() if v.dtype not in FLOAT_DTYPES]
        if bad:  # an int8 tensor would be cast to float silently: a quantised or broken checkpoint
            raise CheckpointError(f"{f}: tensor {bad[0][0]} is {str(bad[0][1]).removeprefix('torch.')}; weights must "
                                  f"be floating point (float32, float16, bfloat16)"
                                  + (f" ({len(bad) - 1} more)" if len(bad) > 1 else ""))
        state.update(part)
    return state


def check_keys(expected: dict[str, torch.Size], state: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint is missing key {missing[0]}{more}")
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"checkpoint has unexpected key {unexpected[0]}{more}")
    for k, shape in expected.items():
        if tuple(state[k].shape) != tuple(shape):
            raise CheckpointError(
                f"checkpoint key {k} has shape {tuple(state[k].shape)}, config expects {tuple(shape)}")


def expected_shapes(cfg: JanusFlowConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = JanusFlow(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> JanusFlow:
    """Build JanusFlow from an official-layout directory; every key must be present with its shape."""
    model_dir = Path(model_dir)
    cfg = load_config(model_dir)
    state = read_state_dict(model_dir)
    with torch.device("meta"):
        model = JanusFlow(cfg)
    check_keys({k: v.shape for k, v in model.state_dict().items()}, state)
    state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers (RoPE inv_freq, pixel normalisation) are not in the file: rebuild on CPU.
    model.language_model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg.llm)
    tower = model.vision_und_enc_model
    if tower._mean is not None:
        tower._mean = torch.tensor(cfg.siglip.pixel_mean).view(1, -1, 1, 1)
        tower._std = torch.tensor(cfg.siglip.pixel_std).view(1, -1, 1, 1)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not leftover, f"tensors left on meta after loading: {leftover[:3]}"
    return model.eval()
