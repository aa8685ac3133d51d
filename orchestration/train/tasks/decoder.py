"""The diffusion decoder: CLIP image embedding (+ optional text tokens) -> image
(Ramesh et al. 2022, sec. 2.1). Trained on the image shards; the conditioning embeddings come
from the frozen CLIP inside the worker (a few ms per batch, cheaper than a join by key)."""

from __future__ import annotations

import torch
from torch import nn

from models.clip_model import encode_text_with_tokens
from models.decoder import build_decoder
from models.presets import build_decoder_preset, decoder_preset_config
from models.unclip_pipeline import images_to_grid
from orchestration.train.tasks.base import EvalResult, Task, to_tensor
from orchestration.train.tasks.frozen_clip import clip_sizes, load_frozen_clip, preset_clip_sizes

GRID_IMAGES = 8  # real vs generated pairs in the evaluation grid


class DecoderTask(Task):
    name = "decoder"
    requires = ("clip",)

    def __init__(self, config):
        super().__init__(config)
        self.use_text = bool(self.stage.overrides.get("text_conditioning", False))

    @classmethod
    def check_config(cls, config) -> None:
        embed_dim, width, _ = preset_clip_sizes(config)
        overrides = dict(config.decoder.overrides)
        use_text = bool(overrides.pop("text_conditioning", False))
        model = decoder_preset_config(config.decoder.preset, clip_embed_dim=embed_dim,
                                      text_width=width if use_text else None,
                                      image_size=config.data.preprocess.image_size, **overrides)
        steps = config.sampling.decoder_steps
        if steps and steps > model.num_timesteps:
            raise ValueError(f"sampling.decoder_steps {steps} exceeds the decoder's "
                             f"{model.num_timesteps} timesteps; set sampling.decoder_steps <= "
                             f"{model.num_timesteps}")

    def setup(self, *, device, rank: int = 0, world_size: int = 1) -> None:
        super().setup(device=device, rank=rank, world_size=world_size)
        self.clip = load_frozen_clip(self.config, device)

    def build_model(self) -> nn.Module:
        embed_dim, width, _ = clip_sizes(self.config)
        overrides = {k: v for k, v in self.stage.overrides.items() if k != "text_conditioning"}
        return build_decoder_preset(self.stage.preset, clip_embed_dim=embed_dim,
                                    text_width=width if self.use_text else None,
                                    image_size=self.config.data.preprocess.image_size,
                                    **overrides)

    @classmethod
    def model_from_config(cls, config: dict) -> nn.Module:
        return build_decoder(config)

    @torch.no_grad()
    def to_batch(self, raw: dict, device) -> dict:
        images = to_tensor(raw["image"], device)
        out = {"images": images, "image_emb": self.clip.encode_image(images).float()}
        if self.use_text:
            tokens = to_tensor(raw["tokens"], device)
            out["text_tokens"] = encode_text_with_tokens(self.clip, tokens)[1].float()
        return out

    def compute_loss(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        return model.loss(images=batch["images"], image_emb=batch["image_emb"],
                          text_tokens=batch.get("text_tokens"))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: list[dict]) -> EvalResult:
        first = batches[0]
        images = first["images"]
        generator = torch.Generator().manual_seed(0)  # same timesteps and noise every time
        t = torch.randint(0, model.diffusion.num_timesteps, (len(images),),
                          generator=generator).to(images.device)
        noise = torch.randn(images.shape, generator=generator).to(images.device)
        val = model.loss(images=images, image_emb=first["image_emb"],
                         text_tokens=first.get("text_tokens"), t=t, noise=noise)
        # a fixed grid (the first test images' embeddings, fixed seed): comparable over time
        count = min(GRID_IMAGES, len(images))
        s = self.config.sampling
        tokens = first["text_tokens"][:count] if "text_tokens" in first else None
        samples = model.sample(image_emb=first["image_emb"][:count], text_tokens=tokens,
                               guidance_scale=s.decoder_guidance, sampler=s.sampler,
                               steps=s.decoder_steps, generator=torch.Generator().manual_seed(0))
        pairs = torch.cat([images[:count], samples]).clamp(-1, 1)
        grid = images_to_grid(((pairs + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu(),
                              nrow=count)
        return EvalResult({"val_loss": float(val["loss"])}, {"samples": grid})
