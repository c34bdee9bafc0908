"""Decoded VAE output -> uint8 images and PNG files (the official demo's conversion)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(decoded: torch.Tensor | np.ndarray) -> np.ndarray:
    """[B,3,H,W] float -> [B,H,W,3] uint8: clip to [-1,1], (x+1)/2*255, truncating astype (as official)."""
    x = torch.as_tensor(decoded).float().clip(-1.0, 1.0).permute(0, 2, 3, 1).cpu().numpy()
    return ((x + 1) / 2.0 * 255).astype(np.uint8)


def write_atomic(path: str | Path, write: Callable[[str], None]) -> Path:
    """write(tmp) to a temp file beside `path`, then rename: no half-written file is ever left."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent or ".")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_png(img: np.ndarray, path: str | Path) -> Path:
    return write_atomic(path, lambda tmp: Image.fromarray(img).save(tmp, format="PNG"))


def output_paths(out: str | Path, n: int) -> list[Path]:
    """out.png for one image; out_0.png, out_1.png, ... for several."""
    out = Path(out)
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix or '.png'}") for i in range(n)]
