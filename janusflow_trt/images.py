"""Images in and out: reading user images within limits, decoded VAE output -> uint8 -> image files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import InputError
from .files import write_all, write_atomic

MAX_IMAGE_PIXELS = 64_000_000  # input limit (e.g. 8000x8000); above it PIL's bomb guard would decide
# what --out's suffix writes; anything else is refused before the run
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
                 ".tif": "TIFF", ".tiff": "TIFF"}

__all__ = ["load_image", "to_uint8", "save_image", "save_images", "output_paths", "write_atomic",
           "IMAGE_FORMATS", "MAX_IMAGE_PIXELS"]


def _to_rgb(im: Image.Image) -> Image.Image:
    """High-bit-depth grayscale scaled to 8 bits (PIL's convert('RGB') clips I;16 to 255: all white)."""
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im).astype(np.int64)
        a = (np.clip(a, 0, 65535) * 255 + 32767) // 65535  # 16-bit range -> 0..255, rounded
        im = Image.fromarray(a.astype(np.uint8), mode="L")
    elif im.mode == "F":
        raise InputError("32-bit float images are not supported; save it as 8- or 16-bit")
    return im.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """-> RGB image; refuses unreadable files and images over MAX_IMAGE_PIXELS in one line."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise InputError(f"image {path} is {w}x{h}; the limit is {MAX_IMAGE_PIXELS // 10**6} megapixels")
            im.load()
            return _to_rgb(im)
    except FileNotFoundError:
        raise InputError(f"image not found: {path}") from None
    except IsADirectoryError:
        raise InputError(f"image {path} is a directory") from None
    except Image.DecompressionBombError:
        raise InputError(f"image {path} is over the limit of {MAX_IMAGE_PIXELS // 10**6} megapixels") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise InputError(f"cannot read image {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None


def to_uint8(decoded: torch.Tensor | np.ndarray) -> np.ndarray:
    """[B,3,H,W] float -> [B,H,W,3] uint8: clip to [-1,1], (x+1)/2*255, truncating astype (as official)."""
    x = torch.as_tensor(decoded).float().clip(-1.0, 1.0).permute(0, 2, 3, 1).cpu().numpy()
    return ((x + 1) / 2.0 * 255).astype(np.uint8)


def _writer(img: np.ndarray, path: Path):
    fmt = IMAGE_FORMATS[path.suffix.lower()]
    return lambda tmp: Image.fromarray(img).save(tmp, format=fmt)


def save_image(img: np.ndarray, path: str | Path) -> Path:
    """One image in the format its suffix names (see IMAGE_FORMATS)."""
    return write_atomic(path, _writer(img, Path(path)))


def save_images(images: np.ndarray, paths: list[Path], extra=()) -> list[Path]:
    """All images (plus extra (path, write) items) to temporaries first, then renamed together."""
    return write_all([(p, _writer(img, Path(p))) for img, p in zip(images, paths, strict=True)] + list(extra))


save_png = save_image  # the name callers used before other formats were written


def output_paths(out: str | Path, n: int) -> list[Path]:
    """out.png for one image; out_0.png, out_1.png, ... for several."""
    out = Path(out)
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix or '.png'}") for i in range(n)]
