"""The unCLIP decoder: CLIP image embedding (+ optional text encodings) -> image in [-1, 1].

Owns the U-Net, the GaussianDiffusion and the conditioning-dropout policy, so training code calls
`loss` and serving code calls `sample` without knowing either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import torch
import torch.nn.functional as F
from torch import nn

from models.decoder_unet import DecoderUNet, TimeConditioning
from models.diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    Thresholding,
    beta_schedule,
)
from models.typed_config import config_from_dict, config_to_dict


class CondDropMode(StrEnum):
    # drop image emb and text together with cond_drop_prob (Luo 2023, sec. 3.3.2: 0.2)
    JOINT = "joint"
    # independent image_drop_prob / text_drop_prob (Ramesh et al. 2022, sec. 2.1: 0.1 / 0.5)
    SEPARATE = "separate"


@dataclass
class DecoderConfig:
    image_size: int = 32
    clip_embed_dim: int = 256
    text_width: int | None = None  # None: condition on the image embedding only
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16, 8)
    head_channels: int = 32
    dropout: float = 0.0
    num_image_tokens: int = 4
    time_conditioning: TimeConditioning = TimeConditioning.TIMESTEP
    time_embed_dim: int | None = None  # None: 4 * base_channels (ADM)
    low_res_channels: int = 0  # > 0 makes this a super-resolution stage
    num_timesteps: int = 300
    schedule: str = "cosine"
    mean_type: ModelMeanType = ModelMeanType.EPSILON
    var_type: ModelVarType = ModelVarType.FIXED_SMALL  # LEARNED_RANGE trains with the hybrid loss
    snr_gamma: float | None = None  # min-SNR-gamma loss weighting (Hang et al. 2023); None: off
    cond_drop_mode: CondDropMode = CondDropMode.JOINT
    cond_drop_prob: float = 0.2
    image_drop_prob: float = 0.1
    text_drop_prob: float = 0.5

    def __post_init__(self):
        self.channel_mults = tuple(self.channel_mults)
        self.attention_resolutions = tuple(self.attention_resolutions)
        self.time_conditioning = TimeConditioning(self.time_conditioning)
        self.mean_type = ModelMeanType(self.mean_type)
        self.var_type = ModelVarType(self.var_type)
        self.cond_drop_mode = CondDropMode(self.cond_drop_mode)
        if self.image_size % 2 ** (len(self.channel_mults) - 1):
            raise ValueError(f"image_size {self.image_size} must be divisible by "
                             f"2**{len(self.channel_mults) - 1} for channel_mults "
                             f"{self.channel_mults}")


class UnCLIPDecoder(nn.Module):
    """U-Net + diffusion. Image embeddings are L2-normalised (times sqrt(D)) before use, so the
    decoder sees the cosine geometry CLIP was trained for, whatever the embedding's scale."""

    def __init__(self, *, config: DecoderConfig):
        super().__init__()
        self.decoder_config = config
        learned = config.var_type is ModelVarType.LEARNED_RANGE
        self.unet = DecoderUNet(
            image_size=config.image_size, low_res_channels=config.low_res_channels,
            out_channels=6 if learned else 3, base_channels=config.base_channels,
            channel_mults=config.channel_mults, num_res_blocks=config.num_res_blocks,
            attention_resolutions=config.attention_resolutions,
            head_channels=config.head_channels, dropout=config.dropout,
            clip_embed_dim=config.clip_embed_dim, num_image_tokens=config.num_image_tokens,
            text_width=config.text_width,
            time_conditioning=config.time_conditioning, time_embed_dim=config.time_embed_dim)
        self.diffusion = GaussianDiffusion(
            betas=beta_schedule(config.schedule, config.num_timesteps),
            model_mean_type=config.mean_type, model_var_type=config.var_type,
            loss_type=LossType.HYBRID if learned else LossType.MSE, snr_gamma=config.snr_gamma)

    @property
    def config(self) -> dict:
        return config_to_dict(self.decoder_config)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.decoder_config.image_size, self.decoder_config.image_size)

    def _model_kwargs(self, image_emb, text_tokens) -> dict:
        image_emb = F.normalize(image_emb.float(), dim=-1) * math.sqrt(image_emb.shape[-1])
        return {"image_emb": image_emb, "text_tokens": text_tokens}

    def _training_drops(self, batch: int, device) -> dict:
        config = self.decoder_config
        if config.cond_drop_mode is CondDropMode.JOINT:
            return {"cond_drop": torch.rand(batch, device=device) < config.cond_drop_prob}
        return {"image_drop": torch.rand(batch, device=device) < config.image_drop_prob,
                "text_drop": torch.rand(batch, device=device) < config.text_drop_prob}

    def loss(self, *, images: torch.Tensor, image_emb: torch.Tensor,
             text_tokens: torch.Tensor | None = None, low_res: torch.Tensor | None = None,
             t: torch.Tensor | None = None,
             noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Mean losses over the batch: "loss", "mse" and, with learned variance, "vb".

        `t` and `noise` default to fresh random draws; pass them for a reproducible
        (validation) loss.
        """
        batch = images.shape[0]
        if t is None:
            t = torch.randint(0, self.diffusion.num_timesteps, (batch,), device=images.device)
        kwargs = self._model_kwargs(image_emb, text_tokens)
        kwargs.update(self._training_drops(batch, images.device))
        if low_res is not None:
            kwargs["low_res"] = low_res
        terms = self.diffusion.training_losses(self.unet, images.float(), t, model_kwargs=kwargs,
                                               noise=noise)
        return {name: value.mean() for name, value in terms.items()}

    @torch.no_grad()
    def sample(self, *, image_emb: torch.Tensor, text_tokens: torch.Tensor | None = None,
               guidance_scale: float = 1.0, sampler: str = "ddpm", steps: int | None = None,
               eta: float = 0.0, thresholding: Thresholding | str = Thresholding.STATIC,
               dynamic_percentile: float = 0.995, generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1]."""
        was_training = self.training
        self.eval()
        try:
            images = self.diffusion.sample(
                self.unet, (image_emb.shape[0], *self.image_shape),
                model_kwargs=self._model_kwargs(image_emb, text_tokens),
                guidance_scale=guidance_scale, sampler=sampler, steps=steps, eta=eta,
                clip_denoised=thresholding, dynamic_percentile=dynamic_percentile,
                generator=generator, noise=noise, device=image_emb.device)
            return images.clamp(-1.0, 1.0)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def invert(self, images: torch.Tensor, *, image_emb: torch.Tensor,
               text_tokens: torch.Tensor | None = None, steps: int | None = None,
               guidance_scale: float = 1.0) -> torch.Tensor:
        """DDIM inversion: the x_T that DDIM (eta=0, same steps) decodes back to `images`."""
        was_training = self.training
        self.eval()
        try:
            return self.diffusion.ddim_invert(
                self.unet, images.float(), model_kwargs=self._model_kwargs(image_emb, text_tokens),
                steps=steps, guidance_scale=guidance_scale)
        finally:
            self.train(was_training)


def build_decoder(config: dict) -> UnCLIPDecoder:
    """Rebuild a decoder (random weights) from its `.config` dict."""
    return UnCLIPDecoder(config=config_from_dict(DecoderConfig, config, what="decoder config"))
