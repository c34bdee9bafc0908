"""A full disk while writing: one line naming the path and the cause, exit 2, the old output intact and
nothing half-written, for each writing command. A small tmpfs is mounted (root only; skipped with the
reason where the mount fails)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from contract import run_cli, snapshot


@pytest.fixture()
def small_disk(tmp_path):
    """A 96 KiB tmpfs: room for the old outputs below, not for the new ones."""
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def no_mtime(snap: dict[str, tuple]) -> dict[str, tuple]:
    """Directories without their mtime: temporaries came and went in those written into (the mount point,
    an --out directory); files keep every field."""
    return {k: v[:1] + v[2:] if v[0] == "dir" else v for k, v in snap.items()}


def refused_full(argv: list, capfd, disk: Path, needle: str) -> None:
    before = snapshot(disk)
    rc, err = run_cli(argv, capfd)
    assert rc == 2, (rc, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "No space left on device" in err and needle in err, err
    after = snapshot(disk)
    assert no_mtime(after) == no_mtime(before), (before, after)
    print(err)


def no_work_dir_left(prefix: str) -> None:
    """The command's work dir under the system temp dir (janusflow_trt/files.owned_tempdir) is gone; the
    command ran in this process, so its name carries this pid."""
    left = list(Path(tempfile.gettempdir()).glob(f"{prefix}-*-{os.getpid()}-*"))
    assert not left, left


def test_export_on_a_full_disk(tiny_dir, small_disk, capfd, tmp_path):
    out = small_disk / "onnx"  # one graph of 131 KB does not fit: nothing may be left
    refused_full(["export", "--model", tiny_dir, "--out", out, "--graphs", "embed", "--quiet"], capfd, small_disk,
                 str(out))


def test_make_tiny_on_a_full_disk(small_disk, capfd):
    refused_full(["make-tiny", small_disk / "ck"], capfd, small_disk, str(small_disk / "ck"))


def test_generate_on_a_full_disk(tiny_dir, small_disk, capfd):
    (small_disk / "fox_0.png").write_bytes(b"old 0" * 1000)
    (small_disk / "fox_1.png").write_bytes(b"old 1" * 1000)
    refused_full(["generate", "--model", tiny_dir, "--prompt", "a fox", "--steps", "1", "--num-images", "2",
                  "--out", small_disk / "fox.png", "--force"], capfd, small_disk, "fox")


def old_outputs(d: Path, names: tuple[str, ...], big: str) -> None:
    """Old outputs that fill most of the 96 KiB: the new ones (written beside them before the swap) cannot fit."""
    d.mkdir()
    for name in names:
        (d / name).write_bytes(b"old " * (20000 if name == big else 10))


def test_quality_on_a_full_disk(tiny_dir, fp16_onnx, small_disk, capfd):
    out = small_disk / "q"  # quality.png alone is MBs at the tiny size; the old files leave little room anyway
    old_outputs(out, ("quality.json", "quality.md", "quality.png"), "quality.png")
    refused_full(["quality", "--model", tiny_dir, "--artifacts", fp16_onnx, "--precision", "fp16", "--tokens", "4",
                  "--steps", "2", "--out", out, "--force", "--quiet"], capfd, small_disk, str(out))
    no_work_dir_left("janusflow-quality")


def test_bench_on_a_full_disk(small_disk, capfd):
    out = small_disk / "b"  # the new bench.* (~30 KB at this size) do not fit beside the old 80 KB
    old_outputs(out, ("bench.json", "bench.md", "bench.png"), "bench.png")
    refused_full(["bench", "--size", "tiny", "--quick", "--contexts", "64", "--steps", "1", "--backends",
                  "torch-fast", "--out", out, "--force"], capfd, small_disk, str(out))
    no_work_dir_left("janusflow-bench")
