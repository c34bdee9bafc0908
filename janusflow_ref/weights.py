"""Strict safetensors loading with the official key names (single file or sharded with an index)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from janusflow_trt.errors import CheckpointError
from janusflow_trt.fingerprint import INDEX, SINGLE, checkpoint_files, weights_fingerprint  # noqa: F401  (re-exported)

from .config import JanusFlowConfig, load_config
from .model import JanusFlow
from .vae import FLOAT_DTYPES as SAFETENSORS_FLOATS

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def read_state_dict(model_dir: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's files (cast to `dtype` if given). Read one tensor at a time, each
    file mapped only while one tensor is copied out of it: a whole file read at once (safetensors'
    load_file) stays mapped while its tensors are converted, so a BF16 full-size checkpoint loaded as FP32
    held its 4.1 GB of BF16 pages beside the 8.2 GB of FP32 weights (load_model in the export's
    calibration recording: 12.1 GB max RSS)."""
    state: dict[str, torch.Tensor] = {}
    for f in checkpoint_files(model_dir):
        try:
            with safe_open(str(f), "pt") as h:
                keys = list(h.keys())
                bad = [k for k in keys if h.get_slice(k).get_dtype() not in SAFETENSORS_FLOATS]
                if bad:  # an int8 tensor would be cast to float silently: a quantised or broken checkpoint
                    dt = str(h.get_tensor(bad[0]).dtype).removeprefix("torch.")
                    raise CheckpointError(f"{f}: tensor {bad[0]} is {dt}; weights must be floating point (float32, "
                                          "float16, bfloat16)" + (f" ({len(bad) - 1} more)" if len(bad) > 1 else ""))
            for k in keys:
                with safe_open(str(f), "pt") as h:
                    t = h.get_tensor(k)
                state[k] = t if dtype is None else t.to(dtype)
                del t
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{f}: corrupt or unreadable safetensors file ({str(e).splitlines()[0]})") from None
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
    state = read_state_dict(model_dir, dtype)  # cast as read: never the stored and the cast copy whole
    with torch.device("meta"):
        model = JanusFlow(cfg)
    check_keys({k: v.shape for k, v in model.state_dict().items()}, state)
    model.load_state_dict(state, strict=True, assign=True)
    rebuild_buffers(model, cfg)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not leftover, f"tensors left on meta after loading: {leftover[:3]}"
    return model.eval()
