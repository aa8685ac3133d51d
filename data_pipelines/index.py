"""`unclip data index`: train on existing WebDataset shards where they are, writing only a manifest.

The shards (an img2dataset output folder, or tars from the webdataset library) are not read
or copied beyond their tar headers: the manifest lists them per split and training streams
them in place, through the same decode, bad-record budget and resumption as shards we write.

- Sample counts come from img2dataset's `<shard>_stats.json` ("successes") when present,
  otherwise from the tar headers: the distinct keys with an image member that streaming
  reads (`STREAM_IMAGE_EXTS`), seeking over the member data.
- Whole shards go to train or test (shards are not rewritten), chosen by a seeded hash of
  each shard's path, so the split is the same on every machine and run.
- Nothing is written into the source unless it is the --out folder. The default --out is
  `data/indexed/<source folder name>` under the working directory.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from data_pipelines.ingest import (
    TAR_SUFFIXES,
    is_hidden,
    list_entries,
    ordered_thread_map,
    slug,
    tar_stem,
)
from data_pipelines.shards import (
    MANIFEST_NAME,
    STREAM_IMAGE_EXTS,
    Manifest,
    Skipped,
    SplitInfo,
    check_output_free,
    shard_location,
    shard_stats,
)
from data_pipelines.storage import Location, StorageError, describe_error, resolve

DEFAULT_INDEX_ROOT = "data/indexed"
READ_AHEAD = 1 << 20  # tar headers of small members arrive many to one (S3) request
COUNT_THREADS = 8  # header reads wait on storage, not on the CPU
STATS_SUFFIX = "_stats.json"

IndexProgress = Callable[[int, int, int], None]  # (shards done, shards in all, samples so far)


class IndexingError(ValueError):
    """An index that cannot be made; the message is one line for the user."""


@dataclass
class ShardCount:
    rel: str  # path relative to SRC
    uri: str
    samples: int = 0
    counted_from: str = ""  # "stats" | "tar_headers"
    problem: str = ""


def index_shards(src: str, out: str | None = None, *, test_fraction: float = 0.1,
                 test_shards: int | None = None, seed: int = 0, overwrite: bool = False,
                 progress: IndexProgress | None = None) -> tuple[Manifest, str]:
    """Index the WebDataset shards under SRC; writes OUT/manifest.json only.

    Returns the manifest and OUT's URI (the `data.uri` to train on)."""
    _check_options(test_fraction, test_shards)
    source, target = resolve(src), resolve(index_folder(out) if out else default_index_uri(src))
    check_output_free(target, overwrite)
    shards, stats = find_shards(source, target)
    test_shard_count(len(shards), test_fraction, test_shards, source.uri)  # before any read
    counts = count_shards(shards, stats, progress)
    kept = [c for c in counts if c.samples > 0]
    if not kept:
        raise IndexingError(f"no samples in the {len(shards)} shard(s) under {source.uri}: "
                            f"{counts[0].problem}")
    num_test = test_shard_count(len(kept), test_fraction, test_shards, source.uri)
    manifest = Manifest(
        format="webdataset", layout="indexed", source=source.uri,
        splits=split_shards(kept, num_test, seed, target),
        skipped=[Skipped(c.rel, c.problem) for c in counts if c.samples == 0],
        extra=_facts(counts, stats, seed, test_fraction, test_shards),
    )
    _write_manifest(target, manifest)
    return manifest, target.uri


def _check_options(test_fraction: float, test_shards: int | None) -> None:
    if not 0.0 <= test_fraction < 1.0:
        raise IndexingError(f"--test-fraction {test_fraction}: must be in [0, 1)")
    if test_shards is not None and test_shards < 0:
        raise IndexingError(f"--test-shards {test_shards}: must be 0 or more")


def index_folder(out: str) -> str:
    """OUT names the folder that holds manifest.json; a trailing /manifest.json is accepted."""
    trimmed = out.rstrip("/")
    if trimmed.endswith("/" + MANIFEST_NAME) or trimmed == MANIFEST_NAME:
        return trimmed[: -len(MANIFEST_NAME)].rstrip("/") or "."
    if trimmed.endswith(".json"):
        raise IndexingError(f"--out {out}: give the folder that will hold {MANIFEST_NAME}, "
                            "not a file name (training takes that folder as data.uri)")
    return out


def default_index_uri(src: str) -> str:
    name = src.rstrip("/").rsplit("/", 1)[-1]
    for suffix in TAR_SUFFIXES:  # SRC may be a single shard
        name = name.removesuffix(suffix)
    return str(Path(DEFAULT_INDEX_ROOT) / (slug(name) or "dataset"))


# ---------------------------------------------------------------- finding and counting shards


def find_shards(source: Location, target: Location) -> tuple[list[ShardCount], dict[str, str]]:
    """The tar shards under SRC (sorted by path) and img2dataset stats files by shard path."""
    if not source.exists():
        raise IndexingError(f"source {source.uri} does not exist")
    # an --out folder inside SRC is not part of it (SRC itself as --out holds only a manifest)
    nested_out = target.path.rstrip("/") + "/" if target.path != source.path else None
    entries = [(path, rel) for path, rel in list_entries(source) if not is_hidden(rel)
               and not (nested_out and path.startswith(nested_out))]
    shards = sorted((ShardCount(rel, source.uri_for(path)) for path, rel in entries
                     if rel.lower().endswith(TAR_SUFFIXES)), key=lambda s: s.rel)
    if not shards:
        raise IndexingError(f"no WebDataset .tar shards under {source.uri}; image folders and "
                            "Parquet files are imported with `unclip data ingest`")
    stats = {rel[: -len(STATS_SUFFIX)]: source.uri_for(path) for path, rel in entries
             if rel.endswith(STATS_SUFFIX)}
    return shards, {s.rel: stats[tar_stem(s.rel)] for s in shards if tar_stem(s.rel) in stats}


