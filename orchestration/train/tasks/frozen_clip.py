"""Stages after CLIP read the trained CLIP's portable weights, frozen."""

from __future__ import annotations

from torch import nn

from orchestration.common.layout import portable_uri
from orchestration.train.tasks.base import load_portable, read_portable_config


def clip_weights_uri(config) -> str:
    return portable_uri(config, "clip")


def load_frozen_clip(config, device) -> nn.Module:
    _, clip = load_portable(clip_weights_uri(config))
    clip.requires_grad_(False)
    return clip.eval().to(device)


def clip_sizes(config) -> tuple[int, int, int]:
    """(embedding dim, text width, context length) of the trained CLIP, from its config."""
    meta = read_portable_config(clip_weights_uri(config))["config"]
    return (meta["embed_dim"], meta["text_cfg"].get("width", 512),
            meta["text_cfg"].get("context_length", 77))


def preset_clip_sizes(config) -> tuple[int, int, int]:
    """The sizes the configured CLIP section will train with (before it is trained)."""
    from models.clip_model import clip_model_config

    cfg = clip_model_config(config.clip.preset,
                            context_length=config.data.preprocess.context_length,
                            **config.clip.overrides)
    text = cfg["text_cfg"]
    return cfg["embed_dim"], text.get("width", 512), text.get("context_length", 77)
