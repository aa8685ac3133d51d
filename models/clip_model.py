"""CLIP through open_clip: our small configs, an offline tokenizer, per-token text outputs, loss.

Our presets (`shapes-tiny`, `shapes-paper`) are JSON model configs in `clip_configs/`, registered
with open_clip's own registry, so `open_clip.list_models()` shows them next to ViT-B-32 and RN50.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from open_clip.transformer import text_global_pool
from torch import nn

CLIP_CONFIG_DIR = Path(__file__).parent / "clip_configs"
OUR_CLIP_MODELS = ("shapes-tiny", "shapes-paper")
MAX_LOGIT_SCALE = math.log(100.0)  # temperature 1/100 at the sharpest, as in CLIP

_VISION_KEYS = {f.name for f in dataclasses.fields(CLIPVisionCfg)}
_TEXT_KEYS = {f.name for f in dataclasses.fields(CLIPTextCfg)}
_TOP_KEYS = {"embed_dim", "quick_gelu", "init_logit_scale", "init_logit_bias"}


@functools.cache
def register_clip_configs() -> None:
    """Add our JSON configs to open_clip's model registry (idempotent)."""
    open_clip.add_model_config(CLIP_CONFIG_DIR)


def valid_clip_override_keys() -> list[str]:
    """Flat override keys: top-level ones, `vision_<field>` and `text_<field>`."""
    keys = set(_TOP_KEYS)
    keys |= {f"vision_{k}" for k in _VISION_KEYS} | {f"text_{k}" for k in _TEXT_KEYS}
    return sorted(keys)


def clip_model_config(name: str, *, context_length: int | None = None, **overrides) -> dict:
    """The open_clip model config dict for `name` with flat overrides applied."""
    register_clip_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"unknown CLIP model {name!r}; known: {open_clip.list_models()}")
    cfg = copy.deepcopy(cfg)
    if cfg.get("custom_text") or "hf_model_name" in cfg.get("text_cfg", {}):
        raise ValueError(f"{name!r} uses a custom/HF text tower; only the built-in CLIP text "
                         "transformer exposes the per-token encodings the prior needs")
    cfg.pop("custom_text", None)
    for key, value in overrides.items():
        if key in _TOP_KEYS:
            cfg[key] = value
        elif key.startswith("vision_") and key[len("vision_"):] in _VISION_KEYS:
            cfg["vision_cfg"][key[len("vision_"):]] = value
        elif key.startswith("text_") and key[len("text_"):] in _TEXT_KEYS:
            cfg["text_cfg"][key[len("text_"):]] = value
        else:
            raise ValueError(f"unknown CLIP override {key!r}; valid: {valid_clip_override_keys()}")
    if context_length is not None:
        cfg["text_cfg"]["context_length"] = context_length
    return cfg


def clip_from_config(cfg: dict) -> open_clip.CLIP:
    """Build a randomly initialised CLIP from a config dict; the dict is kept on the model."""
    # A 1-element temperature instead of a 0-d one: DeepSpeed broadcasts parameters as byte
    # views, which 0-d tensors do not support (also while zero.Init partitions the model as it
    # is built, so the shape is set at construction). Broadcasting makes the maths identical.
    model = open_clip.CLIP(**copy.deepcopy(cfg), nonscalar_logit_scale=True)
    # Kept so that a pipeline can save the exact architecture next to the weights.
    model.unclip_model_cfg = copy.deepcopy(cfg)
    return model


def build_clip(name: str, *, context_length: int | None = None, **overrides) -> open_clip.CLIP:
    """A randomly initialised CLIP (never downloads weights): our presets or open_clip names."""
    return clip_from_config(clip_model_config(name, context_length=context_length, **overrides))


@functools.cache
def _simple_tokenizer() -> open_clip.SimpleTokenizer:
    # The BPE vocabulary ships inside the open_clip wheel, so this works offline.
    return open_clip.SimpleTokenizer()


def tokenize(texts: list[str], *, context_length: int) -> torch.LongTensor:
    """BPE token ids [B, context_length], padded with 0 and truncated with an end token."""
    if isinstance(texts, str):
        raise TypeError("tokenize expects a list of strings, not a single string")
    return _simple_tokenizer()(list(texts), context_length=context_length)


def encode_text_with_tokens(
    model: open_clip.CLIP, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(text embedding [B, D], per-token encodings [B, L, W] after ln_final).

    Mirrors `CLIP.encode_text` but keeps the token sequence, which the prior and the decoder
    read as the "text encoding" (Luo 2023, sec. 3.2.1).
    """
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding.to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask)
    token_encodings = model.ln_final(x)
    pooled = text_global_pool(token_encodings, tokens, model.text_pool_type,
                              eos_token_id=getattr(model, "text_eos_id", None))
    projection = model.text_projection
    if projection is None:
        text_embedding = pooled
    elif isinstance(projection, nn.Linear):
        text_embedding = projection(pooled)
    else:
        text_embedding = pooled @ projection
    return text_embedding, token_encodings


@torch.no_grad()
def clamp_logit_scale_(model: nn.Module) -> None:
    """Clamp the learnable log inverse temperature in place to [0, log 100].

    Call after every optimizer step (as open_clip's training loop does); `ClipContrastiveLoss`
    also clamps the value it uses, so a forgotten call cannot make the loss blow up.
    """
    model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)


class ClipContrastiveLoss(nn.Module):
    """Symmetric InfoNCE over (image, text) pairs, gathered across ranks by open_clip's ClipLoss.

    `local_loss=True, gather_with_grad=True`: each rank scores its own rows against the gathered
    columns, so memory grows linearly with the global batch while gradients match the full loss.
    The temperature is the model's `logit_scale` (open_clip initialises it to log(1/0.07)).
    """

    def __init__(self, *, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.clip_loss = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True,
                                  rank=rank, world_size=world_size)

    def forward(self, *, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
        image_features = F.normalize(image_features.float(), dim=-1)
        text_features = F.normalize(text_features.float(), dim=-1)
        scale = logit_scale.float().clamp(max=MAX_LOGIT_SCALE).exp()
        return self.clip_loss(image_features, text_features, scale)
