"""The bad-input contract, as one helper: exit code 2, exactly one line on stderr, no traceback, and
no file or directory under the watched roots changed (paths, sizes, mtimes, modes, contents)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from janusflow_trt.cli import main


def snapshot(*roots: Path) -> dict[str, tuple]:
    snap = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            snap[str(root)] = ("absent",)
            continue
        for p in [root, *sorted(root.rglob("*"))]:
            st = os.lstat(p)
            if p.is_file() and not p.is_symlink():
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                snap[str(p)] = ("file", st.st_size, st.st_mtime_ns, st.st_mode, digest)
            else:
                snap[str(p)] = ("dir" if p.is_dir() else "link", st.st_mtime_ns, st.st_mode)
    return snap


def run_cli(argv: list[str], capfd) -> tuple[int, str]:
    capfd.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors
        rc = e.code
    return rc, capfd.readouterr().err.strip()


def assert_refused(argv: list, capfd, roots: list[Path], needle: str = "") -> str:
    before = snapshot(*roots)
    rc, err = run_cli(argv, capfd)
    assert rc == 2, (argv, rc, err)
    assert len(err.splitlines()) == 1, (argv, err)
    assert "Traceback" not in err and "allow_pickle" not in err, err  # never numpy's "load it unsafely" hint
    assert needle.lower() in err.lower(), (needle, err)
    after = snapshot(*roots)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                             if before.get(k) != after.get(k)}
    return err
