"""`unclip data ingest`: import a user's images + captions into shards and a manifest.

Three source kinds are detected from the files found under SRC (local folder or s3:// prefix):

- an image folder: `<caption>/<image>` class subfolders, where a non-empty `<stem>.txt` sidecar
  overrides the folder caption (images at the root need a sidecar);
- WebDataset tar shards (img2dataset / webdataset library layout: `<key>.jpg|png|webp`,
  `<key>.txt`, optional `<key>.json`). An img2dataset output folder also holds, per shard,
  `00000.parquet` (per-sample metadata, no image bytes) and `00000_stats.json`: a Parquet
  file beside a same-stem tar is that metadata, and is ignored;
- Parquet files with an image-bytes column and a caption column.

Every image is decoded (`images.decode_image`) and re-encoded, so a broken file is caught here
and recorded in the manifest, not discovered mid-training. Too many broken files fail the whole
import, and a failed import changes nothing at OUT.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tarfile
import unicodedata
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipelines.images import IMAGE_EXTENSIONS, BadImage, decode_image, encode_image, is_lossy
from data_pipelines.shards import (
    MANIFEST_NAME,
    Manifest,
    Sample,
    ShardFormat,
    ShardWriter,
    Skipped,
    check_output_free,
    iter_webdataset_members,
    read_manifest,
)
from data_pipelines.storage import Location, StorageError, resolve

SourceKind = Literal["image_folder", "webdataset", "parquet"]
SPLITS = ("train", "test")
IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "image_bytes", "bytes")
CAPTION_COLUMNS = ("caption", "text", "txt")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# Preferred image member of a WebDataset sample when several are present.
_MEMBER_EXTS = ("jpg", "jpeg", "png", "webp", *sorted(IMAGE_EXTENSIONS))
DECODE_THREADS = min(4, os.cpu_count() or 1)

Progress = Callable[[int, int], None]  # (kept so far, skipped so far)


class IngestError(ValueError):
    """An import that cannot (or must not) complete; the message is one line for the user."""


@dataclass
class RawImage:
    """One source image before decoding."""

    source: str  # relative path, or `<shard>:<key>` / `<parquet file>:<row>`
    data: bytes
    caption: str
    caption_source: str  # "folder" | "sidecar" | "shard" | "parquet"
    group: str  # readable key prefix: class folder or shard name
    stem: str
    meta: dict = field(default_factory=dict)


Record = RawImage | Skipped


def ingest(
    src: str,
    out: str,
    *,
    fmt: ShardFormat = "webdataset",
    samples_per_shard: int = 1000,
    test_fraction: float = 0.1,
    max_skip_fraction: float = 0.01,
    seed: int = 0,
    overwrite: bool = False,
    image_column: str | None = None,
    caption_column: str | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Import SRC into train/test shards at OUT; returns the manifest written last.

    Shards go to a hidden staging folder inside OUT and are moved into place only once the
    import has passed its checks, so a failed import leaves OUT (and any dataset there, even
    with `overwrite`) as it was.
    """
    _check_options(fmt, samples_per_shard, test_fraction, max_skip_fraction)
    source, target = resolve(src), resolve(out)
    check_output_free(target, overwrite)
    kind, entries = find_source_files(source, exclude=target)
    records = _records(kind, source, entries, image_column, caption_column)
    staging = target.join(f".ingest-staging-{uuid.uuid4().hex[:12]}")
    writers = {split: ShardWriter(staging, split, fmt, samples_per_shard) for split in SPLITS}
    try:
        skipped = _write_samples(records, writers, seed, test_fraction, progress)
        manifest = Manifest(
            format=fmt,
            splits={split: writer.info for split, writer in writers.items()},
            skipped=skipped,
            source=src,
            extra={"kind": kind, "seed": seed, "test_fraction": test_fraction},
        )
        _check_result(manifest, src, max_skip_fraction)
    except BaseException:
        with contextlib.suppress(StorageError):  # keep the original error in front
            staging.delete()
        raise
    publish(staging, target, manifest)
    return manifest


def _check_options(fmt: str, samples_per_shard: int, test_fraction: float,
                   max_skip_fraction: float) -> None:
    if fmt not in ("webdataset", "parquet"):
        raise IngestError(f"unknown shard format {fmt!r}; use 'webdataset' or 'parquet'")
    if samples_per_shard < 1:
        raise IngestError(f"samples_per_shard={samples_per_shard} must be at least 1")
    if not 0.0 <= test_fraction < 1.0:
        raise IngestError(f"test_fraction={test_fraction} must be in [0, 1)")
    if not 0.0 <= max_skip_fraction <= 1.0:
        raise IngestError(f"max_skip_fraction={max_skip_fraction} must be in [0, 1]")


