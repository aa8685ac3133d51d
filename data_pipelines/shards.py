"""Shard files and the dataset manifest.

A dataset is a folder (local or S3) holding, per split, WebDataset tar shards
`<split>/part-00000.tar` (members `<key>.png|jpg`, `<key>.txt`, `<key>.json`) or Parquet shards
`<split>/part-00000.parquet` (columns key, image, image_ext, caption, meta), and a
`manifest.json` at the root. The manifest is written last: a dataset without one is incomplete.

An indexed dataset (`unclip data index`, layout "indexed") is only a manifest over WebDataset
shards that stay where they are: its shard entries are relative to the manifest's folder when
the shards lie under it, otherwise absolute URIs (`s3://bucket/x/00000.tar`, `/data/00000.tar`).
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tarfile
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipelines.storage import (
    Location,
    StorageError,
    describe_error,
    is_s3_uri,
    resolve,
    s3_endpoint,
    s3_region,
)

MANIFEST_NAME = "manifest.json"
ShardFormat = Literal["webdataset", "parquet"]
# "written": shards this project wrote under the dataset root; "indexed": shards indexed in place
ManifestLayout = Literal["written", "indexed"]
LAYOUTS = ("written", "indexed")
SHARD_SUFFIX = {"webdataset": ".tar", "parquet": ".parquet"}
# Image members a streamed WebDataset sample can use, in order of preference.
STREAM_IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


@dataclass
class Sample:
    key: str
    image: bytes  # encoded PNG/JPEG bytes
    image_ext: str  # "png" | "jpg"
    caption: str
    meta: dict = field(default_factory=dict)


@dataclass
class Skipped:
    source: str
    reason: str


@dataclass
class SplitInfo:
    num_samples: int = 0
    shards: list[str] = field(default_factory=list)  # relative to the dataset root
    # One entry per shard of an index, as listed when it was indexed ({"size", "mtime_ns"},
    # plus "etag" on S3): the user's shards can change after indexing, and training, resume
    # and evaluation must not read other bytes than those counted. Empty for written datasets.
    shard_stats: list[dict] = field(default_factory=list)
    # samples in each shard, aligned with `shards`: lets training split the train set between
    # workers by sample rather than by whole shard. Empty in manifests written before it.
    shard_samples: list[int] = field(default_factory=list)


@dataclass
class Manifest:
    format: ShardFormat
    splits: dict[str, SplitInfo]
    skipped: list[Skipped] = field(default_factory=list)
    source: str = ""
    extra: dict = field(default_factory=dict)  # builder-specific facts (e.g. held-out pairs)
    created_unix: float = field(default_factory=time.time)
    layout: ManifestLayout = "written"

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.splits.values())

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def to_json(self) -> str:
        body = {
            "format": self.format,
            "layout": self.layout,
            "num_samples": self.num_samples,
            "num_skipped": self.num_skipped,
            "splits": {name: asdict(info) for name, info in self.splits.items()},
            "skipped": [asdict(s) for s in self.skipped],
            "source": self.source,
            "extra": self.extra,
            "created_unix": self.created_unix,
        }
        return json.dumps(body, indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        body = json.loads(text)
        layout = body.get("layout", "written")  # manifests from before indexing had none
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")
        return cls(
            format=body["format"],
            splits={k: SplitInfo(**v) for k, v in body["splits"].items()},
            skipped=[Skipped(**s) for s in body.get("skipped", [])],
            source=body.get("source", ""),
            extra=body.get("extra", {}),
            created_unix=body.get("created_unix", 0.0),
            layout=layout,
        )


STAT_FIELDS = ("size", "mtime_ns", "etag")  # what a shard's listing must still say


def shard_name(split: str, index: int, fmt: ShardFormat) -> str:
    return f"{split}/part-{index:05d}{SHARD_SUFFIX[fmt]}"


def encode_webdataset_shard(samples: list[Sample]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for s in samples:
            members = (
                (f"{s.key}.{s.image_ext}", s.image),
                (f"{s.key}.txt", s.caption.encode("utf-8")),
                (f"{s.key}.json", json.dumps(s.meta).encode("utf-8")),
            )
            for name, payload in members:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                info.mtime = 0  # byte-identical shards for identical inputs
                tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def encode_parquet_shard(samples: list[Sample]) -> bytes:
    table = pa.table({
        "key": [s.key for s in samples],
        "image": pa.array([s.image for s in samples], type=pa.binary()),
        "image_ext": [s.image_ext for s in samples],
        "caption": [s.caption for s in samples],
        "meta": [json.dumps(s.meta) for s in samples],
    })
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def write_shard(root: Location, split: str, index: int, samples: list[Sample],
                fmt: ShardFormat) -> str:
    """Write one shard; returns its path relative to the dataset root."""
    name = shard_name(split, index, fmt)
    encode = encode_webdataset_shard if fmt == "webdataset" else encode_parquet_shard
    root.join(name).write_bytes(encode(samples))
    return name


class ShardWriter:
    """Streams samples of one split into fixed-size shards."""

    def __init__(self, root: Location, split: str, fmt: ShardFormat, samples_per_shard: int):
        self.root, self.split, self.fmt = root, split, fmt
        self.samples_per_shard = samples_per_shard
        self.info = SplitInfo()
        self._pending: list[Sample] = []

    def add(self, sample: Sample) -> None:
        self._pending.append(sample)
        if len(self._pending) >= self.samples_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        index = len(self.info.shards)
        self.info.shards.append(write_shard(self.root, self.split, index, self._pending, self.fmt))
        self.info.num_samples += len(self._pending)
        self.info.shard_samples.append(len(self._pending))
        self._pending = []


def read_manifest(uri: str) -> Manifest:
    root = resolve(uri)
    location = root.join(MANIFEST_NAME)
    if not location.exists():
        raise StorageError(
            f"no dataset at {uri} ({MANIFEST_NAME} missing); build one with "
            "`unclip data shapes --out URI` or `unclip data ingest SRC --out URI`"
        )
    try:
        return Manifest.from_json(location.read_text())
    except (KeyError, ValueError, TypeError) as exc:
        raise StorageError(f"{location.uri} is not a valid manifest: {exc}") from None


def shard_location(root: Location, entry: str) -> Location:
    """Where a split's shard entry points: an absolute URI or path as is, else under `root`."""
    if is_s3_uri(entry) or entry.startswith("/"):
        return resolve(entry)
    return root.join(entry)


