"""Ray datasets the tasks train on: image-caption shards or CLIP embedding shards.

Each epoch is its own seeded pass (shard order and augmentations derive from the seed and
the epoch), and a run's train dataset is the concatenation of the epochs it needs, so the
loop sees one deterministic stream.
"""

from __future__ import annotations

import json
import math

import ray.data

from data_pipelines.storage import StorageError, resolve
from data_pipelines.streaming import image_caption_dataset
from orchestration.config import Config

REORDER_BLOCKS = 64  # a small split is often one or two blocks, whose order barely changes


def planned_epochs(config: Config, stage: str, train_samples: int) -> int:
    spec = config.stage(stage)
    per_step = spec.batch_size * spec.grad_accum * config.scaling.num_workers
    # +1: drop_last and uneven streaming_split leave each worker a little short per epoch
    return math.ceil(spec.steps * per_step / train_samples) + 1


def image_datasets(config: Config, stage: str, columns: tuple[str, ...], train_samples: int,
                   counter) -> dict:
    pre, uri = config.data.preprocess, config.data.uri

    def epoch(e: int) -> ray.data.Dataset:
        return image_caption_dataset(uri, "train", pre, train=True, seed=config.seed, epoch=e,
                                     shuffle_files=True, counter=counter).select_columns(
                                         list(columns))

    num_epochs = planned_epochs(config, stage, train_samples)
    if config.data.materialize_train:
        train = reordered_epochs(epoch(0), num_epochs, config.seed)
    else:
        train = concat([epoch(e) for e in range(num_epochs)])
    test = image_caption_dataset(uri, "test", pre, train=False, seed=config.seed,
                                 counter=counter)
    return {"train": train, "test": test.select_columns(["image", "tokens", "caption"])}


def reordered_epochs(base: ray.data.Dataset, num_epochs: int, seed: int) -> ray.data.Dataset:
    """A materialized split repeated `num_epochs` times, each in its own seeded block order
    (the worker's local shuffle buffer mixes within blocks)."""
    base = base.repartition(REORDER_BLOCKS).materialize()
    # the identity map gives each epoch its own block references: the iterator's prefetcher
    # waits on a window of references, and one block twice in a window (the end of one
    # epoch, the start of the next) fails it ("Wait requires a list of unique ray_waitables")
    return concat([base.randomize_block_order(seed=seed + e).map_batches(
        _same, batch_format="pyarrow", zero_copy_batch=True) for e in range(num_epochs)])


def _same(batch):
    return batch


def concat(parts: list[ray.data.Dataset]) -> ray.data.Dataset:
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def embeddings_manifest(config: Config) -> dict:
    location = resolve(config.data.resolved_embeddings_uri).join("manifest.json")
    if not location.exists():
        raise StorageError(f"no embeddings at {config.data.resolved_embeddings_uri}; "
                           "run `unclip embed` first")
    return json.loads(location.read_text())


def embedding_split(config: Config, split: str) -> ray.data.Dataset:
    root = resolve(config.data.resolved_embeddings_uri).join(split)
    files = [p for p in root.list_files() if p.endswith(".parquet")]
    if not files:
        raise StorageError(f"no embedding shards at {root.uri}; run `unclip embed` first")
    return ray.data.read_parquet(files, filesystem=root.filesystem)


def embedding_datasets(config: Config, stage: str, train_samples: int) -> dict:
    # embeddings are small: read once, then a seeded block order per epoch (plus the
    # worker's local shuffle buffer) instead of a full all-to-all shuffle every epoch
    epochs = planned_epochs(config, stage, train_samples)
    return {"train": reordered_epochs(embedding_split(config, "train"), epochs, config.seed),
            "test": embedding_split(config, "test")}
