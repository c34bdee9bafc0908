"""Strict safetensors loading with the official key names (single file or sharded with an index)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from janusflow_trt.errors import CheckpointError
from janusflow_trt.fingerprint import INDEX, SINGLE, checkpoint_files, weights_fingerprint  # noqa: F401  (re-exported)

from .config import JanusFlowConfig, load_config
from .model import JanusFlow

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


def rebuild_buffers(model: JanusFlow, cfg: JanusFlowConfig) -> None:
    """Non-persistent buffers (RoPE inv_freq, pixel normalisation) are not in the file: rebuilt on CPU
    (load_model, and the export's fake-parameter model, export/streamed.py)."""
    model.language_model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg.llm)
    tower = model.vision_und_enc_model
    if tower._mean is not None:
        tower._mean = torch.tensor(cfg.siglip.pixel_mean).view(1, -1, 1, 1)
        tower._std = torch.tensor(cfg.siglip.pixel_std).view(1, -1, 1, 1)


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> JanusFlow:
    """Build JanusFlow from an official-layout directory; every key must be present with its shape."""
    model_dir = Path(model_dir)
    cfg = load_config(model_dir)
    state = read_state_dict(model_dir)
    with torch.device("meta"):
        model = JanusFlow(cfg)
    check_keys({k: v.shape for k, v in model.state_dict().items()}, state)
    for k in list(state):  # one tensor at a time, each replacing its stored form (never both dicts whole:
        state[k] = state[k].to(dtype)  # a BF16 full-size checkpoint read as FP32 peaked at 2.7 + 5.4 GB)
    model.load_state_dict(state, strict=True, assign=True)
    rebuild_buffers(model, cfg)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not leftover, f"tensors left on meta after loading: {leftover[:3]}"
    return model.eval()
