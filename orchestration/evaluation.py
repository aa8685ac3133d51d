"""Stage `eval`: assemble the text-to-image pipeline and score it on held-out captions.

Features come from our own trained CLIP image encoder (no Inception weights exist offline):
CLIP-space Fréchet distance and KID, precision/recall/F1 (k-NN manifolds), CLIP score,
plus the prior's cosine table on the test embeddings and nearest-neighbour novelty.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from data_pipelines.streaming import image_caption_dataset
from models.metrics import (
    clip_score,
    image_set_metrics,
    nearest_neighbour_novelty,
    prior_cosines,
)
from models.unclip_pipeline import UnCLIPPipeline, images_to_grid
from orchestration.config import Config
from orchestration.layout import portable_uri
from orchestration.stages import STAGES
from orchestration.tasks.base import load_portable


def assemble_pipeline(config: Config) -> UnCLIPPipeline:
    """The three components' portable EMA weights plus the configured sampling defaults."""
    components = {stage: load_portable(portable_uri(config, stage))[1] for stage in STAGES}
    return UnCLIPPipeline(**components, context_length=config.data.preprocess.context_length,
                          sampling=pipeline_sampling(config)).eval()


def pipeline_sampling(config: Config) -> dict:
    """The config's sampling section in the pipeline's own vocabulary."""
    s = config.sampling
    return {"sampler": s.sampler, "steps": s.decoder_steps, "prior_steps": s.prior_steps,
            "prior_guidance": s.prior_guidance, "decoder_guidance": s.decoder_guidance,
            "eta": s.eta, "num_candidates": s.num_candidates}


def held_out_rows(config: Config, count: int) -> dict:
    """The first `count` held-out (test split) rows in a fixed order, unaugmented."""
    dataset = image_caption_dataset(config.data.uri, "test", config.data.preprocess,
                                    train=False, seed=config.seed)
    return dataset.limit(count).take_batch(count, batch_format="numpy")


def _train_rows(config: Config, count: int) -> dict:
    dataset = image_caption_dataset(config.data.uri, "train", config.data.preprocess,
                                    train=False, seed=config.seed)
    return dataset.limit(count).take_batch(count, batch_format="numpy")


@torch.no_grad()
def evaluate_pipeline(config: Config, pipeline: UnCLIPPipeline, out_dir: Path,
                      log=print) -> dict:
    """Generate for held-out captions, compute metrics, write the grids; returns metrics."""
    start = time.monotonic()
    ev = config.eval
    rows = held_out_rows(config, ev.num_captions)
    captions = [str(c) for c in rows["caption"]]
    clip = pipeline.clip
    real_images = torch.from_numpy(np.array(rows["image"]))  # Ray blocks are read-only
    real_emb = clip.encode_image(real_images, normalize=True).numpy()
    text_emb_raw, encodings = pipeline.encode_text(captions)
    text_emb = torch.nn.functional.normalize(text_emb_raw, dim=-1).numpy()
    generated = pipeline.generate(captions, num_images_per_prompt=ev.images_per_caption,
                                  seed=config.seed)
    fake = generated.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    fake_emb = clip.encode_image(fake, normalize=True).numpy()
    metrics = {
        **image_set_metrics(real_emb, fake_emb, text_emb),
        "clip_score_real": clip_score(real_emb, text_emb),
    }
    prior_emb = pipeline.prior.sample(text_emb=text_emb_raw, text_tokens=encodings,
                                      generator=torch.Generator().manual_seed(config.seed))
    metrics.update({f"prior_{k}": v for k, v in prior_cosines(
        prior_emb.numpy(), text_emb_raw.numpy(), real_emb).items()})
    train = _train_rows(config, 256)
    train_emb = clip.encode_image(torch.from_numpy(np.array(train["image"])),
                                  normalize=True).numpy()
    novelty = nearest_neighbour_novelty(fake_emb, train_emb, k=3)
    metrics["nn_train_similarity"] = float(novelty["mean_nearest"])
    metrics["eval_seconds"] = round(time.monotonic() - start, 1)

    out_dir.mkdir(parents=True, exist_ok=True)
    count = min(8, len(captions))
    side = torch.cat([((real_images[:count] + 1) * 127.5).round().byte().permute(0, 2, 3, 1),
                      generated[: count * ev.images_per_caption: ev.images_per_caption]])
    images_to_grid(side, nrow=count).resize(
        (count * 96, 2 * 96), 0).save(out_dir / "eval_real_vs_generated.png")
    prompts = ev.grid_prompts
    grid = pipeline.generate(prompts, num_images_per_prompt=4, seed=config.seed)
    images_to_grid(grid, nrow=4).resize((4 * 96, len(prompts) * 96), 0).save(
        out_dir / "samples.png")
    (out_dir / "prompts.json").write_text(json.dumps(prompts, indent=2))
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log(f"[eval] {json.dumps({k: round(v, 4) for k, v in metrics.items()})}")
    return metrics
