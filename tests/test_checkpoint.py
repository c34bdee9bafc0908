"""Config parsing and strict loading against the official key list (derived from the official code)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from janusflow_trt.errors import CheckpointError
from janusflow_trt.janusflow_ref.config import parse_config
from janusflow_trt.janusflow_ref.weights import expected_shapes, load_model
from janusflow_trt.tiny import model_config

OFFICIAL = Path(__file__).parent / "data" / "official_janusflow_1.3b_keys.txt"


def official_keys() -> dict[str, tuple[int, ...]]:
    rows = [line.split() for line in OFFICIAL.read_text().splitlines() if line and not line.startswith("#")]
    return {k: tuple(int(d) for d in s.split("x")) for k, s in rows}


def test_full_config_has_the_official_keys_and_shapes():
    cfg = parse_config(model_config("full", 4096))
    ours = {k: tuple(v) for k, v in expected_shapes(cfg).items()}
    want = official_keys()
    assert len(want) == 587
    assert sorted(set(want) - set(ours)) == [] and sorted(set(ours) - set(want)) == []
    assert {k: v for k, v in ours.items() if want[k] != v} == {}


def test_full_config_derived_widths():
    cfg = parse_config(model_config("full", 4096))
    assert (cfg.siglip.width, cfg.hidden, cfg.gen_enc.channels) == (1024, 2048, 768)
    assert cfg.siglip.depth == 24 and cfg.siglip.num_patches == 576 and cfg.num_gen_tokens == 576


def test_official_defaults_apply():
    raw = model_config("tiny", 512)
    del raw["vision_und_enc_config"]["params"]["select_layer"]  # CLIPVisionTower default: -2
    cfg = parse_config(raw)
    assert cfg.siglip.select_layer == -2 and cfg.siglip.depth == cfg.siglip.preset_layers - 1


def test_every_tiny_tensor_is_random(tiny_dir):
    state = load_file(str(tiny_dir / "model.safetensors"))
    for name, t in state.items():
        assert not torch.all(t == 0), name
        assert not torch.all(t == 1), name
        assert t.float().std() > 0 or t.numel() == 1, name


def _copy(tiny_dir: Path, tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, d)
    return d


def test_missing_key_is_named(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    state = load_file(str(d / "model.safetensors"))
    del state["vision_gen_dec_aligner.bias"]
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing key vision_gen_dec_aligner.bias"):
        load_model(d)


def test_unexpected_and_misshapen_keys_are_named(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    state = load_file(str(d / "model.safetensors"))
    state["extra.weight"] = torch.ones(2)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected key extra.weight"):
        load_model(d)
    del state["extra.weight"]
    state["beg_of_und_embed"] = torch.randn(1, 7)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"beg_of_und_embed has shape \(1, 7\)"):
        load_model(d)


def test_sharded_checkpoint_loads_the_same(tiny_dir, tiny_model, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    state = load_file(str(d / "model.safetensors"))
    keys = sorted(state)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for fname, ks in shards.items():
        save_file({k: state[k] for k in ks}, str(d / fname))
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    m = load_model(d)
    for (k, a), (_, b) in zip(tiny_model.state_dict().items(), m.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.slow
def test_full_size_checkpoint_loads(tmp_path):
    """Writes ~4 GB: real JanusFlow-1.3B shapes. Run with -m slow."""
    from janusflow_trt.tiny import make_tiny

    d = make_tiny(tmp_path / "full", size="full")
    m = load_model(d, dtype=torch.bfloat16)
    want = official_keys()
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == want