# ---------------------------------------------------------------- finding the source files


def find_source_files(source: Location, exclude: Location | None = None
                      ) -> tuple[SourceKind, list[tuple[str, str]]]:
    """The source kind and its visible files as (filesystem path, path relative to SRC)."""
    if not source.exists():
        raise IngestError(f"source {source.uri} does not exist")
    if exclude is not None and exclude.path.rstrip("/") == source.path.rstrip("/"):
        raise IngestError(f"--out {exclude.uri} is the source itself; choose another folder")
    entries = [e for e in list_entries(source) if not is_hidden(e[1])]
    if exclude is not None:
        inside_out = exclude.path.rstrip("/") + "/"
        entries = [e for e in entries if not e[0].startswith(inside_out)]
    metadata = img2dataset_metadata([rel for _, rel in entries])
    entries = [e for e in entries if e[1] not in metadata]
    kinds = {kind for kind in map(_kind_of, (rel for _, rel in entries)) if kind}
    if not kinds:
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise IngestError(
            f"no images in {source.uri}: expected image files ({extensions}), "
            "WebDataset .tar shards or .parquet files"
        )
    if len(kinds) > 1:
        raise IngestError(
            f"{source.uri} mixes {' and '.join(sorted(kinds))} files; point SRC at one kind"
        )
    return kinds.pop(), entries


def img2dataset_metadata(rels: list[str]) -> set[str]:
    """The per-shard metadata img2dataset writes beside `00000.tar`: `00000.parquet` (key,
    caption, status, ...; no image bytes) and `00000_stats.json`."""
    shard_stems = {tar_stem(rel) for rel in rels if rel.lower().endswith(TAR_SUFFIXES)}
    return {rel for rel in rels
            if (rel.lower().endswith(".parquet") and rel.rsplit(".", 1)[0] in shard_stems)
            or (rel.endswith("_stats.json") and rel[: -len("_stats.json")] in shard_stems)}


def tar_stem(rel: str) -> str:
    """`a/00000` for `a/00000.tar` (or .tar.gz, .tgz)."""
    lower = rel.lower()
    suffix = next(s for s in TAR_SUFFIXES if lower.endswith(s))
    return rel[: -len(suffix)]


def list_entries(source: Location) -> list[tuple[str, str]]:
    if not source.is_dir():  # a single shard or Parquet file
        return [(source.path, source.path.rsplit("/", 1)[-1])]
    prefix = source.path.rstrip("/") + "/"
    return [(path, path[len(prefix):]) for path in source.list_files(recursive=True)]


def is_hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def _kind_of(rel: str) -> SourceKind | None:
    name = rel.lower()
    if name.endswith(TAR_SUFFIXES):
        return "webdataset"
    if name.endswith(".parquet"):
        return "parquet"
    if _extension(name) in IMAGE_EXTENSIONS:
        return "image_folder"
    return None


