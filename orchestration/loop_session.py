"""Where the training loop gets its data and puts its reports: a Ray Train worker, or (for
fast tests and debugging) the current process.

`RaySession` reads the worker's dataset shards and reports through `ray.train`;
`LocalSession` feeds in-memory numpy columns and keeps checkpoints in a local folder, so the
same loop runs in one process (world size 1) in seconds.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np


class RaySession:
    def __init__(self):
        import ray.train

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()

    def train_batches(self, batch_size: int, *, skip: int, seed: int) -> Iterator[dict]:
        """The worker's stream of numpy batches, past the `skip` consumed before a resume.

        The seeded local shuffle buffer mixes samples across blocks and keeps the stream
        reproducible, which is what makes skipping consumed batches an exact resume."""
        import ray.train

        shard = ray.train.get_dataset_shard("train")
        iterator = iter(shard.iter_batches(batch_size=batch_size, batch_format="numpy",
                                           drop_last=True, prefetch_batches=2,
                                           local_shuffle_buffer_size=4 * batch_size,
                                           local_shuffle_seed=seed))
        for _ in range(skip):
            next(iterator, None)
        return iterator

    def test_batches(self, batch_size: int) -> Iterator[dict]:
        import ray.train

        return iter(ray.train.get_dataset_shard("test").iter_batches(
            batch_size=batch_size, batch_format="numpy"))

    @contextlib.contextmanager
    def restored(self):
        """The latest checkpoint's folder, or None on a fresh start."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield directory

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        import ray.train
        from ray.train import Checkpoint

        checkpoint = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)


class LocalSession:
    """One process, world size 1: `data` maps "train"/"test" to numpy columns."""

    rank, world_size = 0, 1

    def __init__(self, data: dict[str, dict[str, np.ndarray]], checkpoint_root: Path):
        self.data, self.checkpoint_root = data, Path(checkpoint_root)
        self.reports: list[dict] = []  # every report, in order
        self.checkpoints: list[Path] = []

    def _rows(self, split: str) -> int:
        return len(next(iter(self.data[split].values())))

    def _batch(self, split: str, index: np.ndarray) -> dict:
        return {k: np.asarray(v)[index] for k, v in self.data[split].items()}

    def train_batches(self, batch_size: int, *, skip: int, seed: int) -> Iterator[dict]:
        rows, epoch, produced = self._rows("train"), 0, 0
        while True:  # seeded permutation per epoch, drop_last; the loop stops by steps
            order = np.random.default_rng([seed, epoch]).permutation(rows)
            for start in range(0, rows - batch_size + 1, batch_size):
                if produced >= skip:
                    yield self._batch("train", order[start:start + batch_size])
                produced += 1
            epoch += 1

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