def check_manifest_shards(uri: str, manifest: Manifest, splits: tuple[str, ...] | None = None
                          ) -> None:
    """StorageError (one line) when the manifest disagrees with its shards: a split that counts
    samples but lists no shard, a listed shard that is missing or empty, or a shard of an
    index that changed since it was indexed. Each shard folder is listed once (one listing
    instead of a request per shard, which matters on S3)."""
    root = resolve(uri)
    for split, info in manifest.splits.items():
        if splits is not None and split not in splits:
            continue
        if info.num_samples and not info.shards:
            raise StorageError(
                f"dataset {uri}: {MANIFEST_NAME} counts {info.num_samples} '{split}' samples "
                "but lists no shards; rebuild the dataset (or its index)")
        locations = [shard_location(root, entry) for entry in info.shards]
        listed = listed_files(locations, with_etag=bool(info.shard_stats))
        missing = [loc for loc in locations if _key(loc) not in listed]
        empty = [loc for loc in locations if listed.get(_key(loc), {}).get("size") == 0]
        for problem, found in (("missing", missing), ("empty", empty)):
            if found:
                raise StorageError(
                    f"dataset {uri}: {MANIFEST_NAME} lists {len(found)} '{split}' shard(s) "
                    f"that are {problem} (first: {found[0].uri}); restore them, or rebuild "
                    "the dataset (or its index) so the manifest matches the shards")
        for location, recorded in zip(locations, info.shard_stats, strict=False):
            _check_unchanged(uri, location, recorded, listed[_key(location)])


def _check_unchanged(uri: str, location: Location, recorded: dict, now: dict) -> None:
    changed = [f"{name} {recorded[name]} -> {now.get(name)}" for name in STAT_FIELDS
               if name in recorded and recorded[name] != now.get(name)]
    if changed:
        raise StorageError(
            f"dataset {uri}: shard {location.uri} changed after it was indexed "
            f"({', '.join(changed)}); index it again (`unclip data index ... --overwrite`) "
            "so counts, splits and resume positions match its bytes")