def _extension(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[-1].lower() if "." in base else ""


def _records(kind: SourceKind, source: Location, entries: list[tuple[str, str]],
             image_column: str | None, caption_column: str | None) -> Iterator[Record]:
    if kind == "image_folder":
        return _folder_records(source, entries)
    if kind == "webdataset":
        return _webdataset_records(source, entries)
    return _parquet_records(source, entries, image_column, caption_column)


def _read(source: Location, fs_path: str) -> bytes:
    return Location(source.uri_for(fs_path), source.filesystem, fs_path).read_bytes()


def clean_caption(text: str) -> str:
    """One line of text: BOM dropped, runs of whitespace (newlines included) made one space."""
    return " ".join(text.lstrip("\ufeff").split())


def _decode_text(data: bytes) -> str:
    return clean_caption(data.decode("utf-8", errors="replace"))


# ---------------------------------------------------------------- image folders


def _folder_records(source: Location, entries: list[tuple[str, str]]) -> Iterator[Record]:
    paths = {rel: fs_path for fs_path, rel in entries}
    for rel, fs_path in sorted(paths.items()):
        if _kind_of(rel) != "image_folder":
            continue  # READMEs, notes, sidecars themselves: not samples
        stem_rel = rel.rsplit(".", 1)[0]
        try:
            caption, caption_source = _folder_caption(source, paths.get(stem_rel + ".txt"), rel)
            data = _read(source, fs_path) if caption else b""
        except StorageError as exc:
            yield Skipped(rel, f"unreadable: {exc}")
            continue
        if not caption:
            yield Skipped(rel, "no caption")
            continue
        group = rel.split("/", 1)[0] if "/" in rel else ""
        yield RawImage(rel, data, caption, caption_source, group, stem_rel.rsplit("/", 1)[-1])


def _folder_caption(source: Location, sidecar_path: str | None, rel: str) -> tuple[str, str]:
    """The sidecar text when non-empty, else the top-level class folder's name."""
    if sidecar_path is not None:
        text = _decode_text(_read(source, sidecar_path))
        if text:
            return text, "sidecar"
    if "/" in rel:
        return clean_caption(rel.split("/", 1)[0]), "folder"
    return "", ""


# ---------------------------------------------------------------- WebDataset shards


def _webdataset_records(source: Location, entries: list[tuple[str, str]]) -> Iterator[Record]:
    for fs_path, rel in sorted(entries, key=lambda e: e[1]):
        if _kind_of(rel) != "webdataset":
            continue
        try:
            groups = iter_webdataset_members(_read(source, fs_path))
            for key, members in groups:
                yield from _webdataset_sample(rel, key, members)
        except (tarfile.TarError, EOFError, OSError) as exc:
            yield Skipped(rel, f"corrupt shard: {exc}")


def _webdataset_sample(shard: str, key: str, members: dict[str, bytes]) -> Iterator[Record]:
    ext = next((e for e in _MEMBER_EXTS if e in members), None)
    if ext is None:
        return  # a group without an image (e.g. a stray .json): nothing to import
    meta = _json_dict(members.get("json", b""))
    caption = _decode_text(members["txt"]) if "txt" in members else ""
    caption = caption or clean_caption(str(meta.get("caption") or ""))
    source = f"{shard}:{key}"
    if not caption:
        yield Skipped(source, "no caption")
        return
    kept_meta = {name: meta[name] for name in ("url", "key") if name in meta}
    group = shard.rsplit("/", 1)[-1].split(".", 1)[0]
    yield RawImage(source, members[ext], caption, "shard", group, key, kept_meta)


def _json_dict(data: bytes) -> dict:
    try:
        value = json.loads(data.decode("utf-8", errors="replace")) if data else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


# ---------------------------------------------------------------- Parquet files


def _parquet_records(source: Location, entries: list[tuple[str, str]],
                     image_column: str | None, caption_column: str | None) -> Iterator[Record]:
    for fs_path, rel in sorted(entries, key=lambda e: e[1]):
        if _kind_of(rel) != "parquet":
            continue
        try:
            parquet = pq.ParquetFile(pa.BufferReader(_read(source, fs_path)))
        except (pa.ArrowException, OSError) as exc:
            yield Skipped(rel, f"corrupt parquet file: {exc}")
            continue
        columns = pick_columns(parquet.schema_arrow.names, image_column, caption_column, rel)
        yield from _parquet_rows(parquet, rel, *columns)


def pick_columns(names: list[str], image_column: str | None, caption_column: str | None,
                 where: str) -> tuple[str, str]:
    """The (image, caption) column names: the explicit ones, else the first known name found."""
    image = image_column or next((n for n in IMAGE_COLUMNS if n in names), None)
    caption = caption_column or next((n for n in CAPTION_COLUMNS if n in names), None)
    for role, name, flag in (("image", image, "--image-column"),
                             ("caption", caption, "--caption-column")):
        if name is None or name not in names:
            raise IngestError(
                f"{where}: no {role} column {name or ''} among columns {names}; "
                f"name it with {flag}"
            )
    return image, caption


def _parquet_rows(parquet: pq.ParquetFile, rel: str, image_column: str,
                  caption_column: str) -> Iterator[Record]:
    row = 0
    group = rel.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    for batch in parquet.iter_batches(batch_size=64, columns=[image_column, caption_column]):
        for image, caption in zip(*(batch.column(i).to_pylist() for i in range(2)), strict=True):
            source = f"{rel}:{row}"
            row += 1
            data = image.get("bytes") if isinstance(image, dict) else image  # HF struct
            text = caption.decode("utf-8", "replace") if isinstance(caption, bytes) else caption
            text = clean_caption(str(text or ""))
            if not data:
                yield Skipped(source, "empty file")
            elif not text:
                yield Skipped(source, "no caption")
            else:
                yield RawImage(source, bytes(data), text, "parquet", group, f"row{row - 1}")


# ---------------------------------------------------------------- decoding and writing


@dataclass
class _Encoded:
    raw: RawImage
    image: bytes
    ext: str
    size: tuple[int, int]


def _write_samples(records: Iterable[Record], writers: dict[str, ShardWriter], seed: int,
                   test_fraction: float, progress: Progress | None) -> list[Skipped]:
    keys = KeyAllocator()
    skipped: list[Skipped] = []
    kept = 0
    for result in ordered_thread_map(normalise, records):
        if isinstance(result, Skipped):
            skipped.append(result)
        else:
            sample = _to_sample(result, keys)
            writers[assign_split(sample.key, seed, test_fraction)].add(sample)
            kept += 1
        if progress is not None:
            progress(kept, len(skipped))
    for writer in writers.values():
        writer.flush()
    return skipped


def ordered_thread_map(fn: Callable, items: Iterable, workers: int = DECODE_THREADS,
                       window: int = 8 * DECODE_THREADS) -> Iterator:
    """fn over items on a few threads (PIL releases the GIL while coding pixels), results in
    input order so shards are identical run to run; at most `window` items in flight."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def normalise(record: Record) -> _Encoded | Skipped:
    """Decode and re-encode one image: JPEG stays JPEG, everything else becomes PNG."""
    if isinstance(record, Skipped):
        return record
    try:
        image = decode_image(record.data)
    except BadImage as exc:
        return Skipped(record.source, str(exc))
    ext = "jpg" if is_lossy(record.data) else "png"
    return _Encoded(record, encode_image(image, ext), ext, image.size)


def _to_sample(encoded: _Encoded, keys: KeyAllocator) -> Sample:
    raw = encoded.raw
    width, height = encoded.size
    meta = {"source": raw.source, "caption_source": raw.caption_source,
            "width": width, "height": height, **raw.meta}
    key = keys.allocate(raw.group, raw.stem, raw.source)
    return Sample(key, encoded.image, encoded.ext, raw.caption, meta)


def slug(text: str, limit: int = 40) -> str:
    """Lowercase ASCII letters/digits joined by '-': safe in tar member names and URLs."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")[:limit].strip("-")


