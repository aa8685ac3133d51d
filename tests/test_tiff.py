"""Scientific TIFFs written by tifffile (multi-page, planar, 16-bit multi-channel, float, 5-D)
ingested and decoded to 8-bit RGB, with exact pixels and exact skip reasons."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from data_pipelines.images import BadImage, decode_image
from data_pipelines.ingest import ingest
from data_pipelines.shards import iter_webdataset_members, read_manifest
from data_pipelines.tiff import to_uint8

SIDE = 64  # 4096 pixels: one hot pixel is under the 0.1% the robust range ignores
CLASS = "graphene flakes"


def tiff(array: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **options)
    return buffer.getvalue()


def bands(*values: int, dtype=np.uint16) -> np.ndarray:
    """SIDE x SIDE with vertical bands of `values`, left to right."""
    edges = np.linspace(0, SIDE, len(values) + 1).astype(int)
    plane = np.zeros((SIDE, SIDE), dtype)
    for value, left, right in zip(values, edges[:-1], edges[1:], strict=True):
        plane[:, left:right] = value
    return plane


def zstack_16bit() -> bytes:
    """5 grey pages; the first has bands 1000/2000/3000, one hot and one dead pixel."""
    first = bands(1000, 2000, 3000)
    first[0, SIDE - 1], first[SIDE - 1, 0] = 65535, 0
    pages = np.stack([first] + [np.full((SIDE, SIDE), 60000, np.uint16)] * 4)
    return tiff(pages, photometric="minisblack")


def planar(values: tuple[int, ...], dtype) -> bytes:
    """Channels-first RGB, one constant value per channel."""
    array = np.stack([np.full((SIDE, SIDE), v, dtype) for v in values])
    return tiff(array, photometric="rgb", planarconfig="separate")


def four_channels_16bit() -> bytes:
    """Contiguous grey + 3 extra samples (Pillow: "cannot identify image file")."""
    array = np.stack([np.full((SIDE, SIDE), v, np.uint16) for v in (0, 1000, 2000, 3000)], -1)
    return tiff(array, photometric="minisblack", planarconfig="contig")


def imagej(array: np.ndarray, axes: str) -> bytes:
    return tiff(array, imagej=True, metadata={"axes": axes})


def float_ramp() -> bytes:
    ramp = np.tile(np.linspace(0.0, 1.0, SIDE, dtype=np.float32), (SIDE, 1))
    ramp[5, 5] = np.nan
    return tiff(ramp)


VOLUME_REASON = ("unsupported TIFF layout: 5-D TZCYX series of shape 2x3x4x64x64 has 2 stack "
                 "axes (T, Z); save one image, one stack of pages or one multi-channel image "
                 "per file")

TIFFS = {
    "zstack16.tif": zstack_16bit(),
    "planar16.tif": planar((4000, 2000, 0), np.uint16),
    "planar8.tiff": planar((10, 20, 30), np.uint8),
    "four16.tif": four_channels_16bit(),
    "imagej_2ch.tif": imagej(np.stack([bands(500), bands(1500)]), "CYX"),
    "imagej_zcyx.tif": imagej(np.stack([np.stack([bands(100), bands(300), bands(200), bands(900)]),
                                        np.full((4, SIDE, SIDE), 7, np.uint16)]), "ZCYX"),
    "float.tif": float_ramp(),
    "volume5d.tif": imagej(np.zeros((2, 3, 4, SIDE, SIDE), np.uint16), "TZCYX"),
}


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Decoded pixels of every kept TIFF (by file name) and skip reasons, via `ingest`."""
    root = tmp_path_factory.mktemp("tiffs")
    for name, data in TIFFS.items():
        (root / "src" / CLASS).mkdir(parents=True, exist_ok=True)
        (root / "src" / CLASS / name).write_bytes(data)
    manifest = ingest(str(root / "src"), str(root / "out"), test_fraction=0.0,
                      max_skip_fraction=0.2)
    return _pixels(root / "out"), {s.source: s.reason for s in manifest.skipped}


def _pixels(out: Path) -> dict[str, np.ndarray]:
    pixels = {}
    for shard in read_manifest(str(out)).splits["train"].shards:
        for _, members in iter_webdataset_members((out / shard).read_bytes()):
            source = json.loads(members["json"])["source"]
            assert members["txt"].decode() == CLASS and "png" in members  # lossless re-encode
            pixels[source.rsplit("/", 1)[-1]] = np.asarray(Image.open(io.BytesIO(members["png"])))
    return pixels


