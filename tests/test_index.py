"""`unclip data index`: existing WebDataset shards (webdataset's TarWriter, img2dataset's output
folder; local and S3) indexed in place and streamed through `image_caption_dataset`."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import pytest
from PIL import Image
from webdataset_fixtures import (
    img2dataset_key,
    jpeg,
    write_img2dataset,
    write_tarwriter_shard,
)

from data_pipelines.index import (
    IndexingError,
    count_tar_samples,
    default_index_uri,
    index_shards,
)
from data_pipelines.ingest import ingest
from data_pipelines.inspect_dataset import inspect_dataset
from data_pipelines.settings import PreprocessSettings
from data_pipelines.shards import MANIFEST_NAME, read_manifest
from data_pipelines.storage import StorageError, resolve
from data_pipelines.streaming import image_caption_dataset, shard_uris

SETTINGS = PreprocessSettings(image_size=16, context_length=16)


def streamed(uri: str, split: str) -> dict[str, str]:
    """{key: caption} of every sample that streaming yields for one split."""
    rows = image_caption_dataset(uri, split, SETTINGS, train=False).take_all()
    assert all(row["image"].shape == (3, 16, 16) for row in rows)
    return {row["key"]: row["caption"] for row in rows}


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def sample(key: str, caption: str, seed: int, ext: str = "jpg", image: bytes | None = None):
    return {"__key__": key, ext: image if image is not None else jpeg(seed), "txt": caption,
            "json": {"caption": caption}}


@pytest.fixture
def tarwriter_shards(tmp_path: Path) -> Path:
    """4 shards by `wds.TarWriter`: 11 samples with an image (one of them a PNG, one not an
    image at all), a json-only group that is no sample, plus files an index ignores."""
    src = tmp_path / "wds shards"
    src.mkdir()
    png = io.BytesIO()
    Image.new("RGB", (16, 16), (0, 0, 255)).save(png, format="PNG")
    shards = {
        "00000.tar": [sample(f"a{i}", f"apple {i}", i) for i in range(3)],
        "00001.tar": [sample("b0", "banana 0", 10), sample("b1", "banana 1", 11),
                      sample("b2", "blue banana", 0, ext="png", image=png.getvalue()),
                      {"__key__": "b3", "json": {"note": "no image"}}],
        "00002.tar": [sample("c0", "cherry 0", 20), sample("c1", "cherry 1", 21),
                      sample("c2", "broken cherry", 0, image=b"not a jpeg")],
        "00003.tar": [sample(f"d{i}", f"date {i}", 30 + i) for i in range(2)],
    }
    for name, samples in shards.items():
        write_tarwriter_shard(str(src / name), samples)
    (src / "README.md").write_text("shards from somewhere")
    write_tarwriter_shard(str(src / ".partial.tar"), [sample("x", "hidden", 1)])
    return src


@pytest.mark.usefixtures("ray_session")
def test_tarwriter_shards_indexed_elsewhere_and_streamed_in_place(tarwriter_shards, tmp_path):
    src, out = tarwriter_shards, tmp_path / "index"
    before = files_under(src)
    manifest, uri = index_shards(str(src), str(out), test_shards=1, seed=0)
    assert uri == str(out) and files_under(src) == before  # the source is not written
    on_disk = read_manifest(str(out))
    assert on_disk.layout == "indexed" and on_disk.format == "webdataset"
    assert on_disk.source == str(src)
    # seed 0 ranks 00000.tar first: it is the test shard; entries are absolute paths
    assert on_disk.splits["test"].shards == [str(src / "00000.tar")]
    assert on_disk.splits["train"].shards == [str(src / f"0000{i}.tar") for i in (1, 2, 3)]
    assert {k: v.num_samples for k, v in on_disk.splits.items()} == {"train": 8, "test": 3}
    assert on_disk.extra == {"kind": "webdataset", "seed": 0, "test_shards": 1,
                             "counted_from": {"stats": 0, "tar_headers": 4}}
    assert on_disk.skipped == []
    # the broken JPEG is counted (it is a sample) but dropped by the decode, within budget
    assert streamed(str(out), "train") == {
        "b0": "banana 0", "b1": "banana 1", "b2": "blue banana", "c0": "cherry 0",
        "c1": "cherry 1", "d0": "date 0", "d1": "date 1"}
    assert streamed(str(out), "test") == {"a0": "apple 0", "a1": "apple 1", "a2": "apple 2"}
    # a training epoch's stream over the indexed shards (seeded shard order and window
    # shuffle, augmentation) repeats exactly: what resuming at a saved position relies on
    from data_pipelines.resumable import Position, StreamPlan, TrainStream
    from data_pipelines.shards import shard_location

    shards = tuple(shard_location(resolve(str(out)), name).uri
                   for name in read_manifest(str(out)).splits["train"].shards)
    stream = TrainStream(StreamPlan(shards, "webdataset", "indexed", 3, 1, 8, 1.0),
                         ("image",), SETTINGS)
    epochs = [stream.dataset(0, Position(epoch=1)).take_all() for _ in range(2)]
    assert [r["key"] for r in epochs[0]] == [r["key"] for r in epochs[1]]
    assert all((a["image"] == b["image"]).all() for a, b in zip(*epochs, strict=True))
    other_seed, _ = index_shards(str(src), str(tmp_path / "seed1"), test_shards=1, seed=1)
    assert other_seed.splits["test"].shards == [str(src / "00002.tar")]


@pytest.mark.usefixtures("ray_session")
def test_img2dataset_folder_indexed_through_the_cli(run_cli, tmp_path):
    src, out = tmp_path / "laion-mini", tmp_path / "idx"
    captions = write_img2dataset(str(src), [4, 3, 5])
    before = files_under(src)
    code, stdout, stderr = run_cli("data", "index", str(src), "--out", str(out),
                                   "--test-shards", "1")
    assert code == 0, stderr
    assert stderr == (f"indexed 12 samples (train 8 in 2 shard(s), test 4 in 1 shard(s)) at "
                      f"{out}/manifest.json; train on them with --set data.uri={out}\n")
    assert stdout == "" and files_under(src) == before
    manifest = read_manifest(str(out))
    assert manifest.extra == {"kind": "img2dataset", "seed": 0, "test_shards": 1,
                              "counted_from": {"stats": 3, "tar_headers": 0}}
    assert manifest.splits["test"].shards == [str(src / "00000.tar")]  # seed 0 ranks it first
    in_test = {img2dataset_key(0, row) for row in range(4)}
    assert streamed(str(out), "test") == {k: v for k, v in captions.items() if k in in_test}
    assert streamed(str(out), "train") == {k: v for k, v in captions.items() if k not in in_test}
    # what training checks first accepts the index as a dataset
    from orchestration.common.data_check import ensure_dataset
    from orchestration.config import load_config

    config = load_config("tiny", [f"data.uri={out}", "data.build_shapes_if_missing=false"])
    assert ensure_dataset(config).splits["train"].num_samples == 8


@pytest.mark.usefixtures("ray_session")
def test_s3_img2dataset_indexed_on_s3_streamed_and_ingested(s3_bucket, tmp_path):
    src, out = f"{s3_bucket}/laion", f"{s3_bucket}/indexes/laion"
    captions = write_img2dataset(src, [4, 3, 5])
    manifest, uri = index_shards(src, out, test_fraction=0.34)  # 3 shards -> 1 test shard
    assert uri == out
    assert read_manifest(out).splits == manifest.splits
    assert manifest.splits["test"].shards == [f"{src}/00000.tar"]
    assert manifest.splits["train"].shards == [f"{src}/00001.tar", f"{src}/00002.tar"]
    assert manifest.splits["train"].num_samples == 8
    in_train = {img2dataset_key(s, r) for s, n in ((1, 3), (2, 5)) for r in range(n)}
    assert streamed(out, "train") == {k: v for k, v in captions.items() if k in in_train}
    # a local index of the S3 shards lists the same URIs and reads them from S3
    local, _ = index_shards(src, str(tmp_path / "local-index"), test_fraction=0.34)
    assert local.splits == manifest.splits
    filesystem, paths, _ = shard_uris(str(tmp_path / "local-index"), "train")
    assert filesystem.type_name == "s3"
    assert paths == [f"{src[len('s3://'):]}/00001.tar", f"{src[len('s3://'):]}/00002.tar"]
    # the same S3 folder imported by ingest: the metadata Parquet files are not samples
    imported = ingest(src, str(tmp_path / "copy"), test_fraction=0.0)
    assert (imported.num_samples, imported.num_skipped) == (12, 0)
    assert imported.extra["kind"] == "webdataset"


def test_index_written_into_the_source_uses_relative_entries(tmp_path):
    src = tmp_path / "shards"
    write_img2dataset(str(src), [2, 2, 2], failed_per_shard=0)
    manifest, uri = index_shards(str(src), str(src / MANIFEST_NAME), test_shards=1, seed=2)
    assert uri == str(src)
    assert manifest.splits["train"].shards == ["00001.tar", "00002.tar"]
    assert manifest.splits["test"].shards == ["00000.tar"]
    report = inspect_dataset(str(src), contact_sheet=None)
    assert report["layout"] == "indexed" and report["captions"]["measured"] == 6
    with pytest.raises(StorageError, match="already holds a dataset; choose another --out or "
                                           "pass --overwrite"):
        index_shards(str(src), str(src))
    # replacing this index with an ingested dataset never deletes the user's shards
    images = tmp_path / "images" / "a cat"
    images.mkdir(parents=True)
    (images / "one.jpg").write_bytes(jpeg(1))
    ingest(str(tmp_path / "images"), str(src), overwrite=True, test_fraction=0.0)
    assert all((src / f"0000{i}.tar").exists() for i in range(3))
    assert read_manifest(str(src)).layout == "written"


def test_counts_from_tar_headers_corrupt_and_empty_shards(tmp_path):
    src = tmp_path / "src"
    write_img2dataset(str(src), [3, 2, 4, 1], failed_per_shard=0)
    (src / "00001_stats.json").unlink()  # counted from the tar headers instead
    (src / "00003_stats.json").write_text(json.dumps({"successes": 0}))  # an empty shard
    whole = (src / "00002.tar").read_bytes()
    (src / "00002_stats.json").unlink()
    (src / "00002.tar").write_bytes(whole[: len(whole) // 2])  # truncated mid-member
    manifest, _ = index_shards(str(src), str(tmp_path / "idx"), test_shards=0)
    assert {s.source: s.reason.split(":")[0] for s in manifest.skipped} == {
        "00002.tar": "corrupt shard", "00003.tar": "empty shard"}
    assert manifest.skipped[0].reason == "corrupt shard: unexpected end of data"
    assert manifest.splits["train"].shards == [str(src / "00000.tar"), str(src / "00001.tar")]
    assert manifest.splits["train"].num_samples == 5 and manifest.splits["test"].shards == []
    assert manifest.extra["counted_from"] == {"stats": 2, "tar_headers": 1}


def test_too_few_shards_and_other_bad_input_are_one_clear_line(tmp_path, run_cli):
    src = tmp_path / "one"
    write_img2dataset(str(src), [3])
    with pytest.raises(IndexingError) as caught:
        index_shards(str(src), str(tmp_path / "idx"))
    assert str(caught.value) == (
        f"{src} has 1 usable shard(s): too few for --test-fraction 0.1 (whole shards go to test "
        "and train needs at least one); add shards, or pass --test-shards 0 for a train-only "
        "index")
    write_img2dataset(str(tmp_path / "three"), [1, 1, 1])
    with pytest.raises(IndexingError, match=r"too few for --test-shards 3 "):
        index_shards(str(tmp_path / "three"), str(tmp_path / "idx"), test_shards=3)
    assert not (tmp_path / "idx").exists()  # nothing written before the check
    only_train, _ = index_shards(str(src), str(tmp_path / "idx"), test_shards=0)
    assert only_train.splits["train"].num_samples == 3
    with pytest.raises(StorageError) as no_test:
        image_caption_dataset(str(tmp_path / "idx"), "test", SETTINGS)
    assert str(no_test.value) == (
        f"dataset {tmp_path / 'idx'} has no 'test' shards; rebuild it with a test split "
        "(`unclip data ingest --test-fraction F` or `unclip data index --test-shards N`)")
    (tmp_path / "pictures").mkdir()
    (tmp_path / "pictures" / "a.jpg").write_bytes(jpeg(0))
    cases = [
        (["--test-fraction", "0.2", "--test-shards", "1"],
         "error: --test-fraction and --test-shards: give one of them, not both\n"),
        (["--out", str(tmp_path / "idx.json")],
         f"error: --out {tmp_path / 'idx.json'}: give the folder that will hold manifest.json, "
         "not a file name (training takes that folder as data.uri)\n"),
        (["--test-fraction", "1.5"], "error: --test-fraction 1.5: must be in [0, 1)\n"),
    ]
    for extra, message in cases:
        assert run_cli("data", "index", str(src), *extra) == (2, "", message)
    assert run_cli("data", "index", str(tmp_path / "pictures"), "--out", str(tmp_path / "x")) == (
        2, "", f"error: no WebDataset .tar shards under {tmp_path / 'pictures'}; image folders "
               "and Parquet files are imported with `unclip data ingest`\n")


def test_default_output_is_a_local_folder_never_the_source():
    assert default_index_uri("s3://bucket/datasets/LAION 400M/") == "data/indexed/laion-400m"
    assert default_index_uri("/mnt/shards/00000.tar") == "data/indexed/00000"
    assert default_index_uri("s3://bucket") == "data/indexed/bucket"


def test_manifest_with_unknown_layout_is_refused(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(
        {"format": "webdataset", "layout": "virtual", "splits": {}}))
    with pytest.raises(StorageError, match=r"is not a valid manifest: unknown layout 'virtual'"):
        read_manifest(str(tmp_path))


def test_member_keys_follow_the_webdataset_rule(tmp_path):
    """Keys are folder + name up to the first dot; groups without an image are not samples."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in ("x/k1.jpg", "x/k1.txt", "y/k1.seg.png", "k2.JPG", "k3.txt", ".k4.jpg",
                     "k5.webp", "k5.jpeg"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    (tmp_path / "s.tar").write_bytes(buffer.getvalue())
    # x/k1 (jpg) and k5 (webp + jpeg); not y/k1 (ext "seg.png"), k2 (upper case), k3, .k4
    assert count_tar_samples(resolve(str(tmp_path / "s.tar"))) == 2


