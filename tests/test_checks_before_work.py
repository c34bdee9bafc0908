"""Checked before the work: paths that must exist, calibration flags that would be ignored, quality's
ranges (the bad-input contract of tests/contract.py)."""

from __future__ import annotations

import pytest
from contract import assert_refused


@pytest.mark.parametrize("extra,needle", [
    (["--calib-prompts", "/nonexistent", "--precision", "fp16"], "--calib-prompts"),
    (["--calib-images", "/nonexistent", "--precision", "fp16"], "--calib-images"),
    (["--vae", "/nonexistent"], "--vae"),
    (["--calib-prompts", __file__], "--precision"),  # fp32 only: the prompts would be ignored
])
def test_export_paths(tiny_dir, tmp_path, capfd, extra, needle):
    assert_refused(["export", "--model", tiny_dir, "--out", tmp_path / "o", "--graphs", "embed", "--quiet", *extra],
                   capfd, [tmp_path, tiny_dir], needle)


@pytest.mark.parametrize("flag,value", [("--steps", "100000000"), ("--steps", "0"), ("--tokens", "0"),
                                        ("--tokens", "10000000")])
def test_quality_ranges(tiny_dir, tmp_path, capfd, flag, value):
    assert_refused(["quality", "--model", tiny_dir, "--artifacts", tmp_path, "--out", tmp_path / "q", flag, value],
                   capfd, [tmp_path], flag)
