"""`unclip embed`: Ray Data batch inference with the trained CLIP over the image shards.

An actor pool (GPUs when configured) loads the CLIP's portable weights once per actor and
writes Parquet embedding shards next to the dataset: key, caption, image_emb, text_emb and,
optionally, the per-token text encodings the prior reads.

The manifest is the embeddings' completion marker: a run deletes it, and every split's old
shards, before writing any new shard, and writes it last. Embeddings without a manifest
(a run that crashed half-way) are never trained on: the prior refuses them and the pipeline
embeds again.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pyarrow.parquet as pq
import ray
import torch

from data_pipelines.progress import polled_progress
from data_pipelines.shards import manifest_hash, read_manifest
from data_pipelines.storage import StorageError, resolve
from data_pipelines.streaming import bad_record_budget, image_caption_dataset
from models.clip_model import encode_text_with_tokens
from orchestration.common.data_check import ensure_dataset
from orchestration.common.layout import DONE_FILE, portable_uri, require_stage
from orchestration.common.ray_runtime import connect
from orchestration.config import Config
from orchestration.train.tasks.base import load_portable

BATCH_SIZE = 256
SPLITS = ("train", "test")
MANIFEST_FILE = "manifest.json"


class ClipEmbedder:
    """Ray Data actor: one CLIP per actor, reused for every batch."""

    def __init__(self, clip_uri: str, with_tokens: bool, use_gpu: bool):
        self.device = torch.device("cuda" if use_gpu else "cpu")
        _, clip = load_portable(clip_uri, map_location=self.device)
        self.clip = clip.eval().requires_grad_(False)
        self.with_tokens = with_tokens

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        images = torch.from_numpy(batch["image"]).to(self.device)
        tokens = torch.from_numpy(batch["tokens"]).to(self.device)
        text_emb, encodings = encode_text_with_tokens(self.clip, tokens)
        out = {"key": batch["key"], "caption": batch["caption"],
               "image_emb": self.clip.encode_image(images).float().cpu().numpy(),
               "text_emb": text_emb.float().cpu().numpy()}
        if self.with_tokens:
            out["text_tokens"] = encodings.float().cpu().numpy().astype(np.float16)
        return out


def run_embed(config: Config, *, log=print) -> dict:
    connect(config)
    dataset_manifest = ensure_dataset(config, log=log)
    clip_uri = require_stage(config, "clip", "the embedding job")
    out = resolve(config.data.resolved_embeddings_uri)
    if out.uri == resolve(config.data.uri).uri:  # its manifest and splits would be replaced
        raise StorageError(f"data.embeddings_uri {out.uri} is the dataset folder itself; "
                           "leave it unset (<data.uri>/embeddings) or give another folder")
    manifest = {"clip": clip_uri, "clip_marker": clip_marker(config), "dataset": config.data.uri,
                "dataset_manifest_hash": manifest_hash(config.data.uri), "splits": {}}
    start = time.monotonic()
    # the old manifest goes first: from here on the folder is incomplete until it is
    # rewritten; the old shards go with it, so none of them is mixed into the new ones
    out.join(MANIFEST_FILE).delete()
    for split in SPLITS:
        out.join(split).delete()
    with bad_record_budget(config.data.max_skip_fraction) as counter:
        for split in SPLITS:
            info = dataset_manifest.splits.get(split)
            expected = info.num_samples if info else None
            with polled_progress(f"embed {split}", expected, _seen_by(counter)):
                manifest["splits"][split] = _embed_split(config, split, out, clip_uri, counter,
                                                         log)
    manifest["seconds"] = round(time.monotonic() - start, 1)
    out.join(MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))  # last: complete
    return manifest


def _embed_split(config: Config, split: str, out, clip_uri: str, counter, log) -> dict:
    """Embed one split into <embeddings>/<split>/*.parquet; returns its manifest entry."""
    target = out.join(split)  # emptied by run_embed before the first split was written
    dataset = image_caption_dataset(config.data.uri, split, config.data.preprocess,
                                    train=False, seed=config.seed, counter=counter)
    embedded = dataset.map_batches(
        ClipEmbedder, batch_size=BATCH_SIZE,
        fn_constructor_kwargs={"clip_uri": clip_uri,
                               "with_tokens": config.data.embed_token_encodings,
                               "use_gpu": config.scaling.use_gpu},
        compute=_actor_pool(config), num_gpus=1 if config.scaling.use_gpu else 0)
    # about as many embedding shards as image shards, so the prior's workers read as many
    # shards at a time as the image stages' do
    image_split = read_manifest(config.data.uri).splits[split]
    per_file = max(1, math.ceil(image_split.num_samples / max(1, len(image_split.shards))))
    embedded.write_parquet(target.path, filesystem=target.filesystem,
                           max_rows_per_file=per_file)
    files = [p for p in target.list_files() if p.endswith(".parquet")]
    counts = [pq.ParquetFile(target.filesystem.open_input_file(p)).metadata.num_rows
              for p in files]
    log(f"[embed] {split}: {sum(counts)} rows in {len(files)} shards at {target.uri}")
    return {"num_samples": sum(counts), "shards": [p.rsplit("/", 1)[-1] for p in files],
            "shard_samples": counts}


def _seen_by(counter):
    """Records preprocessed so far: the embedding actors consume them right behind, and the
    write reports nothing until it ends."""
    return lambda: ray.get(counter.summary.remote())["seen"]


def clip_marker(config: Config) -> str | None:
    """The CLIP stage's completion record: it changes whenever CLIP is retrained."""
    done = resolve(portable_uri(config, "clip")).join(DONE_FILE)
    return done.read_text() if done.exists() else None


def _actor_pool(config: Config):
    from ray.data import ActorPoolStrategy

    size = max(1, config.scaling.num_workers)
    return ActorPoolStrategy(min_size=1, max_size=size)
