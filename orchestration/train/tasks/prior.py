"""The diffusion prior: text embedding (+ per-token text encodings) -> CLIP image embedding
(Ramesh et al. 2022, sec. 2.2), trained on the embedding shards `unclip embed` writes."""

from __future__ import annotations

import io

import numpy as np
import torch
from torch import nn

from data_pipelines.storage import resolve
from models.metrics import prior_cosines
from models.presets import build_prior_preset, prior_preset_config
from models.prior import build_prior
from orchestration.common.layout import inputs_uri
from orchestration.train.tasks.base import EvalResult, Task, to_tensor
from orchestration.train.tasks.data import embedding_datasets, embedding_split, embeddings_manifest
from orchestration.train.tasks.frozen_clip import clip_sizes, preset_clip_sizes

NORM_SAMPLE_ROWS = 2048  # image embeddings the normalisation statistics are taken from
NORM_SAMPLE_FILE = "norm_sample.npy"


class PriorTask(Task):
    name = "prior"
    requires = ("clip",)
    dataset_kind = "embeddings"

    @classmethod
    def check_config(cls, config) -> None:
        embed_dim, width, context = preset_clip_sizes(config)
        model = prior_preset_config(config.prior.preset, clip_embed_dim=embed_dim,
                                    text_width=width, context_length=context,
                                    **config.prior.overrides)
        steps = config.sampling.prior_steps
        if model.kind == "diffusion_transformer" and steps and steps > model.num_timesteps:
            raise ValueError(f"sampling.prior_steps {steps} exceeds the prior's "
                             f"{model.num_timesteps} timesteps; set sampling.prior_steps <= "
                             f"{model.num_timesteps}")

    def train_samples(self, manifest) -> int:
        return embeddings_manifest(self.config)["splits"]["train"]["num_samples"]

    def datasets(self, counter) -> dict:
        tokens = ("text_tokens",) if self.config.data.embed_token_encodings else ()
        return embedding_datasets(self.config, ("text_emb", "image_emb", *tokens))

    def prepare(self) -> None:
        """The first image embeddings of the train split, for the prior's normalisation: the
        same on every rank, read from storage rather than shipped in the loop's config."""
        sample = embedding_split(self.config, "train").limit(NORM_SAMPLE_ROWS).take_batch(
            NORM_SAMPLE_ROWS)
        buffer = io.BytesIO()
        np.save(buffer, np.stack(sample["image_emb"]).astype(np.float32))
        resolve(inputs_uri(self.config, self.name)).join(NORM_SAMPLE_FILE).write_bytes(
            buffer.getvalue())

    def build_model(self) -> nn.Module:
        embed_dim, width, context = clip_sizes(self.config)
        prior = build_prior_preset(self.stage.preset, clip_embed_dim=embed_dim,
                                   text_width=width, context_length=context,
                                   **self.stage.overrides)
        sample = resolve(inputs_uri(self.config, self.name)).join(NORM_SAMPLE_FILE)
        if sample.exists():
            prior.set_normalisation(torch.from_numpy(np.load(io.BytesIO(sample.read_bytes()))))
        return prior

    @classmethod
    def model_from_config(cls, config: dict) -> nn.Module:
        return build_prior(config)

    def to_batch(self, raw: dict, device) -> dict:
        out = {"text_emb": to_tensor(np.stack(raw["text_emb"]), device).float(),
               "image_emb": to_tensor(np.stack(raw["image_emb"]), device).float()}
        if "text_tokens" in raw:
            out["text_tokens"] = to_tensor(np.stack(raw["text_tokens"]), device).float()
        return out

    def compute_loss(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        return model.loss(text_emb=batch["text_emb"], image_emb=batch["image_emb"],
                          text_tokens=batch.get("text_tokens"))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: list[dict]) -> EvalResult:
        text = torch.cat([b["text_emb"] for b in batches])
        image = torch.cat([b["image_emb"] for b in batches])
        tokens = (torch.cat([b["text_tokens"] for b in batches])
                  if "text_tokens" in batches[0] else None)
        generator = torch.Generator().manual_seed(0)  # same timesteps every evaluation
        t = torch.randint(0, getattr(model.diffusion, "num_timesteps", 1), (len(text),),
                          generator=generator).to(text.device)
        val = model.loss(text_emb=text, image_emb=image, text_tokens=tokens, t=t)
        s = self.config.sampling
        generated = model.sample(text_emb=text, text_tokens=tokens, guidance_scale=s.prior_guidance,
                                 num_candidates=s.num_candidates, sampler=s.sampler,
                                 steps=s.prior_steps, generator=generator)
        cosines = prior_cosines(generated.cpu().numpy(), text.cpu().numpy(), image.cpu().numpy())
        return EvalResult({"val_loss": float(val["loss"]), **cosines})
