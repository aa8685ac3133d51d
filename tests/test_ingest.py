"""`ingest` on real messy files: an image folder with every odd case, WebDataset tars, Parquet."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from data_pipelines.images import BadImage, decode_image
from data_pipelines.ingest import IngestError, ingest
from data_pipelines.shards import (
    MANIFEST_NAME,
    iter_webdataset_members,
    manifest_hash,
    read_manifest,
)
from data_pipelines.storage import StorageError

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
NH4 = "(NH4)2S2O8"
KMNO4 = "potassium permanganate (KMnO4)"


# ---------------------------------------------------------------- building odd files


def encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    return Image.fromarray(pixels)


def png_with_claimed_size(width: int, height: int) -> bytes:
    """A valid small PNG whose IHDR (with a correct CRC) claims width x height."""
    data = bytearray(encoded(Image.new("L", (8, 8)), "PNG"))
    ihdr = 8 + 4  # after the signature and the chunk length: b"IHDR" + 13 bytes of data
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    return bytes(data)


def half_transparent_rgba() -> bytes:
    image = Image.new("RGBA", (4, 4), (*RED, 255))
    image.paste((0, 0, 0, 0), (0, 0, 2, 4))  # left half fully transparent
    return encoded(image, "PNG")


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (6, 6), colour) for colour in (RED, BLUE)]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)


def multipage_tiff() -> bytes:
    pages = [Image.new("RGB", (6, 6), colour) for colour in (GREEN, RED)]
    return encoded(pages[0], "TIFF", save_all=True, append_images=pages[1:])


def rotated_jpeg() -> bytes:
    """A 20x10 JPEG whose EXIF says "rotate 90 degrees clockwise to display" (orientation 6)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(noise((20, 10)), "JPEG", exif=exif)


def sixteen_bit_png(value: int) -> bytes:
    image = Image.fromarray(np.full((5, 5), value, dtype=np.uint16))
    assert image.mode == "I;16"
    return encoded(image, "PNG")


