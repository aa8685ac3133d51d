"""Exactly-once, resumable training streams: one deterministic sample order per worker rank.

Ray Data has no resumable iterator, and how Ray Train splits one stream across workers
depends on timing and locality. So each rank builds its own stream from a plan that follows
from the seed alone, after the design of MosaicML's StreamingDataset (a seeded partition of
samples over ranks, plus a record of where each rank is):

- epoch e: the shards are permuted with a generator seeded by (seed, e). Where the manifest
  counts each shard's samples, that order is cut into `world_size` equal runs of samples
  (a shard may be split between two ranks by row range), so every rank has the same number
  of samples and an epoch leaves out fewer than world_size * batch_size of them (another
  random few each epoch; `left_out` names them). Older manifests without counts fall back
  to whole shards: rank r takes every `world_size`-th shard, starting at r;
- a rank reads its shards `window_shards` at a time and permutes the samples of a window
  together (seeded by seed, e, r, window), so a dataset ingested class by class (one class
  per shard) still gives mixed batches;
- reading, permuting and decoding run as Ray Data tasks, off the training process, in order.

A rank's place is a `Position` (epoch, window, row). Resuming opens the epoch at that window
and drops its first `row` samples before they are decoded: shards before it are not read at
all, so resuming costs at most one window's read, however far the run had got.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from typing import Literal

import numpy as np

from data_pipelines.shards import iter_webdataset_members

ShardKind = Literal["webdataset", "parquet", "embeddings"]
WINDOW_COLUMN, ROW_COLUMN = "_window", "_row"  # where each sample sits in its rank's plan
BLOCK_ROWS = 256  # a window leaves its reader in blocks this size, each decoded by a task
READ_CPUS = 0.5
READ_BLOCK_BYTES = 1 << 20
WINDOWS_AHEAD = 1


Piece = tuple[str, int, int | None]  # a shard URI and the row range a rank reads of it


class DataLayoutChanged(RuntimeError):
    """A saved position means nothing in the current data layout."""


@dataclass(frozen=True)
class Position:
    epoch: int = 0
    window: int = 0
    row: int = 0  # samples of the window (in its permuted order) already consumed


@dataclass(frozen=True)
class StreamPlan:
    """What decides every rank's sample order; two plans with equal `layout()` agree."""

    shard_uris: tuple[str, ...]
    kind: ShardKind
    data_identity: str  # the manifest's hash: a rebuilt dataset invalidates positions
    seed: int
    world_size: int
    window_shards: int
    samples_per_shard: float  # average, to count an unreadable shard against the budget
    shard_samples: tuple[int, ...] | None = None  # per shard; None: ranks take whole shards

    def __post_init__(self):
        if self.shard_samples is not None:
            if sum(self.shard_samples) < self.world_size:
                raise ValueError(f"the train split has {sum(self.shard_samples)} samples but "
                                 f"scaling.num_workers is {self.world_size}; use fewer workers")
        elif len(self.shard_uris) < self.world_size:
            raise ValueError(
                f"the train split has {len(self.shard_uris)} shard(s) but scaling.num_workers "
                f"is {self.world_size}: each worker reads whole shards; rebuild the dataset with "
                "smaller shards (e.g. `--samples-per-shard`) or use fewer workers")

    def layout(self) -> dict:
        return {"data": self.data_identity, "shards": len(self.shard_uris),
                "world_size": self.world_size, "window_shards": self.window_shards,
                "seed": self.seed,
                "partition": "samples" if self.shard_samples is not None else "shards"}

    def pieces(self, epoch: int, rank: int) -> list[Piece]:
        """The rank's (shard, first row, end row) for `epoch`, in reading order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shard_uris))
        if self.shard_samples is None:
            return [(self.shard_uris[i], 0, None) for i in order[rank::self.world_size]]
        per_rank = sum(self.shard_samples) // self.world_size
        first, end, offset, mine = rank * per_rank, (rank + 1) * per_rank, 0, []
        for index in order:
            count = self.shard_samples[index]
            start, stop = max(first - offset, 0), min(end - offset, count)
            if start < stop:
                mine.append((self.shard_uris[index], int(start), int(stop)))
            offset += count
            if offset >= end:
                break
        return mine

    def windows(self, epoch: int, rank: int) -> list[tuple[Piece, ...]]:
        """The rank's pieces for `epoch`, grouped into windows, in reading order."""
        mine = self.pieces(epoch, rank)
        return [tuple(mine[i:i + self.window_shards])
                for i in range(0, len(mine), self.window_shards)]

    def epoch_order(self, epoch: int, rank: int) -> list[tuple[str, int]]:
        """(shard, row) of every sample the rank reads in `epoch`, in training order, with
        all shards readable: the windows' permutations as `read_window` applies them."""
        if self.shard_samples is None:
            raise ValueError("a plan without per-shard counts knows no sample order")
        order = []
        for window, pieces in enumerate(self.windows(epoch, rank)):
            rows = [(uri, row) for uri, start, stop in pieces for row in range(start, stop)]
            permutation = np.random.default_rng([self.seed, epoch, rank, window]).permutation(
                len(rows))
            order += [rows[i] for i in permutation]
        return order

    def samples_per_epoch(self, batch_size: int) -> int:
        """Samples trained on in an epoch of whole batches (every rank takes as many)."""
        if self.shard_samples is None:
            raise ValueError("a plan without per-shard counts knows no exact epoch size")
        per_rank = sum(self.shard_samples) // self.world_size
        return per_rank // batch_size * batch_size * self.world_size

    def left_out(self, epoch: int, batch_size: int) -> list[tuple[str, int]]:
        """(shard, row) of the samples `epoch` does not train on: each rank's last partial
        batch and the few past an even split. Fewer than world_size * batch_size."""
        taken = self.samples_per_epoch(batch_size) // self.world_size
        left = [s for rank in range(self.world_size) for s in self.epoch_order(epoch, rank)[taken:]]
        shard_order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shard_uris))
        tail = sum(self.shard_samples) % self.world_size
        every = [(self.shard_uris[i], row) for i in shard_order
                 for row in range(self.shard_samples[i])]
        return left + (every[-tail:] if tail else [])


