"""Priors: CLIP text embedding (+ per-token text encodings) -> CLIP image embedding.

Two choices (`PriorKind`): DALL-E 2's diffusion prior, a causal transformer predicting the clean
image embedding (Ramesh et al. 2022, sec. 2.2; Luo 2023, sec. 3.4, algorithms 4-5), and the MLP
"CLIP translator" of Zbinden 2022 (sec. 4.3) trained with plain MSE. Both see embeddings in a
normalised space whose statistics are buffers of `UnCLIPPrior`, so they are saved with the
weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import torch
import torch.nn.functional as F
from torch import nn

from models.diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType, beta_schedule
from models.timestep_embedding import sinusoidal_embedding
from models.typed_config import config_from_dict, config_to_dict


class PriorKind(StrEnum):
    DIFFUSION_TRANSFORMER = "diffusion_transformer"
    MLP_TRANSLATOR = "mlp_translator"


class EmbeddingNorm(StrEnum):
    NONE = "none"
    STANDARDISE = "standardise"  # per-dimension mean and std
    SCALE = "scale"  # per-dimension mean, one shared std: keeps the embedding geometry


@dataclass
class PriorConfig:
    kind: PriorKind = PriorKind.DIFFUSION_TRANSFORMER
    clip_embed_dim: int = 256
    text_width: int = 64
    context_length: int = 33
    width: int = 256
    layers: int = 8
    heads: int = 16
    mlp_ratio: float = 2.0
    dropout: float = 0.0
    num_timesteps: int = 200
    schedule: str = "cosine"
    mean_type: ModelMeanType = ModelMeanType.START_X
    cond_drop_prob: float = 0.1
    normalisation: EmbeddingNorm = EmbeddingNorm.SCALE
    num_candidates: int = 2

    def __post_init__(self):
        self.kind = PriorKind(self.kind)
        self.mean_type = ModelMeanType(self.mean_type)
        self.normalisation = EmbeddingNorm(self.normalisation)
        if self.kind is PriorKind.DIFFUSION_TRANSFORMER and self.width % self.heads:
            raise ValueError(f"prior width {self.width} must be divisible by heads {self.heads}")


class CausalSelfAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer block with causal scaled-dot-product attention.

    `past` holds keys and values [1, heads, P, head_dim] of P earlier positions that every
    sample shares; `x` then holds the positions after them. With `last_only` only the last
    position's output is computed. Returns the output and the keys and values of `x`."""

    def __init__(self, *, width: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.ln_attn = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.attn_out = nn.Linear(width, width)
        self.ln_mlp = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None = None,
                last_only: bool = False
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        batch, length, width = x.shape
        q, k, v = (self.qkv(self.ln_attn(x))
                   .reshape(batch, length, 3, self.heads, width // self.heads)
                   .permute(2, 0, 3, 1, 4))
        shared = 0 if past is None else past[0].shape[2]
        if past is not None:
            k = torch.cat([past[0].expand(batch, -1, -1, -1), k], dim=2)
            v = torch.cat([past[1].expand(batch, -1, -1, -1), v], dim=2)
        causal, mask = False, None
        if last_only:  # the last position sees everything: no mask, one query per sample
            q, x, length = q[:, :, -1:], x[:, -1:], 1
        elif past is None:
            causal = True
        else:  # position i of x sees every shared position and x's positions up to i
            mask = torch.ones(length, shared + length, dtype=torch.bool,
                              device=x.device).tril(diagonal=shared)
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal,
            dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.attn_out(attended.transpose(1, 2).reshape(batch, length, width)))
        return x + self.drop(self.mlp(self.ln_mlp(x))), (k[:, :, shared:], v[:, :, shared:])


class DiffusionPriorTransformer(nn.Module):
    """Causal transformer over [text tokens, text emb, timestep, noised image emb, query].

    The output at the final (query) position is the predicted clean image embedding. With
    `cond_drop[b]` True, the text tokens and text embedding of sample b are replaced by learned
    null vectors, which trains the unconditional model for classifier-free guidance.
    """

    def __init__(self, *, clip_embed_dim: int, text_width: int, context_length: int,
                 width: int, layers: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.width = width
        self.context_length = context_length
        self.dropout = dropout  # > 0 in training: every sample needs its own prefix masks
        self.text_tokens_in = nn.Linear(text_width, width)
        self.text_emb_in = nn.Linear(clip_embed_dim, width)
        self.noised_emb_in = nn.Linear(clip_embed_dim, width)
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.null_text_tokens = nn.Parameter(torch.randn(context_length, width) * 0.02)
        self.null_text_emb = nn.Parameter(torch.randn(width) * 0.02)
        self.query = nn.Parameter(torch.randn(width) * 0.02)
        self.position = nn.Parameter(torch.randn(context_length + 4, width) * 0.02)
        self.blocks = nn.ModuleList(
            CausalSelfAttentionBlock(width=width, heads=heads, mlp_ratio=mlp_ratio,
                                     dropout=dropout) for _ in range(layers))
        self.ln_out = nn.LayerNorm(width)
        self.out = nn.Linear(width, clip_embed_dim)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, *, text_emb: torch.Tensor,
                text_tokens: torch.Tensor | None = None,
                cond_drop: torch.Tensor | None = None) -> torch.Tensor:
        batch = x_t.shape[0]
        if text_tokens is not None and text_tokens.shape[1] != self.context_length:
            raise ValueError(f"prior expects {self.context_length} text tokens, "
                             f"got {text_tokens.shape[1]}")
        text = self.text_emb_in(text_emb)[:, None]
        if cond_drop is not None:
            text = torch.where(cond_drop.reshape(batch, 1, 1), self.null_text_emb.to(text.dtype),
                               text)
        time = self.time_mlp(sinusoidal_embedding(t, self.width).to(text.dtype))[:, None]
        noised = self.noised_emb_in(x_t)[:, None]
        query = self.query.to(text.dtype).expand(batch, 1, -1)
        tail = torch.cat([text, time, noised, query], dim=1)
        tail = tail + self.position[self.context_length:].to(tail.dtype)
        # Both branches run even when one has no rows, so every rank calls every module the
        # same number of times: ZeRO-3 gathers parameters per call, and ranks whose calls
        # differ would wait on each other's collectives forever.
        null_rows = self._null_token_rows(text_tokens, cond_drop, batch, tail.device)
        null_index, keep_index = null_rows.nonzero()[:, 0], (~null_rows).nonzero()[:, 0]
        shared_out = self._after_shared_null_tokens(tail[null_index])
        tokens = self._token_inputs(
            None if text_tokens is None else text_tokens[keep_index],
            None if cond_drop is None else cond_drop[keep_index], len(keep_index), tail.dtype)
        x = torch.cat([tokens, tail[keep_index]], dim=1)
        for index, block in enumerate(self.blocks):
            x, _ = block(x, last_only=index == len(self.blocks) - 1)
        out = torch.zeros(batch, self.width, dtype=x.dtype, device=x.device).index_copy(
            0, torch.cat([null_index, keep_index]), torch.cat([shared_out.to(x.dtype), x[:, -1]]))
        return self.out(self.ln_out(out))

    def _null_token_rows(self, text_tokens, cond_drop, batch: int, device) -> torch.Tensor:
        """Rows that see only the null text tokens: all without tokens, else the dropped ones.
        No rows with dropout in training, where every sample needs its own dropout masks."""
        if self.training and self.dropout:
            return torch.zeros(batch, dtype=torch.bool, device=device)
        if text_tokens is None:
            return torch.ones(batch, dtype=torch.bool, device=device)
        if cond_drop is None:
            return torch.zeros(batch, dtype=torch.bool, device=device)
        return cond_drop.reshape(batch).to(device=device, dtype=torch.bool)

    def _token_inputs(self, text_tokens, cond_drop, batch: int, dtype) -> torch.Tensor:
        """Projected text tokens (null tokens where none are given or `cond_drop` is set)."""
        if text_tokens is None:
            tokens = self.null_text_tokens.expand(batch, -1, -1)
        else:
            tokens = self.text_tokens_in(text_tokens)
            if cond_drop is not None:
                tokens = torch.where(cond_drop.reshape(batch, 1, 1),
                                     self.null_text_tokens.to(tokens.dtype), tokens)
        return tokens.to(dtype) + self.position[: self.context_length].to(dtype)

    def _after_shared_null_tokens(self, tail: torch.Tensor) -> torch.Tensor:
        """The query output of rows whose text tokens are the null ones. Their first positions
        are the same for every such sample, and causal attention keeps them independent of
        what follows: run them once (batch 1) and let each sample's 4 positions attend to
        their keys and values. The same result as the full sequence with about
        context_length / 4 times less work per sample: all of a prior trained without text
        tokens, the dropped 10% of a batch in training, the unconditional half of guidance."""
        shared = (self.null_text_tokens + self.position[: self.context_length])[None]
        shared = shared.to(tail.dtype)
        x = tail
        for index, block in enumerate(self.blocks):
            shared, past = block(shared)
            x, _ = block(x, past=past, last_only=index == len(self.blocks) - 1)
        return x[:, -1]


class MLPTranslator(nn.Module):
    """CLIP translator of Zbinden 2022 (sec. 4.3.1, fig. 4.4): residual MLP blocks (LayerNorm,
    Linear, GELU, dropout)."""

    def __init__(self, *, clip_embed_dim: int, width: int, layers: int, dropout: float):
        super().__init__()
        self.inp = nn.Linear(clip_embed_dim, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(),
                          nn.Dropout(dropout))
            for _ in range(layers))
        self.ln_out = nn.LayerNorm(width)
        self.out = nn.Linear(width, clip_embed_dim)

    def forward(self, text_emb: torch.Tensor) -> torch.Tensor:
        x = self.inp(text_emb)
        for block in self.blocks:
            x = x + block(x)
        return self.out(self.ln_out(x))


