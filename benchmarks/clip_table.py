"""Luo 2023, table 4.1 for a trained CLIP, on the whole held-out split.

Reads the test-split embeddings that the pipeline's embed step wrote with the trained CLIP
(`<data.uri>/embeddings/test`, Parquet: caption, image_emb, text_emb) and reports the
matching-pair cosine, the random-pair cosine (each image against another sample's caption)
and zero-shot top-1 / top-5: is the image's own caption among the k most similar of all
distinct test captions. The training loop's `val/zero_shot_*` use only the evaluated
batches' captions as candidates; this is the thesis's harder setting.

    python benchmarks/clip_table.py study/data/shapes/embeddings/test
    python benchmarks/clip_table.py --clip release/shapes/evaluator -c release/shapes/eval.yaml
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pyarrow.dataset as ds
import torch

from models.metrics import zero_shot_topk


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def table_from_features(captions: list[str], image: np.ndarray, text: np.ndarray,
                        seed: int = 0) -> dict:
    """The table from per-sample image and caption embeddings (rows in the same order)."""
    image, text = unit(image.astype(np.float64)), unit(text.astype(np.float64))
    distinct = sorted(set(captions))
    first_row = {caption: captions.index(caption) for caption in distinct}
    candidates = text[[first_row[c] for c in distinct]]  # one embedding per distinct caption
    labels = np.array([distinct.index(c) for c in captions])
    shift = np.random.default_rng(seed).integers(1, len(captions))  # no sample meets itself
    return {"samples": len(captions), "distinct_captions": len(distinct),
            "matching_pair_cosine": round(float((image * text).sum(1).mean()), 4),
            "random_pair_cosine": round(float(
                (image * np.roll(text, shift, axis=0)).sum(1).mean()), 4),
            **{f"zero_shot_{k}": round(v, 4) for k, v in zero_shot_topk(
                image, candidates, labels).items()}}


def clip_table(embeddings_uri: str, seed: int = 0) -> dict:
    """The table from the embed step's Parquet shards of a split."""
    table = ds.dataset(embeddings_uri, format="parquet").to_table(
        columns=["caption", "image_emb", "text_emb"])
    captions = [str(c) for c in table["caption"].to_pylist()]
    image = np.stack(table["image_emb"].to_numpy(zero_copy_only=False))
    text = np.stack(table["text_emb"].to_numpy(zero_copy_only=False))
    return table_from_features(captions, image, text, seed)


def clip_table_of_folder(clip_uri: str, config_path: str, seed: int = 0) -> dict:
    """The table for any portable CLIP folder (e.g. a reference evaluator) on the config's
    whole test split, embedding it here (no run, no embed step needed)."""
    from data_pipelines.shards import read_manifest
    from orchestration.config import load_config
    from orchestration.evaluate.evaluation import held_out_rows
    from orchestration.evaluate.evaluator import load_evaluator

    config = load_config(config_path)
    # the whole test split as the manifest counts it (any dataset, not only shapes)
    rows = held_out_rows(config, read_manifest(config.data.uri).splits["test"].num_samples)
    captions = [str(c) for c in rows["caption"]]
    evaluator = load_evaluator(clip_uri)
    image = evaluator.image_features(torch.from_numpy(np.array(rows["image"])))
    return {"clip": evaluator.identity,
            **table_from_features(captions, image, evaluator.text_features(captions), seed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("embeddings", nargs="?",
                        help="the test split's embeddings folder (local or s3://)")
    parser.add_argument("--clip", help="instead: a portable CLIP folder (e.g. an evaluator), "
                        "embedded here on the test split of -c CONFIG")
    parser.add_argument("-c", "--config", default="tiny", help="the dataset's config (--clip)")
    args = parser.parse_args()
    if bool(args.embeddings) == bool(args.clip):
        parser.error("give either an embeddings folder or --clip FOLDER")
    table = (clip_table_of_folder(args.clip, args.config) if args.clip
             else clip_table(args.embeddings))
    print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
