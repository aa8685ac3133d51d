"""Where the training loop gets its data and puts its reports: a Ray Train worker, or (for
fast tests and debugging) the current process.

`RaySession` opens the worker's own resumable stream (`data_pipelines.resumable`) and reports
through `ray.train`; `LocalSession` feeds in-memory numpy columns and keeps checkpoints in a
local folder, so the same loop runs in one process (world size 1) in seconds. Both open an
epoch at a `Position`; `RankStream` walks the epochs and keeps the position.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from data_pipelines.resumable import ROW_COLUMN, WINDOW_COLUMN, Position


class RaySession:
    """A Ray Train worker: its own resumable train stream, the shared test dataset."""

    def __init__(self, stream, stall_timeout_s: float = 600.0, worker_cpus: str = ""):
        import ray.train

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.stream, self.stall_timeout_s = stream, stall_timeout_s
        self.worker_cpus = worker_cpus  # what the Train workers hold, for the stall message

    def layout(self) -> dict:
        return self.stream.plan.layout()

    def open_epoch(self, start: Position, batch_size: int) -> Iterator[dict]:
        """The rank's numpy batches of `start.epoch`, from `start` on (full batches only)."""
        dataset = self.stream.dataset(self.rank, start)
        batches = dataset.iter_batches(batch_size=batch_size, batch_format="numpy",
                                       drop_last=True, prefetch_batches=2)
        return within_deadline(batches, self.stall_timeout_s, self._stalled)

    def _stalled(self, waited: float) -> str:
        import ray

        from data_pipelines.resumable import READ_CPUS

        free, total = ray.available_resources(), ray.cluster_resources()
        return (f"worker {self.rank} got no training batch for {waited:g} s: its Ray Data "
                f"read and decode tasks ({READ_CPUS:g} and 1 CPU each) cannot run while the "
                f"cluster has {free.get('CPU', 0):g} of {total.get('CPU', 0):g} CPU free "
                f"({self.worker_cpus}). Free CPUs (other work, a sweep's other trials), lower "
                "scaling.cpus_per_worker or add nodes; data.stall_timeout_s sets the wait")

    def test_batches(self, batch_size: int) -> Iterator[dict]:
        import ray.train

        return iter(ray.train.get_dataset_shard("test").iter_batches(
            batch_size=batch_size, batch_format="numpy"))

    @contextlib.contextmanager
    def restored(self):
        """The latest checkpoint's folder, or None on a fresh start."""
        import ray.train

        from data_pipelines.storage import retry_misfiled_transient

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with tempfile.TemporaryDirectory() as directory:  # downloaded with S3 retries
            yield retry_misfiled_transient(lambda: checkpoint.to_directory(directory))

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        import ray.train
        from ray.train import Checkpoint

        checkpoint = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)


class LocalSession:
    """One process, world size 1: `data` maps "train"/"test" to numpy columns. An epoch is
    one window: the train rows in a permutation seeded by (seed, epoch)."""

    rank, world_size = 0, 1

    def __init__(self, data: dict[str, dict[str, np.ndarray]], checkpoint_root: Path,
                 seed: int = 0):
        self.data, self.checkpoint_root, self.seed = data, Path(checkpoint_root), seed
        self.reports: list[dict] = []  # every report, in order
        self.checkpoints: list[Path] = []

    def _rows(self, split: str) -> int:
        return len(next(iter(self.data[split].values())))

    def _batch(self, split: str, index: np.ndarray) -> dict:
        return {k: np.asarray(v)[index] for k, v in self.data[split].items()}

    def layout(self) -> dict:
        return {"rows": self._rows("train"), "seed": self.seed}

    def open_epoch(self, start: Position, batch_size: int) -> Iterator[dict]:
        order = np.random.default_rng([self.seed, start.epoch]).permutation(self._rows("train"))
        if start.window > 0:
            return
        for first in range(start.row, len(order) - batch_size + 1, batch_size):
            batch = self._batch("train", order[first:first + batch_size])
            batch[WINDOW_COLUMN] = np.zeros(batch_size, np.int64)
            batch[ROW_COLUMN] = np.arange(first, first + batch_size)
            yield batch

    def test_batches(self, batch_size: int) -> Iterator[dict]:
        rows = self._rows("test")
        for start in range(0, rows, batch_size):
            yield self._batch("test", np.arange(start, min(rows, start + batch_size)))

    @contextlib.contextmanager
    def restored(self):
        found = sorted(self.checkpoint_root.glob("checkpoint_*"))
        yield str(found[-1]) if found else None

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir:
            target = self.checkpoint_root / f"checkpoint_{metrics['step']:06d}"
            shutil.copytree(checkpoint_dir, target)
            self.checkpoints.append(target)


class DataExhausted(RuntimeError):
    pass


class DataStalled(RuntimeError):
    """No batch came within the stall timeout: the data tasks cannot be scheduled."""


_END = object()


def within_deadline(batches: Iterator, timeout_s: float, describe: Callable[[float], str]
                    ) -> Iterator:
    """`batches`, fetched one ahead by a thread; DataStalled(describe(timeout_s)) when none
    arrives within `timeout_s`. Closing the generator (an epoch the other ranks ended) stops
    the thread and the stream it reads."""
    handoff, stop = queue.Queue(maxsize=1), threading.Event()

    def offer(item) -> bool:
        """Hand `item` over unless the consumer has gone (then False)."""
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                handoff.put(item, timeout=0.5)
                return True
        return False

    def pump() -> None:
        try:
            if all(offer(batch) for batch in batches):
                offer(_END)
        except BaseException as exc:  # re-raised in the training thread
            offer(exc)
        finally:
            close = getattr(batches, "close", None)
            if close:
                close()

    threading.Thread(target=pump, name="batch-fetcher", daemon=True).start()
    try:
        while True:
            try:
                item = handoff.get(timeout=timeout_s)
            except queue.Empty:
                raise DataStalled(describe(timeout_s)) from None
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()  # the pump stops at its next hand-over and closes the stream


class RankStream:
    """A rank's batches, epoch after epoch, and the position just past the last one taken.

    An epoch ends for every rank together when any rank has run out (`all_ranks_have` is a
    collective), so ranks stay in step; the longer ranks' leftovers are skipped that epoch.
    """

    def __init__(self, open_epoch: Callable[[Position, int], Iterator[dict]], batch_size: int,
                 position: Position, all_ranks_have: Callable[[bool], bool]):
        self.open_epoch, self.batch_size, self.all_ranks_have = (open_epoch, batch_size,
                                                                 all_ranks_have)
        self.position = position
        self._batches = open_epoch(position, batch_size)

    def next_batch(self) -> dict:
        fresh_epoch = False
        while True:
            batch = next(self._batches, None)
            if self.all_ranks_have(batch is not None):
                self.position = Position(self.position.epoch, int(batch[WINDOW_COLUMN][-1]),
                                         int(batch[ROW_COLUMN][-1]) + 1)
                return batch
            if fresh_epoch:
                raise DataExhausted(
                    f"epoch {self.position.epoch} gave a worker no full batch of "
                    f"{self.batch_size}: the train split is smaller than one batch per worker, "
                    "or nearly all of it is unreadable")
            self.position = Position(self.position.epoch + 1)
            self._batches = self.open_epoch(self.position, self.batch_size)
            fresh_epoch = True


def init_single_process_group() -> None:
    """A gloo process group of one for this process (DeepSpeed needs torch.distributed).
    Kept for the life of the process: DeepSpeed caches its groups across engines."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # what a launcher would set; DeepSpeed's engine checks LOCAL_RANK
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1)