def test_every_supported_tiff_is_kept_as_8bit_rgb(ingested):
    pixels, skipped = ingested
    assert set(pixels) == set(TIFFS) - {"volume5d.tif"}
    for array in pixels.values():
        assert array.shape == (SIDE, SIDE, 3) and array.dtype == np.uint8


def test_16bit_stack_takes_the_first_page_scaled_by_its_robust_range(ingested):
    image = ingested[0]["zstack16.tif"]
    # bands 1000 / 2000 / 3000 -> 0 / 127.5 (rounded to even: 128) / 255; pages 2-5 unused
    assert [int(image[SIDE // 2, x, 0]) for x in (5, 30, 60)] == [0, 128, 255]
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    # the hot (65535) and dead (0) pixels are clipped instead of setting the range
    assert image[0, SIDE - 1, 0] == 255 and image[SIDE - 1, 0, 0] == 0
    assert (image.min(), image.max()) == (0, 255)


def test_planar_and_multichannel_tiffs(ingested):
    pixels = ingested[0]
    expected = {
        "planar16.tif": (255, 128, 0),  # one range over the channels: 0..4000
        "planar8.tiff": (10, 20, 30),  # 8-bit samples kept as they are
        "four16.tif": (0, 128, 255),  # first 3 of 4 channels, ranged without the 4th
        "imagej_2ch.tif": (0, 255, 0),  # C axis in pages: 2 channels -> red, green
        "imagej_zcyx.tif": (0, 255, 128),  # first Z page, channels 100/300/200 of 4
    }
    for name, rgb in expected.items():
        array = pixels[name]
        assert (array == np.array(rgb, np.uint8)).all(), (name, array[0, 0])


def test_float_tiff_scaled_by_its_range_with_nan_at_the_low_end(ingested):
    image = ingested[0]["float.tif"][..., 0]
    assert image[0, 0] == 0 and image[0, SIDE - 1] == 255
    assert (np.diff(image[0].astype(int)) >= 0).all()  # the ramp stays a ramp
    assert image[5, 5] == 0


def test_5d_volume_is_skipped_with_its_layout_named(ingested):
    assert ingested[1] == {f"{CLASS}/volume5d.tif": VOLUME_REASON}


def test_other_unusable_tiffs_name_what_they_are():
    with pytest.raises(BadImage) as complex_tiff:
        decode_image(tiff(np.zeros((SIDE, SIDE), np.complex64)))
    assert str(complex_tiff.value) == (
        "unsupported TIFF layout: 2-D YX series of shape 64x64 has complex64 samples; save one "
        "image, one stack of pages or one multi-channel image per file")
    with pytest.raises(BadImage, match=r"^decompression bomb: 64x64 exceeds 1000 pixels$"):
        decode_image(zstack_16bit(), max_pixels=1000)
    with pytest.raises(BadImage, match=r"^truncated or corrupt image: "):
        decode_image(four_channels_16bit()[:20000])


def lzw_tag(data: bytes) -> bytes:
    """The same file claiming LZW compression (tifffile needs imagecodecs for LZW)."""
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        offset = tif.pages[0].tags["Compression"].valueoffset
    patched = bytearray(data)
    patched[offset:offset + 2] = (5).to_bytes(2, "little")
    return bytes(patched)


def test_lzw_tiffs_fall_back_to_pillow_or_name_the_missing_codec():
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(buffer, "TIFF",
                                                             compression="tiff_lzw")
    # tifffile cannot decode LZW here; Pillow can, with its full-range 16-bit scaling
    assert decode_image(buffer.getvalue()).getpixel((0, 0)) == (156, 156, 156)
    four = tiff(np.zeros((8, 8, 4), np.uint16), photometric="minisblack", compression="zlib")
    with pytest.raises(BadImage) as caught:
        decode_image(lzw_tag(four))  # neither reader can: the reason says what to install
    assert str(caught.value) == ("unsupported TIFF compression: LZW with uint16 samples needs "
                                 "the imagecodecs package (pip install imagecodecs)")


def test_to_uint8_edge_cases():
    assert to_uint8(np.array([[3, 250]], np.uint8)).tolist() == [[3, 250]]
    assert to_uint8(np.array([[True, False]])).tolist() == [[255, 0]]
    assert to_uint8(np.full((4, 4), 1234, np.uint16)).tolist() == [[0] * 4] * 4
    assert to_uint8(np.full((2, 2), np.nan, np.float32)).tolist() == [[0, 0], [0, 0]]
    signed = np.repeat(np.array([[-1.0, 0.0, 1.0]], np.float32), 2000, axis=1)
    assert np.unique(to_uint8(signed)).tolist() == [0, 128, 255]
