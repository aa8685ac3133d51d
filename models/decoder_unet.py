"""ADM/GLIDE-style U-Net for the unCLIP decoder. Pure nn: it knows nothing about diffusion.

Conditioning (Luo 2023, sec. 3.3.1; Ramesh et al. 2022, sec. 2.1):
- the CLIP image embedding is projected into `num_image_tokens` context tokens that every
  attention layer attends to, and optionally also added to the timestep embedding
  (`TimeConditioning`; Luo 2023, sec. 3.3.1, found adding hurt, Zbinden 2022, sec. 4.2.1,
  used it);
- optional per-token CLIP text encodings, projected into more context tokens;
- learned null tokens replace dropped conditioning (classifier-free guidance).
A super-resolution stage reuses this network with `low_res_channels` > 0: the (upsampled)
low-resolution image is concatenated to x_t as extra input channels.
"""

from __future__ import annotations

from enum import StrEnum

import torch
import torch.nn.functional as F
from torch import nn

from models.timestep_embedding import sinusoidal_embedding


class TimeConditioning(StrEnum):
    TIMESTEP = "timestep"  # timestep embedding only (Luo 2023, sec. 3.3.1)
    # also add the projected image emb (ADM; Ramesh et al. 2022, sec. 2.1; Zbinden 2022, sec. 4.2.1)
    TIMESTEP_PLUS_IMAGE_EMB = "timestep_plus_image_emb"


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels // 4) or 1, channels)


def _zeroed(module: nn.Module) -> nn.Module:
    # Residual branches start as identity, which keeps deep U-Nets stable at initialisation.
    # Through `apply`: DeepSpeed's zero.Init, which partitions each module as soon as it is
    # built, gathers the parameters around an `apply` (and returns None from it, hence no
    # `return module.apply(...)`), so this also holds for such a model.
    module.apply(_zero_own_parameters)
    return module


def _zero_own_parameters(module: nn.Module) -> None:
    for param in module.parameters(recurse=False):
        nn.init.zeros_(param)


