"""Kill a command at every filesystem boundary of its output transaction (tests/test_crash_consistency.py).

    python tests/fault_driver.py SPEC.json  ->  one JSON line per kill point on stdout

SPEC: argv (a janusflow command), root (the directory holding its outputs), pristine (a copy of root's
contents restored before each run), recover ("dir": OUT, or "files": [dirs]), env (extra variables).
The imports are paid once: each run is a fork of this process (which runs no torch op itself, so no
thread pool is forked), killed by files.boundary at boundary N (JANUSFLOW_FAULT_AT). After each kill
the driver snapshots root, runs the recovery that the next run's output check runs, and snapshots
again; it stops at the first N the command survives.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from janusflow_trt import cli, export_job, files  # noqa: F401  (export_job: the export's imports, once)


def snapshot(root: Path) -> dict[str, str]:
    snap = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_dir():
            snap[rel] = "dir"
        elif p.name == "manifest.json":
            m = json.loads(p.read_text())  # what it lists, and its own hash (old and new list the same)
            snap[rel] = json.dumps({"listed": {g["file"]: g["sha256"] for g in m["graphs"].values()},
                                    "sha256": hashlib.sha256(p.read_bytes()).hexdigest()})
        else:
            snap[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return snap


def restore(root: Path, pristine: Path) -> None:
    for p in root.iterdir():
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    shutil.copytree(pristine, root, dirs_exist_ok=True, symlinks=True)


def run(argv: list[str], env: dict[str, str]) -> int:
    """-> the wait status of the command run in a forked child."""
    pid = os.fork()
    if pid == 0:
        os.environ.update(env)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        try:
            code = cli.main(argv)
        except BaseException:
            code = 99
        os._exit(code)
    return os.waitpid(pid, 0)[1]


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    root, pristine = Path(spec["root"]), Path(spec["pristine"])
    for n in range(1, 100):
        restore(root, pristine)
        status = run(spec["argv"], {**spec.get("env", {}), "JANUSFLOW_FAULT_AT": str(n)})
        killed = os.WIFSIGNALED(status)
        after_kill = snapshot(root)
        if "dir" in spec["recover"]:
            files.recover_dir(Path(spec["recover"]["dir"]))
        else:
            files.recover_files([Path(d) for d in spec["recover"]["files"]])
        print(json.dumps({"n": n, "killed": killed, "rc": os.waitstatus_to_exitcode(status),
                          "after_kill": after_kill, "after_recovery": snapshot(root)}), flush=True)
        if not killed:
            break


if __name__ == "__main__":
    main(sys.argv[1])
