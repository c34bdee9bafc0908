"""A full disk while writing: one line naming the path and the cause, exit 2, the old output intact and
nothing half-written, for each writing command. A small tmpfs is mounted (root only; skipped with the
reason where the mount fails)."""

from __future__ import annotations

import subprocess
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


def refused_full(argv: list, capfd, disk: Path, needle: str) -> None:
    before = snapshot(disk)
    rc, err = run_cli(argv, capfd)
    assert rc == 2, (rc, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "No space left on device" in err and needle in err, err
    after = snapshot(disk)
    after.pop(str(disk)), before.pop(str(disk))  # the mount point's own mtime: temporaries came and went
    assert after == before, (before, after)
    print(err)


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
