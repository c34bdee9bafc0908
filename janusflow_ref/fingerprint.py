"""Cheap file fingerprints for checks at every start: size + sha256 of the first and last MiB.

A full sha256 of a 4 GB checkpoint or a 6 GB graph costs seconds to minutes per start; this reads
2 MiB per file. It catches truncation, another checkpoint (other seed: other leading tensor bytes) and
most edits; full hashes are recorded at export and checked by `janusflow verify`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

EDGE = 1 << 20


def quick_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(str(size).encode() + b"\0")
        h.update(f.read(EDGE))
        if size > EDGE:
            f.seek(max(EDGE, size - EDGE))
            h.update(f.read(EDGE))
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
