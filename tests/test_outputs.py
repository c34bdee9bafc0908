"""What good input gets written: the format its suffix names, all outputs together or none, the
user's umask, --force replacing only what it names; and images read at their real bit depth."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from contract import run_cli
from PIL import Image

from janusflow_trt.errors import InputError
from janusflow_trt.files import write_all
from janusflow_trt.images import load_image
from janusflow_trt.janusflow_ref.sampling import SamplingParams, next_token


def test_16bit_grayscale_png_keeps_its_levels(tmp_path):
    v16 = np.linspace(0, 65535, 64 * 64).astype(np.uint16).reshape(64, 64)
    Image.fromarray(v16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16")
    got = np.asarray(load_image(tmp_path / "g16.png"))
    want = np.floor(v16.astype(np.float64) / 65535 * 255 + 0.5).astype(np.uint8)  # nearest 8-bit level
    assert got.shape == (64, 64, 3) and (got == want[..., None]).all()
    assert (got == 255).mean() < 0.01  # PIL's convert("RGB") clips: 99.6% white


def test_write_all_leaves_nothing_when_one_output_fails(tmp_path):
    def boom(tmp):
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_all([(tmp_path / "a.png", lambda t: open(t, "wb").write(b"a")), (tmp_path / "b.npy", boom)])
    assert list(tmp_path.iterdir()) == []


def test_generate_writes_every_output_at_the_end_with_umask(tiny_dir, tmp_path, capfd):
    old = os.umask(0o027)
    try:
        out = tmp_path / "fox.jpg"
        argv = ["generate", "--model", tiny_dir, "--prompt", "a fox", "--steps", "2", "--num-images", "2",
                "--out", out, "--save-latents", tmp_path / "z.npy", "--json"]
        rc, err = run_cli(argv, capfd)
        assert rc == 0, err
        names = sorted(p.name for p in tmp_path.iterdir())
        assert names == ["fox_0.jpg", "fox_1.jpg", "z.npy"]
        for n in names:
            assert (tmp_path / n).stat().st_mode & 0o777 == 0o640
        assert Image.open(tmp_path / "fox_0.jpg").format == "JPEG"
        z = np.load(tmp_path / "z.npy")
        assert z.shape == (2, 4, 48, 48) and z.dtype == np.float32
        first = (tmp_path / "fox_1.jpg").read_bytes()
        assert run_cli(argv, capfd)[0] == 2  # exists: not without --force
        assert (tmp_path / "fox_1.jpg").read_bytes() == first
        rc, err = run_cli(argv + ["--force", "--seed", "1"], capfd)
        assert rc == 0, err
        assert (tmp_path / "fox_1.jpg").read_bytes() != first
        assert sorted(p.name for p in tmp_path.iterdir()) == names  # no temp files left
    finally:
        os.umask(old)


@pytest.mark.parametrize("t", [1e-40, 1e-4, -0.5, 101.0])
def test_temperature_outside_floor_and_ceiling_refused(t):
    with pytest.raises(InputError, match="--temperature"):
        SamplingParams(temperature=t)


def test_sampling_refuses_overflowing_probabilities():
    logits = torch.full((1, 8), 1e36)
    logits[0, 0] = -1e36
    with pytest.raises(InputError, match="overflows"):
        next_token(logits, SamplingParams(temperature=1e-3, top_k=0))


def test_nonfinite_logits_name_the_token():
    logits = torch.zeros((1, 8))
    logits[0, 3] = float("nan")
    with pytest.raises(InputError, match="answer token 4"):
        next_token(logits, SamplingParams(), position=3)