def shard_stats(locations: list[Location]) -> list[dict]:
    """Size, modification time and (S3) ETag of each shard, as a listing reports them."""
    listed = listed_files(locations, with_etag=True)
    return [listed[_key(location)] for location in locations]


def _key(location: Location) -> tuple[bool, str]:
    return location.is_s3, posixpath.normpath(location.path)


def listed_files(locations: list[Location], *, with_etag: bool = False
                 ) -> dict[tuple[bool, str], dict]:
    """(is_s3, path) -> {"size", "mtime_ns"[, "etag"]} of the files in the folders holding
    `locations`, one listing per folder (through boto3 on S3 when ETags are wanted)."""
    folders: dict[tuple[bool, str], Location] = {}
    for location in locations:
        folder = posixpath.dirname(posixpath.normpath(location.path))
        folders.setdefault((location.is_s3, folder), location)
    files: dict[tuple[bool, str], dict] = {}
    for (is_s3, folder), location in folders.items():
        try:
            listing = (_s3_listing(folder) if is_s3 and with_etag
                       else _pyarrow_listing(location, folder))
            listing = list(listing)
        except OSError as exc:
            raise StorageError(describe_error(exc, location.uri)) from None
        files.update({(is_s3, posixpath.normpath(path)): stat for path, stat in listing})
    return files


def _pyarrow_listing(location: Location, folder: str):
    from pyarrow import fs

    for info in location.filesystem.get_file_info(
            fs.FileSelector(folder, recursive=False, allow_not_found=True)):
        if info.type == fs.FileType.File:
            yield info.path, {"size": info.size, "mtime_ns": info.mtime_ns}


def _s3_listing(folder: str):
    """ListObjectsV2 through boto3, which reports each object's ETag (pyarrow does not)."""
    import boto3
    import botocore.exceptions

    bucket, _, prefix = folder.partition("/")
    client = boto3.client("s3", endpoint_url=s3_endpoint(), region_name=s3_region())
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix.rstrip("/") + "/" if prefix else "", Delimiter="/")
    try:
        for page in pages:
            for item in page.get("Contents", []):
                yield f"{bucket}/{item['Key']}", {
                    "size": item["Size"], "etag": item["ETag"].strip('"'),
                    "mtime_ns": int(item["LastModified"].timestamp()) * 10**9}
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "NoSuchBucket":
            return
        raise OSError(str(exc)) from None
    except botocore.exceptions.BotoCoreError as exc:  # no endpoint, no credentials, ...
        raise OSError(str(exc)) from None


def manifest_hash(uri: str) -> str:
    """A short hash of the dataset's manifest, for lineage tags and the evaluator's cache key.

    Everything but the build time goes in: shards are byte-identical for identical inputs, so
    rebuilding a dataset from the same recipe keeps its identity (its evaluator, and the
    numbers a release was scored with, stay comparable)."""
    body = json.loads(resolve(uri).join(MANIFEST_NAME).read_bytes())
    body.pop("created_unix", None)
    for split in body.get("splits", {}).values():  # derived from the shards' bytes: a dataset
        split.pop("shard_samples", None)          # rebuilt by a newer version keeps its identity
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def check_output_free(out: Location, overwrite: bool) -> None:
    """Refuse to write over an existing dataset unless asked, before any work starts."""
    if out.join(MANIFEST_NAME).exists() and not overwrite:
        raise StorageError(
            f"{out.uri} already holds a dataset; choose another --out or pass --overwrite"
        )


def iter_webdataset_members(data: bytes):
    """Yield (key, {ext: bytes}) groups from a tar shard, in file order."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        group_key, group = None, {}
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            if base.startswith("."):
                continue
            prefix = member.name.rsplit("/", 1)[0] + "/" if "/" in member.name else ""
            key, _, ext = base.partition(".")
            key = prefix + key
            if key != group_key and group:
                yield group_key, group
                group = {}
            group_key = key
            extracted = tar.extractfile(member)
            group[ext.lower()] = extracted.read() if extracted else b""
        if group:
            yield group_key, group
