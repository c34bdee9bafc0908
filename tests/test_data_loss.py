"""Never lose data: export and make-tiny replace only a directory of ours, and only with --force."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from contract import assert_refused, run_cli, snapshot

from janusflow_trt.files import HOST, recover_dir


@pytest.fixture()
def model(tiny_dir, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(tiny_dir, d)
    return d


def export(model, out, *extra):
    return ["export", "--model", model, "--out", out, "--graphs", "embed", "--quiet", *extra]


def test_export_out_is_the_model(model, tmp_path, capfd):
    assert_refused(export(model, model), capfd, [tmp_path], "model directory")
    assert_refused(export(model, model, "--force"), capfd, [tmp_path], "model directory")


@pytest.mark.parametrize("where", ["inside", "containing", "vae", "inside-vae", "symlink"])
def test_export_out_overlapping_inputs(model, tmp_path, capfd, where):
    out = {"inside": model / "onnx", "containing": tmp_path, "vae": model / "vae",
           "inside-vae": model / "vae" / "x", "symlink": tmp_path / "link"}[where]
    if where == "symlink":
        (tmp_path / "link").symlink_to(model)
    assert_refused(export(model, out, "--force"), capfd, [tmp_path], "directory")


def test_export_out_is_cwd(model, tmp_path, capfd, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    assert_refused(export(model, ".", "--force"), capfd, [tmp_path], "current directory")
    assert_refused(export(model, tmp_path, "--force"), capfd, [tmp_path], "")


@pytest.mark.parametrize("force", [False, True])
def test_export_out_with_unrelated_files(model, tmp_path, capfd, force):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert_refused(export(model, out, *(["--force"] if force else [])), capfd, [tmp_path], "not empty")


def test_export_replaces_only_an_earlier_export_with_force(model, tmp_path, capfd):
    out = tmp_path / "onnx"
    # a fresh process: the exporter's warnings come once per process, and torch logs to the real stderr
    r = subprocess.run([sys.executable, "-m", "janusflow_trt.cli", *map(str, export(model, out))], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr  # no library noise
    first = (out / "manifest.json").read_text()
    assert_refused(export(model, out), capfd, [tmp_path], "--force")
    (out / "notes.txt").write_text("added by the user")  # no longer clearly ours
    assert_refused(export(model, out, "--force"), capfd, [tmp_path], "not empty")
    (out / "notes.txt").unlink()
    rc, err = run_cli(export(model, out, "--force"), capfd)
    assert rc == 0, err
    assert json.loads((out / "manifest.json").read_text())["graphs"]["embed"]["sha256"] == \
        json.loads(first)["graphs"]["embed"]["sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "onnx"]  # no temp or old dirs left


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_dirs_of_dead_writers_are_removed(tmp_path):
    out = tmp_path / "onnx"
    out.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import psutil
        start = round(psutil.Process(live.pid).create_time() * 100)
        dead = tmp_path / f".onnx.tmp-{HOST}-{_dead_pid()}-1-abc"
        alive = tmp_path / f".onnx.tmp-{HOST}-{live.pid}-{start}-abc"
        other_host = tmp_path / f".onnx.tmp-otherhost-{_dead_pid()}-1-abc"
        other_name = tmp_path / f".onnx2.tmp-{HOST}-{_dead_pid()}-1-abc"
        for d in (dead, alive, other_host, other_name):
            d.mkdir()
            (d / "llm.onnx").write_bytes(b"x")
        removed = recover_dir(out)
        assert removed == [dead]
        assert not dead.exists() and alive.exists() and other_host.exists() and other_name.exists()
    finally:
        live.kill()
        live.wait()


def test_make_tiny_force_on_cwd(tmp_path, capfd, monkeypatch):
    (tmp_path / "keep.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    assert_refused(["make-tiny", ".", "--force"], capfd, [tmp_path], "current directory")


def test_make_tiny_force_on_unrelated_dir(tmp_path, capfd):
    d = tmp_path / "d"
    d.mkdir()
    (d / "keep.txt").write_text("x")
    assert_refused(["make-tiny", d, "--force"], capfd, [tmp_path], "not a checkpoint written by make-tiny")
    assert_refused(["make-tiny", d], capfd, [tmp_path], "not empty")


def test_make_tiny_force_replaces_its_own_and_keeps_umask(tmp_path, capfd):
    old = os.umask(0o027)
    try:
        d = tmp_path / "d"
        assert run_cli(["make-tiny", d], capfd)[0] == 0
        before = snapshot(d)
        assert_refused(["make-tiny", d], capfd, [tmp_path], "--force")
        assert snapshot(d) == before
        assert run_cli(["make-tiny", d, "--force", "--seed", "1"], capfd)[0] == 0
        assert hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest() != \
            before[str(d / "model.safetensors")][4]  # another seed: really replaced
        for p in [d, *d.rglob("*")]:
            want = 0o750 if p.is_dir() else 0o640
            assert p.stat().st_mode & 0o777 == want, (p, oct(p.stat().st_mode))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    finally:
        os.umask(old)
