"""Images in and out: uploads checked before they are decoded, results encoded once, and a byte-bounded
store for the images served by URL (so memory stays flat however many are made)."""

from __future__ import annotations

import base64
import binascii
import io
import secrets
import threading
from collections import OrderedDict

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .config import Limits
from .errors import ApiError, bad_request

FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"), "webp": ("WEBP", "image/webp")}


def encode(image: Image.Image, fmt: str = "png", parameters: str | None = None) -> bytes:
    """PNG (lossless: the pixels the pipeline made), JPEG or WebP; PNGs carry the settings as AUTOMATIC1111's
    do, in a "parameters" text chunk."""
    out = io.BytesIO()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        if parameters:
            info.add_text("parameters", parameters)
        image.save(out, format="PNG", pnginfo=info, compress_level=4)
    else:
        image.save(out, format=FORMATS[fmt][0], quality=92)
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_base64_image(value: object, param: str, limits: Limits, mode: str = "RGB") -> Image.Image:
    """A base64 image as AUTOMATIC1111 clients send them (a data: URL prefix allowed)."""
    if not isinstance(value, str) or not value:
        raise bad_request(f"{param} must be a base64-encoded image", param)
    if value.startswith("data:"):
        value = value.partition(",")[2]
    if len(value) > limits.max_upload_bytes * 4 // 3 + 4:
        raise _too_large(param, limits)
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{param} is not valid base64", param) from None
    return open_image(data, param, limits, mode)


def open_image(data: bytes, param: str, limits: Limits, mode: str | None = "RGB") -> Image.Image:
    """Decodes an uploaded image after checking its byte size and its dimensions (from the header, before
    the pixels are decompressed: a small file can claim a huge picture)."""
    if len(data) > limits.max_upload_bytes:
        raise _too_large(param, limits)
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if max(width, height) > limits.max_side:
            raise bad_request(
                f"{param} is {width}x{height}; at most {limits.max_side} pixels a side are accepted", param
            )
        image.load()
    except ApiError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise bad_request(f"{param} is not a readable image (PNG, JPEG or WebP)", param) from None
    return image.convert(mode) if mode else image


def _too_large(param: str, limits: Limits) -> ApiError:
    return ApiError(
        413, f"{param} is larger than {limits.max_upload_bytes} bytes", code="upload_too_large", param=param
    )


def mask_from_alpha_or_luminance(mask: Image.Image) -> Image.Image:
    """OpenAI masks mark the area to edit as transparent; masks without alpha follow diffusers and
    AUTOMATIC1111 (white is repainted). Returns an L image, white = repaint."""
    if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
        alpha = mask.convert("RGBA").getchannel("A")
        return alpha.point(lambda a: 255 if a < 128 else 0)
    return mask.convert("L")


class ImageStore:
    """Encoded images by unguessable id, oldest dropped first once `max_bytes` are held."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[bytes, str]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, data: bytes, fmt: str) -> str:
        name = f"{secrets.token_urlsafe(16)}.{fmt}"
        with self._lock:
            self._items[name] = (data, FORMATS[fmt][1])
            self._bytes += len(data)
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, (old, _) = self._items.popitem(last=False)
                self._bytes -= len(old)
        return name

    def get(self, name: str) -> tuple[bytes, str] | None:
        with self._lock:
            return self._items.get(name)

    @property
    def size(self) -> tuple[int, int]:
        with self._lock:
            return len(self._items), self._bytes
