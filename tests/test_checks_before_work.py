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


# -- calibration prompts: every line checked against the context before the FP32 export -------------------
@pytest.mark.parametrize("line,needle", [
    ("a red fox " * 2000, "line 3: prompt is"),  # beyond the context with its image tokens
    ("a red fox <begin_of_image> in snow", "line 3: the prompt contains the special token"),
])
def test_calib_prompt_refused_before_export(tiny_dir, tmp_path, capfd, monkeypatch, line, needle):
    import janusflow_trt.export_job as job

    def no_export(*a, **k):
        raise AssertionError("the FP32 export started before the prompts were checked")

    monkeypatch.setattr(job, "export_fp32", no_export)
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"a lighthouse at dusk\n\n{line}\na bowl of ramen\n")
    err = assert_refused(["export", "--model", tiny_dir, "--out", tmp_path / "o", "--graphs", "embed", "--quiet",
                          "--precision", "fp32,fp16", "--calib-prompts", prompts], capfd, [tmp_path, tiny_dir],
                         f"--calib-prompts {prompts} {needle}")
    assert "AssertionError" not in err


def test_calib_prompts_not_utf8_names_line(tiny_dir, tmp_path, capfd):
    prompts = tmp_path / "p.txt"
    prompts.write_bytes(b"a red fox\n\na caf\xe9\n")
    assert_refused(["export", "--model", tiny_dir, "--out", tmp_path / "o", "--graphs", "embed", "--quiet",
                    "--precision", "fp16", "--calib-prompts", prompts], capfd, [tmp_path, tiny_dir],
                   f"{prompts} line 3: not UTF-8")


# -- gpu-check: existing reports need --force; the pytest run writes nothing into the checkout ---------------
def _no_cuda_check(monkeypatch):
    import janusflow_trt.export.trt_build as trt_build

    monkeypatch.setattr(trt_build, "require_cuda", lambda what: None)


def test_gpu_check_refuses_existing_reports(tmp_path, capfd, monkeypatch):
    import janusflow_trt.runtime.gpu_check as gpu_check

    _no_cuda_check(monkeypatch)

    def no_run(*a, **k):
        raise AssertionError("the GPU tests ran before --out was checked")

    monkeypatch.setattr(gpu_check.subprocess, "run", no_run)
    out = tmp_path / "r"
    out.mkdir()
    (out / "gpu.md").write_text("my notes")
    assert_refused(["gpu-check", "--out", out], capfd, [tmp_path], "--force")


GPU_TESTS = '''import pytest

@pytest.mark.gpu
def test_fine():
    assert True

@pytest.mark.gpu
def test_needs_more():
    pytest.skip("no such GPU here")
'''


def test_gpu_check_force_replaces_reports_and_writes_nothing_into_the_checkout(tmp_path, capfd, monkeypatch):
    import json

    from contract import run_cli, snapshot

    import janusflow_trt.runtime.gpu_check as gpu_check

    _no_cuda_check(monkeypatch)
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)  # gpu-check must set it, not rely on ours
    checkout = tmp_path / "src"
    (checkout / "tests").mkdir(parents=True)
    (checkout / "tests" / "test_gpu.py").write_text(GPU_TESTS)
    monkeypatch.setattr(gpu_check, "TESTS", checkout / "tests" / "test_gpu.py")
    out = tmp_path / "r"
    out.mkdir()
    (out / "gpu.json").write_text("[]")
    (out / "notes.txt").write_text("keep me")
    before = snapshot(checkout)
    rc, err = run_cli(["gpu-check", "--out", out, "--force"], capfd)
    assert rc == 0, err
    assert snapshot(checkout) == before  # no .pytest_cache, no __pycache__
    assert sorted(p.name for p in out.iterdir()) == ["gpu.json", "gpu.md", "gpu.xml", "notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"
    rows = json.loads((out / "gpu.json").read_text())
    assert [(r["test"], r["outcome"]) for r in rows] == [("test_fine", "passed"), ("test_needs_more", "skipped")]


# -- build: OUT and --timing-cache checked before TensorRT ------------------------------------------------
def _no_tensorrt(monkeypatch):
    import janusflow_trt.export.trt_build as trt_build

    def reached(what):
        raise AssertionError("reached TensorRT before the checks")

    monkeypatch.setattr(trt_build, "require_tensorrt", reached)


def _engines(tmp_path):
    d = tmp_path / "engines"
    d.mkdir()
    (d / "engines.json").write_text("{}")
    (d / "llm.plan").write_bytes(b"an engine")
    return d


@pytest.mark.parametrize("case,needle", [("engines", "--force"), ("foreign", "is not an engines directory"),
                                         ("foreign-force", "is not an engines directory"),
                                         ("artifacts", "artifacts directory")])
def test_build_out_checked(tmp_path, capfd, monkeypatch, case, needle):
    _no_tensorrt(monkeypatch)
    art = tmp_path / "onnx"
    art.mkdir()
    out = _engines(tmp_path) if case == "engines" else tmp_path / "mine"
    if case.startswith("foreign"):
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
    if case == "artifacts":
        out = art / "engines"
    argv = ["build", "--artifacts", art, "--precision", "fp16", "--out", out, *(["--force"] if "force" in case else [])]
    assert_refused(argv, capfd, [tmp_path], needle)


@pytest.mark.parametrize("case", ["foreign", "modified", "bad-sidecar", "directory"])
def test_build_timing_cache_not_ours_refused(tmp_path, capfd, monkeypatch, case):
    from janusflow_trt.export.trt_build import save_timing_cache

    _no_tensorrt(monkeypatch)
    cache = tmp_path / "timing.cache"
    if case == "directory":
        cache.mkdir()
    else:
        save_timing_cache(cache, b"learnt tactics")
        if case == "foreign":
            (tmp_path / "timing.cache.janusflow").unlink()
        elif case == "modified":
            cache.write_bytes(b"someone else's file")
        else:
            (tmp_path / "timing.cache.janusflow").write_text("not json")
    (tmp_path / "onnx").mkdir()
    assert_refused(["build", "--artifacts", tmp_path / "onnx", "--precision", "fp16", "--out", tmp_path / "engines",
                    "--timing-cache", cache], capfd, [tmp_path], "--timing-cache")


def test_timing_cache_round_trip(tmp_path):
    from janusflow_trt.export.trt_build import read_timing_cache, save_timing_cache

    cache = tmp_path / "timing.cache"
    assert read_timing_cache(cache) == b"" and read_timing_cache(None) == b""
    save_timing_cache(cache, b"learnt tactics")
    assert read_timing_cache(cache) == b"learnt tactics"
    save_timing_cache(cache, b"more tactics")  # replaced as a unit: no temporary or journal left
    assert read_timing_cache(cache) == b"more tactics"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["timing.cache", "timing.cache.janusflow"]


def test_build_force_reaches_tensorrt_over_our_engines(tmp_path, capfd, monkeypatch):
    """The positive side: --force over an engines directory, and a cache we wrote, pass the checks."""
    from contract import run_cli

    from janusflow_trt.export.trt_build import save_timing_cache

    _no_tensorrt(monkeypatch)
    out = _engines(tmp_path)
    save_timing_cache(tmp_path / "t.cache", b"x")
    (tmp_path / "onnx").mkdir()
    with pytest.raises(AssertionError, match="reached TensorRT"):
        run_cli(["build", "--artifacts", tmp_path / "onnx", "--precision", "fp16", "--out", out, "--force",
                 "--timing-cache", tmp_path / "t.cache"], capfd)