def _config_for(uri: str):
    from orchestration.config import load_config

    return load_config("tiny", [f"data.uri={uri}", "data.build_shapes_if_missing=false"])


def test_a_shard_changed_after_indexing_is_refused_by_name(tmp_path):
    """Training, resume and evaluation all start from ensure_dataset: a shard whose bytes or
    modification time differ from what the index recorded stops them in one line."""
    import os

    from orchestration.common.data_check import ensure_dataset

    src = tmp_path / "shards"
    write_img2dataset(str(src), [2, 2, 2], failed_per_shard=0)
    manifest, uri = index_shards(str(src), str(tmp_path / "index"), test_shards=1, seed=2)
    stats = manifest.splits["train"].shard_stats
    assert [s["size"] for s in stats] == [(src / f"0000{i}.tar").stat().st_size for i in (1, 2)]
    assert [s["mtime_ns"] for s in stats] == [(src / f"0000{i}.tar").stat().st_mtime_ns
                                              for i in (1, 2)]
    config = _config_for(uri)
    assert ensure_dataset(config).splits["train"].shard_stats == stats  # unchanged: accepted
    shard = src / "00002.tar"
    os.utime(shard, ns=(stats[1]["mtime_ns"] + 10**9,) * 2)  # same bytes, touched
    with pytest.raises(StorageError) as touched:
        ensure_dataset(config)
    assert str(touched.value) == (
        f"dataset {uri}: shard {shard} changed after it was indexed (mtime_ns "
        f"{stats[1]['mtime_ns']} -> {stats[1]['mtime_ns'] + 10**9}); index it again "
        "(`unclip data index ... --overwrite`) so counts, splits and resume positions match "
        "its bytes")
    write_img2dataset(str(src), [2, 2, 3], failed_per_shard=0)  # rewritten with a new sample
    with pytest.raises(StorageError, match=r"shard .*0000[12].tar changed after it was indexed "
                                           r"\((size \d+ -> \d+, )?mtime_ns"):
        ensure_dataset(config)
    index_shards(str(src), uri, test_shards=1, seed=2, overwrite=True)
    assert ensure_dataset(config).splits["train"].num_samples == 5


def test_an_s3_shard_rewritten_after_indexing_is_refused_by_its_etag(s3_bucket):
    import boto3

    from orchestration.common.data_check import ensure_dataset

    src, out = f"{s3_bucket}/laion", f"{s3_bucket}/indexes/laion"
    write_img2dataset(src, [2, 2, 2], failed_per_shard=0)
    manifest, _ = index_shards(src, out, test_shards=1, seed=2)
    # pyarrow uploads in parts: the ETag is the multipart form "<md5 of part md5s>-<parts>"
    assert all(re.fullmatch(r"[0-9a-f]{32}(-\d+)?", s["etag"])
               for s in manifest.splits["train"].shard_stats)
    ensure_dataset(_config_for(out))
    bucket, key = s3_bucket[len("s3://"):], "laion/00001.tar"
    client = boto3.client("s3")
    body = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[-1] ^= 0xFF  # same size, other bytes (in the tar's zero padding)
    client.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    with pytest.raises(StorageError, match=r"shard s3://.*/laion/00001.tar changed after it was "
                                           r"indexed \(.*etag [0-9a-f]{32}-1 -> [0-9a-f]{32}"):
        ensure_dataset(_config_for(out))
