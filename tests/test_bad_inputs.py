"""Bad input: one clear line on stderr, exit code 2, no traceback, nothing half-written."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from janusflow_trt.cli import main


def run(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse errors
        rc = e.code
    err = capsys.readouterr().err.strip()
    return rc, err


def broken_copy(tiny_dir, tmp_path, how):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, d)
    if how == "no-config":
        (d / "config.json").unlink()
    elif how == "bad-json":
        (d / "config.json").write_text("{not json")
    elif how == "wrong-type":
        raw = json.loads((d / "config.json").read_text())
        raw["model_type"] = "llava"
        (d / "config.json").write_text(json.dumps(raw))
    elif how == "corrupt-weights":
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) // 3])
    elif how == "no-weights":
        (d / "model.safetensors").unlink()
    elif how == "no-tokenizer":
        (d / "tokenizer.json").unlink()
    return d


@pytest.mark.parametrize("how,needle", [
    ("no-config", "no config.json"), ("bad-json", "not valid JSON"), ("wrong-type", "multi_modality"),
    ("corrupt-weights", "corrupt"), ("no-weights", "no model.safetensors"), ("no-tokenizer", "tokenizer.json"),
])
def test_bad_checkpoint(tiny_dir, tmp_path, test_image, capsys, how, needle):
    d = broken_copy(tiny_dir, tmp_path, how)
    rc, err = run(["chat", "--model", str(d), "--image", str(test_image), "--question", "q"], capsys)
    assert rc == 2 and needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def chat_args(tiny_dir, test_image, *extra):
    return ["chat", "--model", str(tiny_dir), "--image", str(test_image), "--question", "q", *extra]


def test_bad_chat_inputs(tiny_dir, test_image, tmp_path, capsys):
    not_image = tmp_path / "x.png"
    not_image.write_text("hello")
    cases = [
        (["chat", "--model", str(tmp_path / "nope"), "--image", str(test_image), "--question", "q"], "not found"),
        (chat_args(tiny_dir, tmp_path / "missing.png"), "image not found"),
        (["chat", "--model", str(tiny_dir), "--image", str(not_image), "--question", "q"], "cannot read image"),
        (chat_args(tiny_dir, test_image, "--temperature", "-1"), "temperature"),
        (chat_args(tiny_dir, test_image, "--top-p", "1.5"), "top-p"),
        (chat_args(tiny_dir, test_image, "--max-new-tokens", "0"), "max-new-tokens"),
        (chat_args(tiny_dir, test_image, "--max-new-tokens", "4000"), "exceeds the model's context"),
        (chat_args(tiny_dir, test_image, "--seed", "-3"), "seed"),
        (chat_args(tiny_dir, test_image, "--backend", "ort"), "--artifacts"),
        (["chat", "--model", str(tiny_dir), "--image", str(test_image), "--question", "  "], "empty"),
    ]
    for argv, needle in cases:
        rc, err = run(argv, capsys)
        assert rc == 2, (argv, err)
        assert needle in err and len(err.splitlines()) == 1, (argv, err)


def test_bad_generate_inputs(tiny_dir, tmp_path, capsys):
    np.save(tmp_path / "wrong.npy", np.zeros((1, 4, 8, 8), np.float32))
    nan = np.full((1, 4, 48, 48), np.nan, np.float32)
    np.save(tmp_path / "nan.npy", nan)
    out = tmp_path / "o.png"
    base = ["generate", "--model", str(tiny_dir), "--prompt", "a cat", "--out", str(out)]
    cases = [
        (base + ["--steps", "0"], "--steps"),
        (base + ["--cfg", "nan"], "finite"),
        (base + ["--num-images", "0"], "--num-images"),
        (base + ["--init-latents", str(tmp_path / "wrong.npy")], "shape"),
        (base + ["--init-latents", str(tmp_path / "nan.npy")], "NaN"),
        (base + ["--init-latents", str(tmp_path / "none.npy")], "cannot read"),
        (base[:-1] + [str(tmp_path / "no" / "o.png")], "does not exist"),
        (base + ["--vae", str(tmp_path)], "no config.json"),
        (base + ["--prompt", "fox " * 4000], "context"),
    ]
    for argv, needle in cases:
        rc, err = run(argv, capsys)
        assert rc == 2, (argv, err)
        assert needle in err and len(err.splitlines()) == 1, (argv, err)
    assert list(tmp_path.glob("*.png")) == [] and list(tmp_path.glob(".o.png*")) == []


def test_make_tiny_refuses_nonempty_dir(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("x")
    rc, err = run(["make-tiny", str(tmp_path / "d")], capsys)
    assert rc == 2 and "not empty" in err and (tmp_path / "d" / "keep.txt").exists()
