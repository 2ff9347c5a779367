"""Image input: only ``data:`` URLs with base64 PNG or JPEG, checked before anything is queued.

Remote ``http(s)`` URLs are refused: a hospital gateway that fetches arbitrary URLs is a
server-side request forgery hole into the hospital network. Each check is its own 400 with a
stable code: not a data URL / bad base64 / not PNG or JPEG / undecodable (``invalid_image``),
too many bytes (``image_too_large``), too many pixels (``image_too_many_pixels``, read from
the header *before* decoding, so a decompression bomb is never expanded).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
from dataclasses import dataclass
from typing import Literal

import anyio
from PIL import Image, UnidentifiedImageError

from gateway.core.errors import APIError
from gateway.core.types import ImageLimits
from shared.errors import ErrorCode

_DATA_URL = re.compile(
    r"^data:(?P<mime>[\w/+.-]+)?(?P<params>(;[\w=.+-]+)*);base64,(?P<data>.*)$", re.S
)
_FORMATS: dict[str, Literal["image/png", "image/jpeg"]] = {"PNG": "image/png", "JPEG": "image/jpeg"}


@dataclass(frozen=True)
class RawImage:
    """A validated image, ready to be stored for a worker."""

    data: bytes
    mime_type: Literal["image/png", "image/jpeg"]
    width: int
    height: int

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def _bad(code: ErrorCode, param: str, message: str) -> APIError:
    return APIError(400, code, message, param=param)


def _decode_and_check(data: bytes, limits: ImageLimits, param: str) -> RawImage:
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or ""
            width, height = img.size
            if fmt not in _FORMATS:
                raise _bad(
                    ErrorCode.INVALID_IMAGE,
                    param,
                    f"Images must be PNG or JPEG, not {fmt or 'unknown'}.",
                )
            if width * height > limits.max_pixels:
                raise _bad(
                    ErrorCode.IMAGE_TOO_MANY_PIXELS,
                    param,
                    f"The image is {width}x{height} pixels; at most {limits.max_pixels} pixels "
                    "are accepted. Downscale it first.",
                )
            img.load()  # decode fully: truncated or corrupt files fail here
    except APIError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        raise _bad(
            ErrorCode.INVALID_IMAGE, param, "The image could not be decoded as a PNG or JPEG."
        ) from None
    return RawImage(data=data, mime_type=_FORMATS[fmt], width=width, height=height)


async def parse_image_url(url: str, limits: ImageLimits, param: str) -> RawImage:
    """Validate one image URL (a ``data:`` URL) and return its bytes, or raise a 400."""
    if re.match(r"^\s*https?://", url, re.I):
        raise _bad(
            ErrorCode.IMAGE_URL_NOT_ALLOWED,
            param,
            "Remote image URLs are not fetched by this gateway. Send the image inline as a "
            "data: URL (data:image/png;base64,...).",
        )
    m = _DATA_URL.match(url.strip())
    if m is None:
        raise _bad(
            ErrorCode.INVALID_IMAGE,
            param,
            "An image must be a base64 data: URL (data:image/png;base64,... or image/jpeg).",
        )
    encoded = m.group("data")
    if len(encoded) * 3 // 4 > limits.max_bytes + 3:
        raise _bad(
            ErrorCode.IMAGE_TOO_LARGE,
            param,
            f"The image is larger than {limits.max_bytes} bytes; send a smaller one.",
        )
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(
            ErrorCode.INVALID_IMAGE, param, "The image's base64 data is malformed."
        ) from None
    if len(data) > limits.max_bytes:
        raise _bad(
            ErrorCode.IMAGE_TOO_LARGE,
            param,
            f"The image is larger than {limits.max_bytes} bytes; send a smaller one.",
        )
    return await anyio.to_thread.run_sync(_decode_and_check, data, limits, param)
