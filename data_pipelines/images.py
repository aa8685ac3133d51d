"""Decoding untrusted image files into plain 8-bit RGB, and re-encoding them for shards.

Real folders hold every mode PIL knows, animations, EXIF rotations, truncated downloads and
files that only pretend to be images. `decode_image` turns all of them into either an RGB
image or a `BadImage` with a short reason that a dataset manifest can record.
"""

from __future__ import annotations

import io
import re
import struct
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from data_pipelines.image_errors import BadImage

IMAGE_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "webp", "gif", "tif", "tiff", "bmp"})
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
MAX_IMAGE_PIXELS = 64_000_000
# Transparent pixels are composited onto mid-grey: neither black nor white biases the colours.
BACKGROUND_RGB = (128, 128, 128)

_HIGH_BIT_DEPTH_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
# Everything PIL raises while parsing broken data (PIL is not consistent about which).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError,
                  ZeroDivisionError, struct.error)
# The warnings filter is process-global; serialising the (header-only) open keeps concurrent
# decoders from restoring each other's filters. Pixel decoding still runs in parallel.
_OPEN_LOCK = threading.Lock()


def decode_image(data: bytes, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode bytes to an 8-bit RGB image (first frame, EXIF orientation applied)."""
    if not data:
        raise BadImage("empty file")
    if data[:4] in _TIFF_MAGIC:
        return _decode_tiff(data, max_pixels)
    return _decode_with_pillow(data, max_pixels)


def _decode_tiff(data: bytes, max_pixels: int) -> Image.Image:
    """Scientific layouts through tifffile (`data_pipelines.tiff`), the rest through Pillow."""
    from data_pipelines.tiff import MissingCodec, decode_tiff  # tifffile loads on first TIFF

    try:
        image = decode_tiff(data, max_pixels)
    except MissingCodec as missing:
        try:  # Pillow has its own LZW, deflate and JPEG decoders
            return _decode_with_pillow(data, max_pixels)
        except BadImage:
            raise missing from None
    return image if image is not None else _decode_with_pillow(data, max_pixels)


def _decode_with_pillow(data: bytes, max_pixels: int) -> Image.Image:
    image = _open_checked(data, max_pixels)
    try:
        image.seek(0)  # first frame of an animation / multi-page file
        image.load()
        return to_rgb(_apply_exif_orientation(image))
    except Image.DecompressionBombError as exc:
        raise BadImage(_bomb_reason(exc)) from None
    except BadImage:
        raise
    except _DECODE_ERRORS as exc:
        raise BadImage(f"truncated or corrupt image: {_first_line(exc)}") from None


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Parse only the header and refuse oversized images before any pixel is decoded."""
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(_bomb_reason(exc)) from None
    except UnidentifiedImageError:
        raise BadImage("not an image") from None
    except _DECODE_ERRORS as exc:
        raise BadImage(f"truncated or corrupt image: {_first_line(exc)}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadImage(f"decompression bomb: {width}x{height} exceeds {max_pixels} pixels")
    if width < 1 or height < 1:
        raise BadImage(f"truncated or corrupt image: size {width}x{height}")
    return image


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except _DECODE_ERRORS:
        return image  # unreadable EXIF: the pixels are still good, keep them as stored


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; alpha is composited onto `BACKGROUND_RGB`."""
    if image.mode == "RGB":
        return image
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        return _high_bit_depth_to_l(image).convert("RGB")
    if image.mode in _ALPHA_MODES or _has_palette_transparency(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND_RGB, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError:
        raise BadImage(f"unsupported image mode {image.mode}") from None


def _has_palette_transparency(image: Image.Image) -> bool:
    return image.mode in {"P", "L", "1"} and "transparency" in image.info


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """Scale 16-bit (or 32-bit int / float) greyscale to 8 bits instead of clipping at 255."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        top = 65535.0
    else:
        # "I"/"F" carry no declared range: 8-bit data stays as is, anything larger is 16-bit.
        top = 255.0 if values.size == 0 or values.max() <= 255 else 65535.0
    scaled = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def is_lossy(data: bytes) -> bool:
    """Whether the encoded bytes are JPEG or lossy WebP (re-encode those as JPEG, not PNG)."""
    if data[:3] == b"\xff\xd8\xff":
        return True
    return data[:4] == b"RIFF" and data[8:16] == b"WEBPVP8 "


def encode_image(image: Image.Image, ext: str) -> bytes:
    """Encode as "png" (lossless) or "jpg"/"jpeg" (quality 95)."""
    buffer = io.BytesIO()
    ext = ext.lower()
    if ext == "png":
        image.save(buffer, format="PNG")
    elif ext in {"jpg", "jpeg"}:
        image.save(buffer, format="JPEG", quality=95)
    else:
        raise ValueError(f"cannot encode images as {ext!r}; use 'png' or 'jpg'")
    return buffer.getvalue()


def _bomb_reason(exc: Exception) -> str:
    """PIL's own refusal, phrased like ours (PIL does not say the width and height)."""
    found = re.search(r"\((\d+) pixels\) exceeds limit of (\d+)", str(exc))
    if found is None:
        return f"decompression bomb: {_first_line(exc)}"
    return f"decompression bomb: {found[1]} pixels exceeds {found[2]} pixels"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