def layout_difference(saved: dict, current: dict) -> str | None:
    """What changed between two layouts, in words, or None when a position carries over."""
    changed = [f"{key} {saved.get(key)!r} -> {current[key]!r}" for key in current
               if saved.get(key) != current[key]]
    return ", ".join(changed) or None


def layout_changed(stage: str, run_name: str, changed: str) -> str:
    return (f"cannot resume {stage} of run '{run_name}': the data layout changed since its "
            f"last checkpoint ({changed}), so the saved stream positions mean nothing now; "
            "restore the old layout, or set a new run_name to train from scratch")


def rank_dataset(plan: StreamPlan, rank: int, start: Position, *, counter=None):
    """The rank's raw samples of one epoch from `start` on, as a Ray dataset (in order):
    columns of the shards (key, image bytes, caption, or the embedding columns) plus
    `_window` and `_row`."""
    import ray.data

    windows = plan.windows(start.epoch, rank)[start.window:]
    items = [{"window": start.window + i, "skip": start.row if i == 0 else 0,
              "shards": json.dumps(shards)} for i, shards in enumerate(windows)]
    if not items:
        return ray.data.from_items([]).limit(0)
    # reading asks for less CPU than decoding, so Ray Data does not fuse the two into one task
    # per window: a window's blocks are decoded by parallel tasks, in order. Reading at most
    # WINDOWS_AHEAD windows at once keeps the first batch from waiting behind later windows.
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read_window, batch_size=1, batch_format="pyarrow", num_cpus=READ_CPUS,
        compute=ray.data.TaskPoolStrategy(size=WINDOWS_AHEAD),
        fn_kwargs={"plan": plan, "epoch": start.epoch, "rank": rank, "counter": counter})