def count_shards(shards: list[ShardCount], stats: dict[str, str],
                 progress: IndexProgress | None) -> list[ShardCount]:
    """Each shard's sample count, a few shards at a time (in order)."""
    samples = 0

    def count(shard: ShardCount) -> ShardCount:
        return _count_one(shard, stats.get(shard.rel))

    for done, shard in enumerate(ordered_thread_map(count, shards, workers=COUNT_THREADS,
                                                    window=4 * COUNT_THREADS), start=1):
        samples += shard.samples
        if progress is not None:
            progress(done, len(shards), samples)
    return shards


def _count_one(shard: ShardCount, stats_uri: str | None) -> ShardCount:
    successes = _stats_successes(stats_uri) if stats_uri else None
    if successes is not None:
        shard.samples, shard.counted_from = successes, "stats"
    else:
        try:
            shard.samples, shard.counted_from = count_tar_samples(resolve(shard.uri)), "tar_headers"
        except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
            shard.problem = f"corrupt shard: {str(exc).strip() or type(exc).__name__}"
            return shard
    if shard.samples == 0:
        shard.problem = "empty shard: no sample has an image member"
    return shard


def _stats_successes(uri: str) -> int | None:
    """img2dataset's count of samples written to the shard; None if absent or unreadable."""
    try:
        value = json.loads(resolve(uri).read_text()).get("successes")
    except (StorageError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value >= 0 else None


def count_tar_samples(shard: Location) -> int:
    """Distinct sample keys with an image member, from the tar headers (data is seeked over).
    Keys follow the WebDataset rule streaming uses: directories + the name up to its first dot."""
    keys: set[str] = set()
    try:
        with shard.filesystem.open_input_file(shard.path) as raw:
            # tarfile checks each skip lands inside the file: a truncated shard raises ReadError
            with tarfile.open(fileobj=io.BufferedReader(raw, READ_AHEAD), mode="r:*") as tar:
                for member in tar:
                    key, ext = _member_key(member)
                    if ext in STREAM_IMAGE_EXTS:
                        keys.add(key)
    except gzip.BadGzipFile:
        raise
    except OSError as exc:  # storage trouble fails the index; it does not drop the shard
        raise StorageError(describe_error(exc, shard.uri)) from None
    return len(keys)


def _member_key(member: tarfile.TarInfo) -> tuple[str, str]:
    folder, _, base = member.name.rpartition("/")
    if not member.isfile() or base.startswith(".") or "." not in base:
        return "", ""
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


# ---------------------------------------------------------------- splits and the manifest


def test_shard_count(num_shards: int, test_fraction: float, test_shards: int | None,
                     where: str) -> int:
    """Shards for the test split: --test-shards as given, else round(fraction x shards), at
    least one when the fraction is not 0; train keeps at least one shard."""
    if test_shards is not None:
        wanted, asked = test_shards, f"--test-shards {test_shards}"
    else:
        wanted = max(1, round(test_fraction * num_shards)) if test_fraction > 0 else 0
        asked = f"--test-fraction {test_fraction}"
    if wanted and wanted >= num_shards:
        raise IndexingError(
            f"{where} has {num_shards} usable shard(s): too few for {asked} (whole shards go "
            "to test and train needs at least one); add shards, or pass --test-shards 0 for a "
            "train-only index"
        )
    return wanted


def split_shards(shards: list[ShardCount], num_test: int, seed: int,
                 target: Location) -> dict[str, SplitInfo]:
    """The `num_test` shards with the smallest sha1(seed, path) are test, the rest train."""
    ranked = sorted(shards, key=lambda s: hashlib.sha1(f"{seed}:{s.rel}".encode()).digest())
    test = {s.rel for s in ranked[:num_test]}
    splits = {"train": SplitInfo(), "test": SplitInfo()}
    for shard in shards:  # already sorted by path
        info = splits["test" if shard.rel in test else "train"]
        info.shards.append(shard_entry(target, shard.uri))
        info.num_samples += shard.samples
        info.shard_samples.append(shard.samples)
    for info in splits.values():
        info.shard_stats = shard_stats([shard_location(target, e) for e in info.shards])
    return splits


def shard_entry(target: Location, shard_uri: str) -> str:
    """Relative to the manifest's folder when the shard lies under it, else the absolute URI."""
    folder = target.uri.rstrip("/") + "/"
    return shard_uri[len(folder):] if shard_uri.startswith(folder) else shard_uri


def _facts(counts: list[ShardCount], stats: dict[str, str], seed: int, test_fraction: float,
           test_shards: int | None) -> dict:
    return {
        "kind": "img2dataset" if stats else "webdataset",
        "seed": seed,
        **({"test_shards": test_shards} if test_shards is not None
           else {"test_fraction": test_fraction}),
        "counted_from": {how: sum(c.counted_from == how for c in counts)
                         for how in ("stats", "tar_headers")},
    }


def _write_manifest(target: Location, manifest: Manifest) -> None:
    try:
        target.join(MANIFEST_NAME).write_text(manifest.to_json())
    except StorageError as exc:
        raise StorageError(f"cannot write the index to {target.uri} ({exc}); pass --out with "
                           "a folder you can write to") from None