class ResBlock(nn.Module):
    def __init__(self, *, in_channels: int, out_channels: int, time_dim: int, dropout: float):
        super().__init__()
        self.in_layers = nn.Sequential(_group_norm(in_channels), nn.SiLU(),
                                       nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, out_channels))
        self.out_layers = nn.Sequential(
            _group_norm(out_channels), nn.SiLU(), nn.Dropout(dropout),
            _zeroed(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip = (nn.Identity() if in_channels == out_channels
                     else nn.Conv2d(in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor, context=None) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.time_proj(time_emb)[:, :, None, None].to(h.dtype)
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Self-attention over pixels that also attends to context tokens (GLIDE's encoder_kv)."""

    def __init__(self, *, channels: int, head_channels: int, context_dim: int):
        super().__init__()
        if channels % head_channels:
            raise ValueError(f"channels {channels} not divisible by head_channels {head_channels}")
        self.heads = channels // head_channels
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.context_kv = nn.Linear(context_dim, 2 * channels)
        self.out = _zeroed(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor, time_emb=None, context=None) -> torch.Tensor:
        batch, channels, height, width = x.shape
        q, k, v = self.qkv(self.norm(x).reshape(batch, channels, -1)).chunk(3, dim=1)
        if context is not None:
            ck, cv = self.context_kv(context).to(k.dtype).transpose(1, 2).chunk(2, dim=1)
            k, v = torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)

        def heads(tensor):  # [B, C, N] -> [B, heads, N, C / heads]
            return tensor.reshape(batch, self.heads, channels // self.heads, -1).transpose(2, 3)

        attended = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        attended = attended.transpose(2, 3).reshape(batch, channels, -1)
        return x + self.out(attended).reshape(batch, channels, height, width)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x, time_emb=None, context=None):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, time_emb=None, context=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.ModuleList):
    """Layers sharing one call signature (x, time_emb, context)."""

    def forward(self, x, time_emb, context):
        for layer in self:
            x = layer(x, time_emb, context)
        return x


class DecoderUNet(nn.Module):
    def __init__(self, *, image_size: int, in_channels: int = 3, low_res_channels: int = 0,
                 out_channels: int = 3, base_channels: int = 64,
                 channel_mults: tuple[int, ...] = (1, 2, 4), num_res_blocks: int = 2,
                 attention_resolutions: tuple[int, ...] = (16, 8), head_channels: int = 32,
                 dropout: float = 0.0, clip_embed_dim: int = 256, num_image_tokens: int = 4,
                 text_width: int | None = None,
                 time_conditioning: TimeConditioning = TimeConditioning.TIMESTEP,
                 time_embed_dim: int | None = None):
        super().__init__()
        self.base_channels = base_channels
        self.num_image_tokens = num_image_tokens
        self.time_conditioning = TimeConditioning(time_conditioning)
        time_dim = time_embed_dim or 4 * base_channels
        context_dim = 4 * base_channels
        self._build_conditioning(base_channels, time_dim, context_dim, clip_embed_dim,
                                 num_image_tokens, text_width)

        def res_block(channels_in, channels_out):
            return ResBlock(in_channels=channels_in, out_channels=channels_out,
                            time_dim=time_dim, dropout=dropout)

        def attention(channels):
            return AttentionBlock(channels=channels, head_channels=head_channels,
                                  context_dim=context_dim)

        self.input_conv = nn.Conv2d(in_channels + low_res_channels, base_channels, 3, padding=1)
        widths = [base_channels * mult for mult in channel_mults]
        attends = [image_size // 2**level in attention_resolutions
                   for level in range(len(channel_mults))]
        skip_channels = self._build_down(widths, attends, num_res_blocks, res_block, attention)
        channels = widths[-1]
        self.middle = Stage([res_block(channels, channels), attention(channels),
                             res_block(channels, channels)])
        self._build_up(widths, attends, num_res_blocks, skip_channels, res_block, attention)
        self.output = nn.Sequential(_group_norm(widths[0]), nn.SiLU(),
                                    _zeroed(nn.Conv2d(widths[0], out_channels, 3, padding=1)))

    def _build_conditioning(self, base_channels, time_dim, context_dim, clip_embed_dim,
                            num_image_tokens, text_width):
        """Timestep MLP, CLIP image embedding -> context tokens (and optionally -> time),
        text tokens -> context, each with its learned null for classifier-free guidance."""
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, time_dim), nn.SiLU(),
                                      nn.Linear(time_dim, time_dim))
        self.image_tokens_in = nn.Linear(clip_embed_dim, num_image_tokens * context_dim)
        self.null_image_tokens = nn.Parameter(torch.randn(num_image_tokens, context_dim) * 0.02)
        if self.time_conditioning is TimeConditioning.TIMESTEP_PLUS_IMAGE_EMB:
            self.image_emb_to_time = nn.Linear(clip_embed_dim, time_dim)
            self.null_image_time = nn.Parameter(torch.zeros(time_dim))
        if text_width is not None:
            self.text_tokens_in = nn.Sequential(nn.Linear(text_width, context_dim),
                                                nn.LayerNorm(context_dim))
            # One learned null token, repeated to the text length: works for any context length.
            self.null_text_token = nn.Parameter(torch.randn(1, 1, context_dim) * 0.02)
        self.uses_text = text_width is not None
        self.context_norm = nn.LayerNorm(context_dim)

    def _build_down(self, widths, attends, num_res_blocks, res_block, attention) -> list[int]:
        """The encoder half; returns the channels of each skip connection, outermost first."""
        self.down = nn.ModuleList()
        skip_channels, channels = [widths[0]], widths[0]
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                stage = Stage([res_block(channels, width)])
                channels = width
                if attends[level]:
                    stage.append(attention(channels))
                self.down.append(stage)
                skip_channels.append(channels)
            if level != len(widths) - 1:
                self.down.append(Stage([Downsample(channels)]))
                skip_channels.append(channels)
        return skip_channels

    def _build_up(self, widths, attends, num_res_blocks, skip_channels, res_block, attention):
        """The decoder half: one more block per level than the encoder, taking every skip."""
        self.up = nn.ModuleList()
        channels = widths[-1]
        for level in reversed(range(len(widths))):
            for block in range(num_res_blocks + 1):
                stage = Stage([res_block(channels + skip_channels.pop(), widths[level])])
                channels = widths[level]
                if attends[level]:
                    stage.append(attention(channels))
                if level and block == num_res_blocks:
                    stage.append(Upsample(channels))
                self.up.append(stage)

    def _context(self, image_emb, text_tokens, image_drop, text_drop):
        batch = image_emb.shape[0]
        image = self.image_tokens_in(image_emb).reshape(batch, self.num_image_tokens, -1)
        image = torch.where(image_drop.reshape(batch, 1, 1),
                            self.null_image_tokens.to(image.dtype), image)
        parts = [image]
        if self.uses_text:
            null_text = self.null_text_token.to(image.dtype)
            if text_tokens is None:
                text = null_text.expand(batch, 1, -1)
            else:
                text = torch.where(text_drop.reshape(batch, 1, 1), null_text,
                                   self.text_tokens_in(text_tokens).to(image.dtype))
            parts.append(text)
        return self.context_norm(torch.cat(parts, dim=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, *, image_emb: torch.Tensor,
                text_tokens: torch.Tensor | None = None, cond_drop: torch.Tensor | None = None,
                image_drop: torch.Tensor | None = None, text_drop: torch.Tensor | None = None,
                low_res: torch.Tensor | None = None) -> torch.Tensor:
        """Predict from x_t [B, C, H, W] and timesteps t [B].

        `cond_drop` drops all conditioning (the unconditional model of guidance); `image_drop`
        and `text_drop` drop one input each (the separate dropout rates of Ramesh et al. 2022,
        sec. 2.1).
        """
        batch = x.shape[0]
        no_drop = torch.zeros(batch, dtype=torch.bool, device=x.device)
        cond_drop = no_drop if cond_drop is None else cond_drop
        image_drop = cond_drop | (no_drop if image_drop is None else image_drop)
        text_drop = cond_drop | (no_drop if text_drop is None else text_drop)

        time_emb = self.time_mlp(sinusoidal_embedding(t, self.base_channels))
        if self.time_conditioning is TimeConditioning.TIMESTEP_PLUS_IMAGE_EMB:
            extra = self.image_emb_to_time(image_emb)
            time_emb = time_emb + torch.where(image_drop[:, None],
                                              self.null_image_time.to(extra.dtype), extra)
        context = self._context(image_emb, text_tokens, image_drop, text_drop)
        h = self.input_conv(x if low_res is None else torch.cat([x, low_res], dim=1))
        skips = [h]
        for stage in self.down:
            h = stage(h, time_emb, context)
            skips.append(h)
        h = self.middle(h, time_emb, context)
        for stage in self.up:
            h = stage(torch.cat([h, skips.pop().to(h.dtype)], dim=1), time_emb, context)
        return self.output(h)
