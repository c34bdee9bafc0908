"""Crash consistency: a command killed (SIGKILL) at every filesystem boundary of its output transaction
leaves the complete old output or the complete new one, and the next run's recovery leaves exactly one
of them and no temporary (tests/fault_driver.py does the killing; janusflow_trt/files.py the promise)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from contract import run_cli
from fault_driver import snapshot

from janusflow_trt.files import recover_dir

HERE = Path(__file__).resolve().parent


def drive(tmp_path: Path, spec: dict) -> list[dict]:
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    r = subprocess.run([sys.executable, str(HERE / "fault_driver.py"), str(tmp_path / "spec.json")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = [json.loads(line) for line in r.stdout.splitlines()]
    assert runs and not runs[-1]["killed"] and runs[-1]["rc"] == 0, runs[-1:]
    assert all(x["killed"] for x in runs[:-1]) and len(runs) >= 4, [(x["n"], x["rc"]) for x in runs]
    return runs


def sub(snap: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in snap.items() if k.startswith(prefix)}


def complete_export(files: dict) -> bool:
    """OUT's entries hold a manifest whose every file is there with its sha256, and nothing else."""
    if "manifest.json" not in files:
        return False
    listed = json.loads(files["manifest.json"])["listed"]
    return {k: v for k, v in files.items() if k != "manifest.json"} == listed


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_export_killed_at_every_boundary(tiny_dir, tmp_path, capfd, exchange):
    root, pristine = tmp_path / "w", tmp_path / "pristine"
    root.mkdir()
    rc, err = run_cli(["export", "--model", tiny_dir, "--out", pristine / "onnx", "--graphs", "embed", "--quiet"],
                      capfd)
    assert rc == 0, err
    old = sub(snapshot(pristine), "onnx/")
    assert complete_export(old)
    runs = drive(tmp_path, {"argv": ["export", "--model", str(tiny_dir), "--out", str(root / "onnx"), "--graphs",
                                     "embed", "--quiet", "--force"],
                            "root": str(root), "pristine": str(pristine), "recover": {"dir": str(root / "onnx")},
                            "env": {} if exchange else {"JANUSFLOW_NO_EXCHANGE": "1"}})
    outcomes = set()
    for x in runs:
        kill, rec = x["after_kill"], x["after_recovery"]
        out = sub(kill, "onnx/")
        if exchange or "onnx" in kill:  # the promise at the moment of the kill
            assert "onnx" in kill and (out == old or complete_export(out)), (x["n"], kill)
        else:  # two renames, killed between them: the complete copy waits beside OUT for the recovery
            aside = [k for k in kill if k.startswith((".onnx.new-", ".onnx.old-")) and "/" not in k]
            assert any(complete_export(sub(kill, a + "/")) for a in aside), (x["n"], kill)
        assert set(rec) == {"onnx", "onnx/embed.onnx", "onnx/manifest.json"}, (x["n"], rec)  # no temporaries
        got = sub(rec, "onnx/")
        assert got == old or complete_export(got), (x["n"], rec)
        outcomes.add("old" if got == old else "new")
    assert outcomes == {"old", "new"}  # kills before and after the commit point were both seen


@pytest.mark.parametrize("latents_dir", [pytest.param("same", marks=pytest.mark.slow), "other"])  # other: one
# journal per directory; same: the common case, the same code with one (~50 s each on 2 cores)
def test_two_image_generate_killed_at_every_boundary(tiny_dir, tmp_path, latents_dir):
    root, pristine = tmp_path / "w", tmp_path / "pristine"
    lat = "z.npy" if latents_dir == "same" else "lat/z.npy"
    names = ["fox_0.png", "fox_1.png", lat]
    for d in (root, pristine):
        (d / "lat").mkdir(parents=True)
    for n in names:
        (pristine / n).write_bytes(f"old {n}".encode())
    old = {n: v for n, v in snapshot(pristine).items() if n in names}
    runs = drive(tmp_path, {"argv": ["generate", "--model", str(tiny_dir), "--prompt", "a fox", "--steps", "2",
                                     "--num-images", "2", "--seed", "3", "--out", str(root / "fox.png"),
                                     "--save-latents", str(root / lat), "--force", "--json"],
                            "root": str(root), "pristine": str(pristine),
                            "recover": {"files": [str(root), str(root / "lat")]}})
    new = {n: v for n, v in runs[-1]["after_kill"].items() if n in names}
    assert all(new[n] != old[n] for n in names)
    outcomes = set()
    for x in runs:
        kill, rec = x["after_kill"], x["after_recovery"]
        for n in names:  # at the kill: every file whole, old or new (the set is finished by the recovery)
            assert kill[n] in (old[n], new[n]), (x["n"], n)
        assert set(rec) == {*names, "lat"}, (x["n"], rec)  # no temporaries, no journal
        got = {n: rec[n] for n in names}
        assert got in (old, new), (x["n"], got)  # the set as one unit
        outcomes.add("old" if got == old else "new")
    assert outcomes == {"old", "new"}


def test_recovery_never_deletes_the_only_copy(tmp_path):
    """The case of issue 22: OUT renamed aside, the writer killed before the new one came in."""
    out = tmp_path / "onnx"
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    from janusflow_trt.files import HOST
    start = 1  # a pid that is gone; any start time
    old = tmp_path / f".onnx.old-{HOST}-{p.pid}-{start}-ab12"
    tmp = tmp_path / f".onnx.tmp-{HOST}-{p.pid}-{start}-ab12"
    legacy = tmp_path / f".onnx.old-{p.pid}-{HOST}"
    for d in (old, tmp):
        d.mkdir()
        (d / "manifest.json").write_text(d.name)
    recover_dir(out)
    assert (out / "manifest.json").read_text() == old.name and not tmp.exists() and not old.exists()
    shutil.rmtree(out)
    legacy.mkdir()  # the names written before this change: restored the same way
    (legacy / "manifest.json").write_text("legacy")
    recover_dir(out)
    assert (out / "manifest.json").read_text() == "legacy" and not legacy.exists()


def test_temporaries_of_live_or_reused_pids_are_kept(tmp_path):
    from janusflow_trt.files import HOST, writer_id
    out = tmp_path / "onnx"
    out.mkdir()
    mine = tmp_path / f".onnx.tmp-{writer_id()}-ab12"
    reused = tmp_path / f".onnx.tmp-{HOST}-{os.getpid()}-1-ab12"  # this pid, another start time: dead
    other_host = tmp_path / f".onnx.tmp-otherhost-{os.getpid()}-1-ab12"
    for d in (mine, reused, other_host):
        d.mkdir()
    recover_dir(out)
    assert mine.exists() and not reused.exists() and other_host.exists()
