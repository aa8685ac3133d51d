"""What the tasks train on: a resumable stream per worker over image-caption shards or CLIP
embedding shards (`data_pipelines.resumable`), and the test split as a Ray dataset.

Every epoch of the train stream is its own seeded pass (shard order, window permutations and
augmentations derive from the seed and the epoch); workers keep reading epoch after epoch
until the loop has run its steps.
"""

from __future__ import annotations

import json

import ray.data

from data_pipelines.resumable import StreamPlan, TrainStream, plan_identity
from data_pipelines.shards import manifest_hash, read_manifest, shard_location
from data_pipelines.storage import StorageError, resolve
from data_pipelines.streaming import image_caption_dataset
from orchestration.config import Config


def stream_plan(config: Config, shard_uris: list[str], kind: str, identity: str,
                samples: int, shard_samples: list[int] | None = None) -> StreamPlan:
    """The train split's plan: split between workers by sample where the manifest counts
    each shard's samples, by whole shard for manifests written before it did."""
    counts = tuple(shard_samples) if shard_samples and len(shard_samples) == len(shard_uris) \
        else None
    try:
        return StreamPlan(tuple(shard_uris), kind, identity, config.seed,
                          config.scaling.num_workers, config.data.shuffle_window_shards,
                          samples / max(1, len(shard_uris)), shard_samples=counts)
    except ValueError as exc:
        raise StorageError(str(exc)) from None


def image_datasets(config: Config, columns: tuple[str, ...], counter) -> dict:
    uri = config.data.uri
    manifest = read_manifest(uri)
    root = resolve(uri)
    split = manifest.splits["train"]
    shards = [shard_location(root, name).uri for name in split.shards]
    plan = stream_plan(config, shards, manifest.format, manifest_hash(uri), split.num_samples,
                       split.shard_samples)
    test = image_caption_dataset(uri, "test", config.data.preprocess, train=False,
                                 seed=config.seed, counter=counter)
    return {"train": TrainStream(plan, columns, config.data.preprocess, counter),
            "test": test.select_columns(["image", "tokens", "caption"])}


def embeddings_manifest(config: Config) -> dict:
    location = resolve(config.data.resolved_embeddings_uri).join("manifest.json")
    if not location.exists():
        raise StorageError(f"no embeddings at {config.data.resolved_embeddings_uri}; "
                           "run `unclip embed` first")
    return json.loads(location.read_text())


def embedding_shards(config: Config, split: str, manifest: dict | None = None) -> list:
    """Locations of a split's embedding shards: those the finished embedding job listed in
    its manifest, never whatever else lies in the folder."""
    manifest = manifest or embeddings_manifest(config)
    root = resolve(config.data.resolved_embeddings_uri).join(split)
    names = manifest.get("splits", {}).get(split, {}).get("shards", [])
    if not names:
        raise StorageError(f"no '{split}' embedding shards at {root.uri}; run `unclip embed`")
    return [root.join(name) for name in names]


def embedding_split(config: Config, split: str) -> ray.data.Dataset:
    shards = embedding_shards(config, split)
    return ray.data.read_parquet([s.path for s in shards], filesystem=shards[0].filesystem)


def embedding_datasets(config: Config, columns: tuple[str, ...]) -> dict:
    manifest = embeddings_manifest(config)
    files = [shard.uri for shard in embedding_shards(config, "train", manifest)]
    identity = plan_identity(json.dumps(manifest, sort_keys=True))
    train = manifest["splits"]["train"]
    plan = stream_plan(config, files, "embeddings", identity, train["num_samples"],
                       train.get("shard_samples"))
    return {"train": TrainStream(plan, columns), "test": embedding_split(config, "test")}
