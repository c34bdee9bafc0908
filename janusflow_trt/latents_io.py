"""--init-latents / --save-latents: .npy files of float latents [n, 4, 48, 48], never pickle."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from .errors import InputError


def load_latents(path: str | Path, flag: str = "--init-latents") -> np.ndarray:
    """-> the array, refused unless it is a plain .npy of a real floating dtype."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{flag} {path} is a directory")
    if zipfile.is_zipfile(path) if path.is_file() else False:
        raise InputError(f"{flag} {path} is an .npz archive; give one array saved with np.save (.npy)")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            # the header only (no pickle path): the dtype is judged before any data is read
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            _, _, dtype = read(f)
    except FileNotFoundError:
        raise InputError(f"cannot read {flag} {path}: no such file") from None
    except (OSError, ValueError, EOFError):
        raise InputError(f"{flag} {path} is not a .npy array file (write one with np.save)") from None
    if dtype.hasobject or not np.issubdtype(dtype, np.floating):
        raise InputError(f"{flag} {path} has dtype {dtype}; it must be floating point (float16/32/64)")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise InputError(f"{flag} {path}: cannot read the array ({str(e).splitlines()[0]})") from None


def npy_writer(arr: np.ndarray):
    """write(tmp) for outputs.write_all; a file object, as np.save would append '.npy' to other names."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(arr, np.float32), allow_pickle=False)
    return write


def check_finite_latents(z: np.ndarray | torch.Tensor, step: int | None, steps: int) -> None:
    """Refuse latents that went NaN/Inf (broken weights, overflowing init latents), naming the step
    (None: checked after the whole loop only)."""
    ok = bool(torch.isfinite(z).all()) if isinstance(z, torch.Tensor) else bool(np.isfinite(z).all())
    if not ok:
        when = f"at Euler step {step + 1} of {steps}" if step is not None else f"during the {steps} Euler steps"
        raise InputError(f"latents became non-finite (NaN or Inf) {when}; check the weights and --init-latents")
