"""Luo 2023, table 4.1 for a trained CLIP, on the whole held-out split.

Reads the test-split embeddings that the pipeline's embed step wrote with the trained CLIP
(`<data.uri>/embeddings/test`, Parquet: caption, image_emb, text_emb) and reports the
matching-pair cosine, the random-pair cosine (each image against another sample's caption)
and zero-shot top-1 / top-5: is the image's own caption among the k most similar of all
distinct test captions. The training loop's `val/zero_shot_*` use only the evaluated
batches' captions as candidates; this is the thesis's harder setting.

    python benchmarks/clip_table.py study/data/shapes/embeddings/test
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pyarrow.dataset as ds

from models.metrics import zero_shot_topk


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def clip_table(embeddings_uri: str, seed: int = 0) -> dict:
    table = ds.dataset(embeddings_uri, format="parquet").to_table(
        columns=["caption", "image_emb", "text_emb"])
    captions = [str(c) for c in table["caption"].to_pylist()]
    image = unit(np.stack(table["image_emb"].to_numpy(zero_copy_only=False)).astype(np.float64))
    text = unit(np.stack(table["text_emb"].to_numpy(zero_copy_only=False)).astype(np.float64))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("embeddings", help="the test split's embeddings folder (local or s3://)")
    args = parser.parse_args()
    print(json.dumps(clip_table(args.embeddings), indent=2))


if __name__ == "__main__":
    main()
