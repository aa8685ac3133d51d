"""Scientific TIFFs (microscopy stacks, channels-first, 16-bit multi-channel) through tifffile.

Pillow keeps reading the 8-bit TIFFs that cameras and scanners write (grey, RGB(A), palette,
CMYK, JPEG inside). tifffile reads the rest: more than 8 bits or floats per sample, planar
(channels-first) storage, grey images with extra samples, and channels stored as pages
(the `C` axis of ImageJ / OME files). Either way the result is the first page as 8-bit RGB:

- channels: 1 -> grey, 2 -> red and green (blue 0, as microscopy composites show them),
  3 or more -> the first 3 (alpha samples dropped first);
- 8-bit samples are kept; 16/32-bit and float samples are scaled by the image's own range,
  the 0.1th to 99.9th percentile over all kept channels (a few hot or dead pixels do not
  set the contrast; one range keeps the channels' relative brightness);
- layouts with no single "first page" (two stack axes, e.g. a 5-D TZCYX volume) are refused.
"""

from __future__ import annotations

import io
import logging
import struct
import zlib

import numpy as np
import tifffile
from PIL import Image

from data_pipelines.image_errors import BadImage

RANGE_PERCENTILES = (0.1, 99.9)
_PHOTOMETRIC = tifffile.PHOTOMETRIC
_ALPHA_EXTRASAMPLES = {1, 2}  # associated, unassociated alpha
_GREY = {_PHOTOMETRIC.MINISBLACK, _PHOTOMETRIC.MINISWHITE}
_ERRORS = (tifffile.TiffFileError, OSError, ValueError, KeyError, IndexError, TypeError,
           AttributeError, EOFError, struct.error, zlib.error)
# A broken file is reported as a skip reason; tifffile's own warnings about it are noise.
logging.getLogger("tifffile").setLevel(logging.CRITICAL)


class MissingCodec(BadImage):
    """tifffile lacks the codec (it needs `imagecodecs` for LZW, JPEG, ...); Pillow may not."""


def decode_tiff(data: bytes, max_pixels: int) -> Image.Image | None:
    """The first page as 8-bit RGB, or None when Pillow should decode this file (an 8-bit
    layout it reads, or bytes tifffile cannot parse: Pillow then names the problem)."""
    try:
        tif = tifffile.TiffFile(io.BytesIO(data))
        series = tif.series[0] if tif.series else None
    except _ERRORS:
        return None
    with tif:
        if series is None or not series.pages:
            return None
        page = series.keyframe
        outer = _page_axes(series, page)
        _check_size(page, max_pixels)
        if _pillow_reads(page, outer):
            return None
        _check_colour_space(series, page)
        return _to_rgb(_read_first_plane(series, page, outer), page)


def _unsupported(series, why: str) -> BadImage:
    shape = "x".join(map(str, series.shape))
    return BadImage(f"unsupported TIFF layout: {len(series.shape)}-D {series.axes} series of "
                    f"shape {shape} {why}; save one image, one stack of pages or one "
                    "multi-channel image per file")


def _page_axes(series, page) -> str:
    """The series axes that run across pages (stack and/or channel), after checking that the
    file has one first page: at most one stack axis and one channel axis."""
    axes = series.axes
    if not axes.endswith(page.axes) or set(page.axes) - set("YXS"):
        raise _unsupported(series, f"has pages of layout {page.axes}, not 2-D images")
    outer = axes[: len(axes) - len(page.axes)]
    stacks = [axis for axis in outer if axis != "C"]
    if len(stacks) > 1:
        raise _unsupported(series, f"has {len(stacks)} stack axes ({', '.join(stacks)})")
    if sum(axis in "SC" for axis in axes) > 1:
        raise _unsupported(series, "has both samples (S) and channels (C)")
    if page.dtype is None or page.dtype.kind not in "buif":
        raise _unsupported(series, f"has {page.dtype} samples")
    return outer


def _check_size(page, max_pixels: int) -> None:
    width, height = page.imagewidth, page.imagelength
    if width * height > max_pixels:
        raise BadImage(f"decompression bomb: {width}x{height} exceeds {max_pixels} pixels")
    if width < 1 or height < 1:
        raise BadImage(f"truncated or corrupt image: size {width}x{height}")


def _pillow_reads(page, outer: str) -> bool:
    """8-bit pages Pillow decodes well (it also knows palettes, CMYK, JPEG-in-TIFF)."""
    if page.dtype not in (np.uint8, np.bool_) or "C" in outer:
        return False
    if page.samplesperpixel == 1:
        return True
    contiguous = page.planarconfig == tifffile.PLANARCONFIG.CONTIG
    return contiguous and page.samplesperpixel <= 4 and page.photometric not in _GREY


def _check_colour_space(series, page) -> None:
    if page.photometric not in (*_GREY, _PHOTOMETRIC.RGB):
        name = getattr(page.photometric, "name", page.photometric)
        raise _unsupported(series, f"has {name} colour with {page.dtype} samples")


def _read_first_plane(series, page, outer: str) -> np.ndarray:
    """(height, width, channels) of the first page, reading only the pages it needs."""
    shape = series.shape[: len(outer)]
    channel_pages = min(shape[outer.index("C")], 3) if "C" in outer else 1
    planes = []
    for channel in range(channel_pages):
        index = [channel if axis == "C" else 0 for axis in outer]
        number = int(np.ravel_multi_index(index, shape)) if outer else 0
        planes.append(_page_pixels(series.pages[number], page))
    return np.concatenate(planes, axis=-1)


def _page_pixels(page, keyframe) -> np.ndarray:
    try:
        pixels = page.asarray()
    except (KeyError, ValueError) as exc:
        if "imagecodecs" in str(exc):
            name = getattr(keyframe.compression, "name", keyframe.compression)
            raise MissingCodec(f"unsupported TIFF compression: {name} with {keyframe.dtype} "
                               "samples needs the imagecodecs package (pip install imagecodecs)"
                               ) from None
        raise BadImage(f"truncated or corrupt image: {_first_line(exc)}") from None
    except _ERRORS as exc:
        raise BadImage(f"truncated or corrupt image: {_first_line(exc)}") from None
    axes = keyframe.axes
    if "S" not in axes:
        return pixels[..., None]
    pixels = np.moveaxis(pixels, axes.index("S"), -1)
    alpha = sum(extra in _ALPHA_EXTRASAMPLES for extra in keyframe.extrasamples)
    return pixels[..., : pixels.shape[-1] - alpha] if alpha < pixels.shape[-1] else pixels


def _to_rgb(pixels: np.ndarray, page) -> Image.Image:
    eight = to_uint8(pixels[..., :3])  # dropped channels must not stretch the range
    if page.photometric == _PHOTOMETRIC.MINISWHITE:
        eight = 255 - eight
    channels = eight.shape[-1]
    if channels == 1:
        eight = np.repeat(eight, 3, axis=-1)
    elif channels == 2:
        eight = np.concatenate([eight, np.zeros_like(eight[..., :1])], axis=-1)
    return Image.fromarray(np.ascontiguousarray(eight[..., :3]), mode="RGB")


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """8-bit samples as they are, booleans as 0/255, anything else scaled by its own
    percentile range (`RANGE_PERCENTILES`); NaN becomes the low end, a constant image black."""
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == np.bool_:
        return pixels.astype(np.uint8) * 255
    values = pixels.astype(np.float32)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(values.shape, np.uint8)
    low, high = np.percentile(finite, RANGE_PERCENTILES)
    if high <= low:  # almost constant: the full range still has some contrast
        low, high = finite.min(), finite.max()
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    scaled = (values - low) * 255.0 / (high - low)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
