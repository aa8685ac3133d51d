"""Stage 0 of every job: make sure the dataset exists (building shapes on the embedded default)."""

from __future__ import annotations

import threading
import time

import numpy as np
import ray

from data_pipelines.shapes import build_shapes
from data_pipelines.shards import MANIFEST_NAME, Manifest, check_manifest_shards, read_manifest
from data_pipelines.storage import StorageError, resolve
from data_pipelines.streaming import image_caption_dataset
from orchestration.config import Config


def ensure_dataset(config: Config, log=print) -> Manifest:
    """The dataset's manifest; builds the shapes dataset first when configured to."""
    root = resolve(config.data.uri)
    if not root.join(MANIFEST_NAME).exists():
        if not config.data.build_shapes_if_missing:
            raise StorageError(
                f"no dataset at {config.data.uri}; build one with `unclip data shapes --out "
                f"{config.data.uri}` or set data.build_shapes_if_missing=true"
            )
        log(f"no dataset at {config.data.uri}: building the shapes dataset "
            f"({config.data.shapes.train_size} train / {config.data.shapes.test_size} test)")
        build_shapes(config.data.uri, config.data.shapes, fmt=config.data.format)
    manifest = read_manifest(config.data.uri)
    if "train" not in manifest.splits or manifest.splits["train"].num_samples == 0:
        raise StorageError(
            f"dataset {config.data.uri} has no train samples; rebuild it (`unclip data shapes`, "
            "`unclip data ingest` or `unclip data index`) or point data.uri at another dataset")
    check_manifest_shards(config.data.uri, manifest)
    return manifest


def check_batch_fits(config: Config, stage: str, train_samples: int) -> None:
    """StorageError (one line) when one step's batches need more samples than the train split
    holds: every worker takes whole batches of `batch_size` from its share of each epoch."""
    spec, workers = config.stage(stage), config.scaling.num_workers
    if spec.batch_size * workers > train_samples:
        raise StorageError(
            f"{stage}.batch_size={spec.batch_size} x scaling.num_workers={workers} needs at "
            f"least {spec.batch_size * workers} train samples per epoch, but dataset "
            f"{config.data.uri} has {train_samples}; lower {stage}.batch_size or "
            "scaling.num_workers, or use a larger dataset")


def measure_stream(config: Config, *, split: str = "train", batch_size: int = 64,
                   num_consumers: int = 1) -> dict:
    """Iterate one epoch with `num_consumers` streaming_split readers; report throughput."""
    dataset = image_caption_dataset(
        config.data.uri, split, config.data.preprocess, seed=config.seed,
        max_skip_fraction=config.data.max_skip_fraction)
    iterators = dataset.streaming_split(num_consumers, equal=False)
    counts = [0] * num_consumers
    checks: dict = {}
    errors: list[BaseException] = []

    def consume(rank: int) -> None:
        try:
            for batch in iterators[rank].iter_batches(batch_size=batch_size,
                                                      batch_format="numpy"):
                counts[rank] += len(batch["key"])
                if not checks:
                    image = batch["image"]
                    checks.update(image_shape=list(image.shape[1:]),
                                  image_min=float(np.min(image)), image_max=float(np.max(image)),
                                  tokens_shape=list(batch["tokens"].shape[1:]))
        except BaseException as exc:  # surfaced to the caller below
            errors.append(exc)

    start = time.monotonic()
    threads = [threading.Thread(target=consume, args=(r,)) for r in range(num_consumers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    seconds = time.monotonic() - start
    total = sum(counts)
    return {"split": split, "samples": total, "per_consumer": counts, "seconds": round(seconds, 2),
            "samples_per_s": round(total / seconds, 1), **checks,
            "ray_cpus": ray.cluster_resources().get("CPU", 0)}
