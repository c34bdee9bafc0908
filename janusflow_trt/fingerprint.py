"""Cheap file fingerprints for checks at every start: size + sha256 of the first and last MiB.

A full sha256 of a 4 GB checkpoint or a 6 GB graph costs seconds to minutes per start; this reads
2 MiB per file. It catches truncation, another checkpoint (other seed: other leading tensor bytes) and
most edits; full hashes are recorded at export and checked by `janusflow verify`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .errors import CheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

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


def checkpoint_files(model_dir: Path) -> list[Path]:
    if (model_dir / INDEX).is_file():
        try:
            index = json.loads((model_dir / INDEX).read_text())
            names = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{model_dir / INDEX}: not a valid safetensors index ({e})") from None
        files = [model_dir / n for n in names]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"shard listed in {INDEX} is missing: {f}")
        return files
    if (model_dir / SINGLE).is_file():
        return [model_dir / SINGLE]
    if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")):
        raise CheckpointError(
            f"{model_dir} has only pickle weights (*.bin/*.pt); convert them to safetensors (pickle is not loaded)"
        )
    raise CheckpointError(f"no {SINGLE} or {INDEX} in {model_dir}")


def weights_fingerprint(model_dir: str | Path) -> str | None:
    """Cheap fingerprint of the weight files (size + first/last MiB each); None when there are none."""
    model_dir = Path(model_dir)
    try:
        files = checkpoint_files(model_dir)
    except CheckpointError:
        return None
    h = hashlib.sha256()
    for f in files:
        try:
            h.update(f"{f.name}\0{quick_digest(f)}\0".encode())
        except OSError as e:
            raise CheckpointError(f"cannot read {f}: {e.strerror or e}") from None
    return h.hexdigest()