class KeyAllocator:
    """Readable, unique sample keys: `<group-slug>-<stem-slug>-<hash of the source>`."""

    def __init__(self) -> None:
        self._used: set[str] = set()

    def allocate(self, group: str, stem: str, source: str) -> str:
        digest = hashlib.sha1(source.encode("utf-8")).hexdigest()[:10]
        base = "-".join(p for p in (slug(group), slug(stem), digest) if p)
        key, n = base, 1
        while key in self._used:  # only on a hash collision
            key, n = f"{base}-{n}", n + 1
        self._used.add(key)
        return key


def assign_split(key: str, seed: int, test_fraction: float) -> str:
    """"test" when sha1(seed, key) falls below test_fraction: stable across runs and machines."""
    digest = hashlib.sha1(f"{seed}:{key}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"


def _check_result(manifest: Manifest, src: str, max_skip_fraction: float) -> None:
    kept, skipped = manifest.num_samples, manifest.num_skipped
    total = kept + skipped
    if total == 0:
        raise IngestError(f"no images found in {src}")
    if skipped / total > max_skip_fraction:
        reasons = "; ".join(f"{s.source}: {s.reason}" for s in manifest.skipped[:3])
        raise IngestError(
            f"{skipped} of {total} images skipped ({100 * skipped / total:.1f}%) exceeds "
            f"max_skip_fraction={max_skip_fraction}; first reasons: {reasons}; "
            "raise the budget with --max-skip-fraction or fix the source"
        )
    if kept == 0:
        raise IngestError(f"none of the {total} images in {src} could be used")


# ---------------------------------------------------------------- publishing


def publish(staging: Location, target: Location, manifest: Manifest) -> None:
    """Move staged shards into place, replacing any old dataset, and write the manifest last.

    The old manifest goes first, so a crash midway leaves a visibly incomplete dataset rather
    than an old manifest pointing at new shards.
    """
    old_shards = _existing_shards(target)
    target.join(MANIFEST_NAME).delete()
    new_shards = [s for info in manifest.splits.values() for s in info.shards]
    for name in new_shards:
        _move(staging.join(name), target.join(name))
    for name in set(old_shards) - set(new_shards):
        target.join(name).delete()
    staging.delete()
    target.join(MANIFEST_NAME).write_text(manifest.to_json())


def _existing_shards(target: Location) -> list[str]:
    if not target.join(MANIFEST_NAME).exists():
        return []
    try:
        old = read_manifest(target.uri)
    except StorageError:
        return []  # unreadable old manifest: nothing we can safely name for deletion
    if old.layout == "indexed":
        return []  # an index's shards are the user's own files, never ours to delete
    return [s for info in old.splits.values() for s in info.shards]


def _move(src: Location, dst: Location) -> None:
    try:
        if not dst.is_s3:
            Path(dst.path).parent.mkdir(parents=True, exist_ok=True)
        dst.filesystem.move(src.path, dst.path)  # a rename locally, copy + delete on S3
    except OSError as exc:
        raise StorageError(f"could not move {src.uri} to {dst.uri}: {exc}") from None