def read_window(item, *, plan: StreamPlan, epoch: int, rank: int, counter=None):
    """One window: read its shards, permute their samples together, drop the consumed ones;
    yields blocks of raw samples."""
    import pyarrow as pa

    window, skip = item["window"][0].as_py(), item["skip"][0].as_py()
    tables, reasons, lost = [], [], 0
    for uri, start, stop in json.loads(item["shards"][0].as_py()):
        table, reason = _read_shard(uri, plan.kind)
        expected = (stop - start) if stop is not None else int(round(plan.samples_per_shard))
        if table is not None:
            table = table.slice(start, (stop - start) if stop is not None else None)
        read = table.num_rows if table is not None else 0
        if read:
            tables.append(table)
        if reason:  # what the piece should hold, less what could be read, counts as lost
            reasons.append(reason)
            lost += max(1, expected - read)
    table = pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})
    order = np.random.default_rng([plan.seed, epoch, rank, window]).permutation(table.num_rows)
    table = table.take(pa.array(order[skip:], type=pa.int64()))
    if counter is not None:  # the window's records are counted here, once, decoded or not
        _charge_budget(counter, table.num_rows + lost, lost, reasons)
    table = table.append_column(WINDOW_COLUMN, pa.array(np.full(table.num_rows, window)))\
        .append_column(ROW_COLUMN, pa.array(np.arange(skip, skip + table.num_rows)))
    for first in range(0, table.num_rows, BLOCK_ROWS):
        yield table.slice(first, BLOCK_ROWS)


def _charge_budget(counter, seen: int, lost: int, reasons: list[str]) -> None:
    import ray

    from data_pipelines.streaming import BadRecordBudgetExceeded

    seen, bad, over = ray.get(counter.record.remote(seen, lost, reasons))
    if over:
        raise BadRecordBudgetExceeded(
            f"{bad} of {seen} records unreadable so far (first: {reasons[0]}); "
            "raise data.max_skip_fraction or fix the shards")


def _read_shard(uri: str, kind: ShardKind):
    """(table, reason): a shard's samples, and why some or all could not be read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_pipelines.storage import StorageError, resolve

    try:
        data = resolve(uri).read_bytes()
    except StorageError as exc:  # deleted or unreachable since the manifest was written
        return None, f"{uri}: {exc}"
    if kind != "webdataset":
        try:
            return pq.read_table(io.BytesIO(data)), None
        except (pa.ArrowException, OSError) as exc:
            return None, f"{uri}: unreadable Parquet ({exc})"
    rows, reason = [], None
    try:
        for key, members in iter_webdataset_members(data):
            rows.append(_webdataset_row(key, members))
    except (tarfile.TarError, OSError, EOFError) as exc:  # truncated: keep what came before
        reason = f"{uri}: truncated or corrupt tar after {len(rows)} samples ({exc})"
    return pa.Table.from_pylist(rows, schema=_webdataset_schema()), reason


def _webdataset_row(key: str, members: dict) -> dict:
    from data_pipelines.shards import STREAM_IMAGE_EXTS

    image = next((members[ext] for ext in STREAM_IMAGE_EXTS if ext in members), None)
    caption = members.get("txt")
    return {"key": key, "image": image,
            "caption": caption.decode("utf-8", "replace") if caption is not None else None}


def _webdataset_schema():
    import pyarrow as pa

    return pa.schema([("key", pa.string()), ("image", pa.binary()), ("caption", pa.string())])


def plan_identity(text: str | bytes) -> str:
    data = text.encode() if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass(frozen=True)
class TrainStream:
    """A stage's train data as each rank opens it: the plan, then (for image shards) decode
    and augmentation as Ray Data tasks. Travels to the workers inside their spec."""

    plan: StreamPlan
    columns: tuple[str, ...]  # what the task trains on (besides each sample's key)
    preprocess: object | None = None  # PreprocessSettings for image shards; None: as stored
    counter: object | None = None  # the run's BadRecordCounter

    def dataset(self, rank: int, start: Position):
        from data_pipelines.streaming import preprocess_batch

        dataset = rank_dataset(self.plan, rank, start, counter=self.counter)
        if self.preprocess is not None:
            dataset = dataset.map_batches(preprocess_batch, batch_size=128, fn_kwargs={
                "settings": self.preprocess, "train": True, "seed": self.plan.seed,
                "epoch": start.epoch, "counter": self.counter, "count_seen": False})
        dataset = dataset.select_columns(["key", *self.columns, WINDOW_COLUMN, ROW_COLUMN])
        dataset.context.execution_options.preserve_order = True  # the plan's order, exactly
        # small blocks: Ray Data would merge a window's output into one block, decoded by one
        # task, and the first batch of an epoch would wait for the whole window
        dataset.context.target_max_block_size = READ_BLOCK_BYTES
        return dataset
