"""Real in-memory data for the single-process task and loop tests: shapes images rendered and
preprocessed exactly as Ray Data does it, and CLIP embeddings made by the embedding job's
own actor class."""

from __future__ import annotations

import numpy as np
import torch

from data_pipelines.settings import ShapesSettings
from data_pipelines.shapes import render_sample
from data_pipelines.streaming import preprocess_image, tokenize

FAST_OVERRIDES = [
    "data.shapes.image_size=32", "scaling.torch_threads=1",
    "prior.overrides={num_timesteps: 10, width: 32, layers: 1, heads: 2}",
    "decoder.overrides={num_timesteps: 10, base_channels: 16, channel_mults: [1, 2]}",
    "sampling.decoder_steps=2", "sampling.prior_steps=2", "sampling.num_candidates=1",
]


def fast_config(tmp_path, *extra: str):
    from orchestration.config import load_config

    return load_config("tiny", [f"storage_root={tmp_path}/runs", "run_name=fast",
                                f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
                                *FAST_OVERRIDES, *extra])


def image_columns(config, split: str, count: int, seed: int = 0) -> dict[str, np.ndarray]:
    """`count` shapes samples as the columns Ray Data's preprocessing yields."""
    rng = np.random.default_rng(seed)
    settings = ShapesSettings(image_size=config.data.preprocess.image_size)
    images, captions = [], []
    for index in range(count):
        image, caption, _ = render_sample(rng, settings, split)
        images.append(preprocess_image(image, config.data.preprocess,
                                       np.random.default_rng(index), split == "train"))
        captions.append(caption)
    return {"key": np.array([f"{split}-{i}" for i in range(count)], dtype=object),
            "caption": np.array(captions, dtype=object), "image": np.stack(images),
            "tokens": tokenize(captions, config.data.preprocess.context_length)}


def save_trained_clip(config) -> None:
    """Portable CLIP weights where prior and decoder look for them (untrained is enough)."""
    from orchestration.common.layout import portable_uri
    from orchestration.train.tasks.base import save_portable
    from orchestration.train.tasks.clip import ClipTask

    torch.manual_seed(0)
    task = ClipTask(config)
    model = task.build_model()
    save_portable(portable_uri(config, "clip"), "clip", model, task.model_config(model))


def embedding_columns(config, images: dict) -> dict[str, np.ndarray]:
    """The embedding job's output for `images`, from its own Ray Data actor class."""
    from orchestration.common.layout import portable_uri
    from orchestration.train.embed_job import ClipEmbedder

    embedder = ClipEmbedder(portable_uri(config, "clip"), with_tokens=True, use_gpu=False)
    out = embedder({k: images[k] for k in ("key", "caption", "image", "tokens")})
    return {k: np.asarray(v) for k, v in out.items()}