MESSY_FILES: dict[str, bytes] = {
    f"{NH4}/gray.png": encoded(Image.new("L", (8, 8), 90), "PNG"),
    f"{NH4}/rgba.png": half_transparent_rgba(),
    f"{NH4}/palette.png": encoded(noise((8, 8)).convert("P"), "PNG"),
    f"{NH4}/cmyk.jpg": encoded(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"),
    f"{NH4}/deep 16bit.png": sixteen_bit_png(40000),
    f"{NH4}/animated.gif": animated_gif(),
    f"{NH4}/pages.tiff": multipage_tiff(),
    f"{NH4}/rotated.jpg": rotated_jpeg(),
    f"{NH4}/tiny.png": encoded(Image.new("RGB", (1, 1), BLUE), "PNG"),
    f"{NH4}/truncated.png": encoded(noise((64, 64)), "PNG")[:6000],
    f"{NH4}/empty.png": b"",
    f"{NH4}/fake.jpg": b"this is a text file, not a JPEG\n",
    f"{NH4}/bomb.png": png_with_claimed_size(9000, 8000),  # 72 MP: over our 64 MP default
    f"{NH4}/huge bomb.png": png_with_claimed_size(20000, 20000),  # over PIL's own hard limit
    f"{NH4}/README.md": b"# notes about these images\n",
    f"{NH4}/.DS_Store": b"\x00\x00\x00\x01Bud1",
    f"{NH4}/.hidden.png": encoded(Image.new("RGB", (4, 4)), "PNG"),
    f"{KMNO4}/with sidecar.png": encoded(Image.new("RGB", (4, 4), RED), "PNG"),
    f"{KMNO4}/with sidecar.txt": b"  purple crystals\n under a microscope \n",
    f"{KMNO4}/empty sidecar.png": encoded(Image.new("RGB", (4, 4), GREEN), "PNG"),
    f"{KMNO4}/empty sidecar.txt": b" \n\t",
    f"{KMNO4}/latin1.png": encoded(Image.new("RGB", (4, 4), BLUE), "PNG"),
    f"{KMNO4}/latin1.txt": "café crème".encode("latin-1"),
    "captioned root.png": encoded(Image.new("RGB", (4, 4), RED), "PNG"),
    "captioned root.txt": b"a red square",
    "orphan.png": encoded(Image.new("RGB", (4, 4), RED), "PNG"),
    "notes.txt": b"not a sidecar of anything",
    ".cache/thumb.png": encoded(Image.new("RGB", (4, 4)), "PNG"),
}

EXPECTED_KEPT = {
    f"{NH4}/gray.png", f"{NH4}/rgba.png", f"{NH4}/palette.png", f"{NH4}/cmyk.jpg",
    f"{NH4}/deep 16bit.png", f"{NH4}/animated.gif", f"{NH4}/pages.tiff", f"{NH4}/rotated.jpg",
    f"{NH4}/tiny.png", f"{KMNO4}/with sidecar.png", f"{KMNO4}/empty sidecar.png",
    f"{KMNO4}/latin1.png", "captioned root.png",
}
EXPECTED_SKIPPED = {
    f"{NH4}/truncated.png": "truncated or corrupt image",
    f"{NH4}/empty.png": "empty file",
    f"{NH4}/fake.jpg": "not an image",
    f"{NH4}/bomb.png": "decompression bomb: 9000x8000 exceeds 64000000 pixels",
    f"{NH4}/huge bomb.png": "decompression bomb",
    "orphan.png": "no caption",
}


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    return write_tree(tmp_path / "messy src", MESSY_FILES)


# ---------------------------------------------------------------- reading results back


def read_samples(out: Path) -> dict[str, dict]:
    """Every sample of a webdataset output, by meta["source"]."""
    manifest = read_manifest(str(out))
    samples = {}
    for split, info in manifest.splits.items():
        for shard in info.shards:
            for key, members in iter_webdataset_members((out / shard).read_bytes()):
                meta = json.loads(members["json"])
                ext = "png" if "png" in members else "jpg"
                samples[meta["source"]] = {
                    "key": key, "split": split, "ext": ext, "meta": meta,
                    "caption": members["txt"].decode("utf-8"),
                    "image": Image.open(io.BytesIO(members[ext])),
                }
    return samples


def dataset_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- the image folder


@pytest.fixture
def messy_ingest(messy_folder: Path, tmp_path: Path):
    out = tmp_path / "out"
    manifest = ingest(str(messy_folder), str(out), samples_per_shard=4, max_skip_fraction=0.5)
    return manifest, out


def test_image_folder_keeps_and_skips_exactly_the_right_files(messy_ingest):
    manifest, out = messy_ingest
    samples = read_samples(out)
    assert set(samples) == EXPECTED_KEPT
    skipped = {s.source: s.reason for s in manifest.skipped}
    assert set(skipped) == set(EXPECTED_SKIPPED)
    for source, reason in EXPECTED_SKIPPED.items():
        assert skipped[source].startswith(reason), (source, skipped[source])
    assert manifest.num_samples == len(EXPECTED_KEPT)
    assert manifest.extra["kind"] == "image_folder"
    on_disk = read_manifest(str(out))
    assert on_disk.num_skipped == len(EXPECTED_SKIPPED)
    assert sum(info.num_samples for info in on_disk.splits.values()) == len(EXPECTED_KEPT)


def test_image_folder_captions(messy_ingest):
    samples = read_samples(messy_ingest[1])
    caption = {source: (s["caption"], s["meta"]["caption_source"]) for source, s in samples.items()}
    assert caption[f"{NH4}/gray.png"] == (NH4, "folder")
    assert caption[f"{KMNO4}/with sidecar.png"] == ("purple crystals under a microscope", "sidecar")
    assert caption[f"{KMNO4}/empty sidecar.png"] == (KMNO4, "folder")
    assert caption[f"{KMNO4}/latin1.png"] == ("caf\ufffd cr\ufffdme", "sidecar")
    assert caption["captioned root.png"] == ("a red square", "sidecar")


def test_image_folder_normalises_every_odd_image(messy_ingest):
    samples = read_samples(messy_ingest[1])
    for sample in samples.values():
        assert sample["image"].mode == "RGB"
    pixel = {source: s["image"].getpixel((0, 0)) for source, s in samples.items()}
    assert pixel[f"{NH4}/gray.png"] == (90, 90, 90)
    assert pixel[f"{NH4}/rgba.png"] == (128, 128, 128)  # transparent -> neutral grey
    assert samples[f"{NH4}/rgba.png"]["image"].getpixel((3, 0)) == RED
    assert max(abs(a - b) for a, b in zip(pixel[f"{NH4}/cmyk.jpg"], RED, strict=True)) < 10
    assert pixel[f"{NH4}/deep 16bit.png"] == (156, 156, 156)  # 40000 / 257, not clipped
    assert pixel[f"{NH4}/animated.gif"] == RED  # first frame
    assert pixel[f"{NH4}/pages.tiff"] == GREEN  # first page
    assert samples[f"{NH4}/rotated.jpg"]["image"].size == (10, 20)  # EXIF orientation applied
    assert samples[f"{NH4}/tiny.png"]["image"].size == (1, 1)
    # JPEG sources stay JPEG; everything lossless becomes PNG
    exts = {source: s["ext"] for source, s in samples.items()}
    assert {s for s, e in exts.items() if e == "jpg"} == {f"{NH4}/cmyk.jpg", f"{NH4}/rotated.jpg"}


def test_image_folder_keys_splits_and_determinism(messy_ingest, messy_folder, tmp_path):
    manifest, out = messy_ingest
    samples = read_samples(out)
    keys = [s["key"] for s in samples.values()]
    assert len(set(keys)) == len(keys)
    assert all(key.replace("-", "").isalnum() and key.islower() for key in keys)
    assert samples[f"{NH4}/gray.png"]["key"].startswith("nh4-2s2o8-gray-")
    assert samples[f"{KMNO4}/latin1.png"]["key"].startswith("potassium-permanganate-kmno4-latin1-")
    assert {s["split"] for s in samples.values()} <= {"train", "test"}

    again = tmp_path / "again"
    ingest(str(messy_folder), str(again), samples_per_shard=4, max_skip_fraction=0.5)
    shards = [s for info in manifest.splits.values() for s in info.shards]
    assert shards == [s for info in read_manifest(str(again)).splits.values() for s in info.shards]
    for shard in shards:
        assert (out / shard).read_bytes() == (again / shard).read_bytes()
    # the rebuild has its own build time but the same identity (the evaluator's cache key)
    assert json.loads((again / MANIFEST_NAME).read_text())["created_unix"] != \
        json.loads((out / MANIFEST_NAME).read_text())["created_unix"]
    assert manifest_hash(str(again)) == manifest_hash(str(out))
    other = tmp_path / "other"
    ingest(str(messy_folder), str(other), samples_per_shard=3, max_skip_fraction=0.5)
    assert manifest_hash(str(other)) != manifest_hash(str(out))


def test_test_fraction_and_seed_move_samples_between_splits(tmp_path):
    files = {f"cls/{i}.png": encoded(Image.new("RGB", (2, 2), (i, 0, 0)), "PNG")
             for i in range(200)}
    src = write_tree(tmp_path / "src", files)
    counts, calls = {}, []
    for seed in (0, 1):
        manifest = ingest(str(src), str(tmp_path / f"out{seed}"), test_fraction=0.25, seed=seed,
                          progress=lambda kept, skipped: calls.append((kept, skipped)))
        counts[seed] = manifest.splits["test"].num_samples
        assert manifest.splits["train"].num_samples + counts[seed] == 200
        assert 25 <= counts[seed] <= 75
    assert calls[-1] == (200, 0) and len(calls) == 400  # once per image, per run
    held_out = [{source for source, s in read_samples(tmp_path / f"out{seed}").items()
                 if s["split"] == "test"} for seed in (0, 1)]
    assert len(held_out[0]) == counts[0] and held_out[0] != held_out[1]
    none_held_out = ingest(str(src), str(tmp_path / "all"), test_fraction=0.0)
    assert none_held_out.splits["test"].num_samples == 0


# ---------------------------------------------------------------- failures leave nothing behind


def test_skip_budget_failure_is_one_clear_line_and_writes_nothing(messy_folder, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(IngestError) as caught:
        ingest(str(messy_folder), str(out), samples_per_shard=2)  # default budget: 1%
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("6 of 19 images skipped (31.6%) exceeds max_skip_fraction=0.01; "
                              "first reasons: ")
    assert f"{NH4}/bomb.png: decompression bomb" in message
    assert message.endswith("raise the budget with --max-skip-fraction or fix the source")
    assert dataset_files(out) == {}  # shards written before the check were removed


def test_failed_ingest_never_touches_an_existing_dataset(messy_folder, tmp_path):
    good = write_tree(tmp_path / "good", {"cls/a.png": encoded(Image.new("RGB", (3, 3)), "PNG")})
    out = tmp_path / "out"
    ingest(str(good), str(out))
    before = dataset_files(out)
    with pytest.raises(StorageError, match="already holds a dataset.*--overwrite"):
        ingest(str(messy_folder), str(out), max_skip_fraction=0.5)
    with pytest.raises(IngestError, match="exceeds max_skip_fraction"):
        ingest(str(messy_folder), str(out), overwrite=True)
    assert dataset_files(out) == before


def test_overwrite_replaces_the_dataset_and_removes_stale_shards(messy_folder, tmp_path):
    out = tmp_path / "out"
    ingest(str(messy_folder), str(out), samples_per_shard=1, max_skip_fraction=0.5)
    good = write_tree(tmp_path / "good", {"cls/a.png": encoded(Image.new("RGB", (3, 3)), "PNG")})
    manifest = ingest(str(good), str(out), overwrite=True, test_fraction=0.0)
    assert set(dataset_files(out)) == {MANIFEST_NAME, "train/part-00000.tar"}
    assert manifest.num_samples == 1


def test_missing_or_empty_source_is_a_clear_error(tmp_path):
    with pytest.raises(IngestError, match="does not exist"):
        ingest(str(tmp_path / "nope"), str(tmp_path / "out"))
    write_tree(tmp_path / "docs", {"README.md": b"hi", "a/b.txt": b"caption without image"})
    with pytest.raises(IngestError, match="no images in .*docs"):
        ingest(str(tmp_path / "docs"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_decode_image_refuses_before_decoding_pixels():
    data = encoded(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(BadImage, match=r"^decompression bomb: 100x100 exceeds 1000 pixels$"):
        decode_image(data, max_pixels=1000)
    assert decode_image(data, max_pixels=10_000).size == (100, 100)
    # PIL's own limits (a warning above 89 MP, an error above 179 MP) become the same refusal
    with pytest.raises(BadImage, match=r"^decompression bomb: 100000000 pixels exceeds \d+"):
        decode_image(png_with_claimed_size(10000, 10000), max_pixels=10**12)
    with pytest.raises(BadImage, match=r"^decompression bomb: 400000000 pixels exceeds \d+"):
        decode_image(png_with_claimed_size(20000, 20000), max_pixels=10**12)


# ---------------------------------------------------------------- WebDataset and Parquet sources


def write_webdataset(path: Path, samples: list[tuple[str, bytes, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for key, jpg, caption in samples:
            sink.write({"__key__": key, "jpg": jpg, "txt": caption,
                        "json": {"url": f"http://example.com/{key}.jpg", "caption": caption}})


def test_ingest_webdataset_shards(tmp_path):
    jpg = encoded(noise((12, 8)), "JPEG")
    src = tmp_path / "wds src"
    write_webdataset(src / "00000.tar", [("000000001", jpg, "a cat"), ("000000002", jpg, "a dog"),
                                         ("000000003", b"corrupt bytes", "broken")])
    write_webdataset(src / "nested" / "00001.tar", [("sub/000000004", jpg, ""),
                                                    ("sub/000000005", jpg, "a bird")])
    (src / "00000_stats.json").write_text("{}")  # img2dataset writes these next to shards
    manifest = ingest(str(src), str(tmp_path / "out"), test_fraction=0.0, max_skip_fraction=0.5)
    assert manifest.extra["kind"] == "webdataset"
    samples = read_samples(tmp_path / "out")
    assert {s: v["caption"] for s, v in samples.items()} == {
        "00000.tar:000000001": "a cat",
        "00000.tar:000000002": "a dog",
        "nested/00001.tar:sub/000000005": "a bird",
    }
    sample = samples["00000.tar:000000001"]
    assert sample["ext"] == "jpg" and sample["image"].size == (12, 8)
    assert sample["meta"]["caption_source"] == "shard"
    assert sample["meta"]["url"] == "http://example.com/000000001.jpg"
    # an empty .txt falls back to the json caption, here empty too -> skipped
    assert {s.source: s.reason for s in manifest.skipped} == {
        "00000.tar:000000003": "not an image",
        "nested/00001.tar:sub/000000004": "no caption",
    }


def test_ingest_img2dataset_output_folder(tmp_path):
    from webdataset_fixtures import write_img2dataset

    src = tmp_path / "img2dataset out"
    captions = write_img2dataset(str(src), [4, 3, 5], failed_per_shard=2)
    assert sorted(p.name for p in src.iterdir()) == [
        f"0000{i}{suffix}" for i in range(3) for suffix in (".parquet", ".tar", "_stats.json")]
    manifest = ingest(str(src), str(tmp_path / "out"), test_fraction=0.0)
    assert (manifest.num_samples, manifest.num_skipped) == (12, 0)
    assert manifest.extra["kind"] == "webdataset"
    samples = read_samples(tmp_path / "out")
    assert {s: v["caption"] for s, v in samples.items()} == {
        f"{key[:5]}.tar:{key}": caption for key, caption in captions.items()}
    first = samples["00000.tar:000000000"]
    assert first["ext"] == "jpg" and first["image"].size == (20, 16)
    assert first["meta"]["url"] == "http://example.com/000000000.jpg"
    # a Parquet file that is not a shard's metadata still makes the folder ambiguous
    (src / "extra.parquet").write_bytes((src / "00000.parquet").read_bytes())
    with pytest.raises(IngestError, match=r"mixes parquet and webdataset files; point SRC at "):
        ingest(str(src), str(tmp_path / "out2"))


def test_ingest_truncated_webdataset_shard_is_recorded(tmp_path):
    jpg = encoded(noise((8, 8)), "JPEG")
    src = tmp_path / "src"
    write_webdataset(src / "good.tar", [(f"{i:04d}", jpg, "ok") for i in range(60)])
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("x.jpg")
        info.size = len(jpg)
        tar.addfile(info, io.BytesIO(jpg))
    (src / "bad.tar").write_bytes(buffer.getvalue()[: 512 + len(jpg) // 2])
    manifest = ingest(str(src), str(tmp_path / "out"), max_skip_fraction=0.1)
    assert manifest.num_samples == 60
    assert [s.source for s in manifest.skipped] == ["bad.tar"]
    assert manifest.skipped[0].reason.startswith("corrupt shard")


def test_ingest_parquet_with_plain_and_hf_struct_image_columns(tmp_path):
    png = encoded(Image.new("RGB", (5, 7), GREEN), "PNG")
    src = tmp_path / "pq src"
    src.mkdir()
    pq.write_table(pa.table({"image_bytes": [png, png, None], "text": ["one", " ", "three"]}),
                   src / "plain.parquet")
    hf_images = pa.array([{"bytes": png, "path": "a.png"}, {"bytes": b"junk", "path": "b.png"}],
                         type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": hf_images, "caption": ["hf one", "hf two"]}),
                   src / "hf.parquet")
    manifest = ingest(str(src), str(tmp_path / "out"), test_fraction=0.0, max_skip_fraction=0.9)
    samples = read_samples(tmp_path / "out")
    assert {s: v["caption"] for s, v in samples.items()} == {
        "plain.parquet:0": "one", "hf.parquet:0": "hf one"}
    assert samples["hf.parquet:0"]["image"].size == (5, 7)
    assert samples["hf.parquet:0"]["meta"]["caption_source"] == "parquet"
    assert {s.source: s.reason for s in manifest.skipped} == {
        "plain.parquet:1": "no caption", "plain.parquet:2": "empty file",
        "hf.parquet:1": "not an image"}


def test_parquet_explicit_columns_and_missing_column_error(tmp_path):
    png = encoded(Image.new("RGB", (2, 2)), "PNG")
    src = tmp_path / "src"
    src.mkdir()
    pq.write_table(pa.table({"pixels": [png], "label": ["a label"]}), src / "x.parquet")
    with pytest.raises(IngestError, match=r"no image column .*'pixels'.*--image-column"):
        ingest(str(src), str(tmp_path / "out"))
    single_file = str(src / "x.parquet")
    manifest = ingest(single_file, str(tmp_path / "out"), image_column="pixels",
                      caption_column="label", test_fraction=0.0)
    assert manifest.num_samples == 1 and manifest.source == single_file


def test_parquet_output_format(messy_folder, tmp_path):
    out = tmp_path / "out"
    manifest = ingest(str(messy_folder), str(out), fmt="parquet", samples_per_shard=5,
                      max_skip_fraction=0.5)
    shards = [s for info in manifest.splits.values() for s in info.shards]
    assert shards and all(s.endswith(".parquet") for s in shards)
    table = pa.concat_tables(pq.read_table(out / s) for s in shards)
    assert table.num_rows == len(EXPECTED_KEPT)
    sources = {json.loads(m)["source"] for m in table.column("meta").to_pylist()}
    assert sources == EXPECTED_KEPT
    row = table.to_pylist()[0]
    assert Image.open(io.BytesIO(row["image"])).format == {"png": "PNG", "jpg": "JPEG"}[
        row["image_ext"]]
    assert read_manifest(str(out)).format == "parquet"