class UnCLIPPrior(nn.Module):
    """Network + diffusion + normalisation statistics; `loss` for training, `sample` for use.

    Embeddings go in and come out in CLIP space. Inside, image embeddings are normalised with
    the `emb_mean`/`emb_std` buffers (set them with `set_normalisation`; the defaults assume
    unit-norm embeddings) and text embeddings are L2-normalised and scaled to unit per-dim
    variance, so the network never sees the arbitrary scale of a CLIP projection.
    `text_tokens` are CLIP per-token encodings [B, L, text_width] (floats, not token ids).
    """

    def __init__(self, *, config: PriorConfig):
        super().__init__()
        self.prior_config = config
        dim = config.clip_embed_dim
        if config.kind is PriorKind.DIFFUSION_TRANSFORMER:
            self.network = DiffusionPriorTransformer(
                clip_embed_dim=dim, text_width=config.text_width,
                context_length=config.context_length, width=config.width, layers=config.layers,
                heads=config.heads, mlp_ratio=config.mlp_ratio, dropout=config.dropout)
            self.diffusion = GaussianDiffusion(
                betas=beta_schedule(config.schedule, config.num_timesteps),
                model_mean_type=config.mean_type, model_var_type=ModelVarType.FIXED_SMALL,
                loss_type=LossType.MSE)
        else:
            self.network = MLPTranslator(clip_embed_dim=dim, width=config.width,
                                         layers=config.layers, dropout=config.dropout)
            self.diffusion = None
        self.register_buffer("emb_mean", torch.zeros(dim))
        default_std = 1.0 if config.normalisation is EmbeddingNorm.NONE else 1.0 / math.sqrt(dim)
        self.register_buffer("emb_std", torch.full((dim,), default_std))

    @property
    def config(self) -> dict:
        return config_to_dict(self.prior_config)

    @torch.no_grad()
    def set_normalisation(self, image_emb_sample: torch.Tensor) -> None:
        """Fit the image-embedding statistics on a sample [N, D] of training embeddings."""
        sample = image_emb_sample.float().to(self.emb_mean.device)
        mode = self.prior_config.normalisation
        if mode is EmbeddingNorm.NONE:
            return
        self.emb_mean.copy_(sample.mean(dim=0))
        centred = sample - self.emb_mean
        if mode is EmbeddingNorm.STANDARDISE:
            self.emb_std.copy_(centred.std(dim=0).clamp(min=1e-6))
        else:
            self.emb_std.fill_(float(centred.pow(2).mean().sqrt().clamp(min=1e-6)))

    def normalise(self, image_emb: torch.Tensor) -> torch.Tensor:
        return (image_emb.float() - self.emb_mean) / self.emb_std

    def unnormalise(self, normalised: torch.Tensor) -> torch.Tensor:
        return normalised.float() * self.emb_std + self.emb_mean

    def _text_condition(self, text_emb: torch.Tensor) -> torch.Tensor:
        return F.normalize(text_emb.float(), dim=-1) * math.sqrt(text_emb.shape[-1])

    def loss(self, *, text_emb: torch.Tensor, image_emb: torch.Tensor,
             text_tokens: torch.Tensor | None = None, t: torch.Tensor | None = None,
             noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Mean losses ("loss", "mse"); `t`/`noise` default to random draws (diffusion only)."""
        target = self.normalise(image_emb)
        text = self._text_condition(text_emb)
        if self.diffusion is None:
            mse = F.mse_loss(self.network(text).float(), target)
            return {"loss": mse, "mse": mse}
        batch = target.shape[0]
        if t is None:
            t = torch.randint(0, self.diffusion.num_timesteps, (batch,), device=target.device)
        cond_drop = torch.rand(batch, device=target.device) < self.prior_config.cond_drop_prob
        terms = self.diffusion.training_losses(
            self.network, target, t, noise=noise,
            model_kwargs={"text_emb": text, "text_tokens": text_tokens, "cond_drop": cond_drop})
        return {"loss": terms["loss"].mean(), "mse": terms["mse"].mean()}

    @torch.no_grad()
    def sample(self, *, text_emb: torch.Tensor, text_tokens: torch.Tensor | None = None,
               guidance_scale: float = 1.0, num_candidates: int | None = None,
               sampler: str = "ddpm", steps: int | None = None, eta: float = 0.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Image embeddings [B, D] in CLIP space.

        Diffusion: draws `num_candidates` per text and keeps the one with the largest dot
        product with the text embedding (Ramesh et al. 2022, sec. 2.2; Luo 2023, algorithm 5).
        MLP: one deterministic forward.
        """
        was_training = self.training
        self.eval()
        try:
            text = self._text_condition(text_emb)
            if self.diffusion is None:
                return self.unnormalise(self.network(text))
            n = num_candidates or self.prior_config.num_candidates
            batch, dim = text.shape
            kwargs = {"text_emb": text.repeat_interleave(n, dim=0)}
            if text_tokens is not None:
                kwargs["text_tokens"] = text_tokens.repeat_interleave(n, dim=0)
            normalised = self.diffusion.sample(
                self.network, (batch * n, dim), model_kwargs=kwargs,
                guidance_scale=guidance_scale, sampler=sampler, steps=steps, eta=eta,
                generator=generator, device=text.device)
            candidates = self.unnormalise(normalised).reshape(batch, n, dim)
            scores = (candidates * text_emb.float()[:, None]).sum(dim=-1)
            best = scores.argmax(dim=1)
            return candidates[torch.arange(batch, device=best.device), best]
        finally:
            self.train(was_training)


def build_prior(config: dict) -> UnCLIPPrior:
    """Rebuild a prior (random weights) from its `.config` dict."""
    return UnCLIPPrior(config=config_from_dict(PriorConfig, config, what="prior config"))
