"""Images arrive inline as data: URLs (base64 PNG, JPEG or WebP). The server never fetches a URL: a
remote image would let any client make it open connections and wait on them."""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image

from janusflow_trt.errors import InputError
from janusflow_trt.images import load_image

from .protocol import ServeError

# the formats a data: URL may hold: its media type, the file's first bytes
FORMATS = {"image/png": (b"\x89PNG\r\n\x1a\n",), "image/jpeg": (b"\xff\xd8\xff",), "image/webp": (b"RIFF",)}


class _Named(io.BytesIO):
    """The decoded bytes, named in load_image's one-line errors by where they came from."""

    def __init__(self, data: bytes, where: str):
        super().__init__(data)
        self.where = where

    def __str__(self) -> str:
        return f"at {self.where}"


def decode_data_url(url: str, where: str) -> Image.Image:
    """data:image/<png|jpeg|webp>;base64,<data> -> RGB image, read exactly as the CLI reads a file
    (janusflow_trt.images.load_image: the same size limit and colour conversion). where: the field."""
    if url.startswith(("http://", "https://")):
        raise ServeError(400, f"{where}: remote image URLs are not fetched; send the image inline as a "
                              "data:image/png;base64,... URL", param=where, code="unsupported_image_url")
    head, sep, data = url.partition(",")
    if not (url.startswith("data:") and sep and head.endswith(";base64")):
        raise ServeError(400, f"{where}: expected a data:image/png|jpeg|webp;base64,... URL", param=where,
                         code="invalid_image_url")
    media = head[len("data:"):-len(";base64")].lower()
    if media not in FORMATS:
        raise ServeError(400, f"{where}: media type {media or '(none)'!r} is not supported; use one of "
                              f"{', '.join(FORMATS)}", param=where, code="unsupported_image_format")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ServeError(400, f"{where}: the base64 data is malformed", param=where, code="invalid_image_url") \
            from None
    if not raw.startswith(FORMATS[media]) or (media == "image/webp" and raw[8:12] != b"WEBP"):
        raise ServeError(400, f"{where}: the data is not a {media} file", param=where, code="invalid_image")
    try:
        return load_image(_Named(raw, where))
    except InputError as e:
        raise ServeError(400, str(e), param=where, code="invalid_image") from None
