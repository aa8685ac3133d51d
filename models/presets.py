"""Named model sizes for every component, so users pick by name and parameter count.

Prior and decoder presets are partial config dicts; the CLIP-dependent sizes (embedding dim,
text width, context length) are supplied at build time from the CLIP actually trained.
"""

from __future__ import annotations

import torch

from models.clip_model import build_clip, clip_model_config
from models.decoder import DecoderConfig, UnCLIPDecoder
from models.prior import PriorConfig, UnCLIPPrior
from models.typed_config import check_known_keys

# CLIP presets: open_clip model names (ours are registered JSON configs in clip_configs/).
CLIP_PRESETS: dict[str, dict] = {
    "shapes-tiny": {},
    # Luo 2023, sec. 3.2 and appendix A: ResNet image tower, 8-layer width-64 text, 256-d embedding
    "shapes-paper": {},
    "ViT-B-32": {},  # standard open_clip architecture for clusters (random init)
}

PRIOR_PRESETS: dict[str, dict] = {
    "shapes-tiny": {"width": 128, "layers": 2, "heads": 4, "num_timesteps": 100},
    # Luo 2023, appendix A: 8 layers, width 256, 16 heads, 200 cosine steps; x0 prediction
    # as in its sec. 3.4.2
    "shapes-paper": {"width": 256, "layers": 8, "heads": 16, "mlp_ratio": 2.0,
                     "num_timesteps": 200, "schedule": "cosine", "mean_type": "start_x"},
    # Zbinden 2022, sec. 4.3: 30 residual MLP layers, dropout 0.1, MSE, no diffusion
    "mlp-translator": {"kind": "mlp_translator", "width": 1024, "layers": 30, "dropout": 0.1},
}

DECODER_PRESETS: dict[str, dict] = {
    "shapes-tiny": {"image_size": 32, "base_channels": 32, "channel_mults": (1, 2, 2),
                    "num_res_blocks": 1, "attention_resolutions": (8,), "num_timesteps": 100},
    # Luo 2023, appendix A: channels 64/128/256, 300 cosine steps, eps, null rate 0.2
    "shapes-paper": {"image_size": 32, "base_channels": 64, "channel_mults": (1, 2, 4),
                     "num_res_blocks": 1, "attention_resolutions": (8,), "time_embed_dim": 32,
                     "num_timesteps": 300, "schedule": "cosine", "mean_type": "epsilon",
                     "cond_drop_mode": "joint", "cond_drop_prob": 0.2},
    # Zbinden 2022, sec. 4.2 style: 64x64, learned variance + hybrid loss, 1000 cosine steps,
    # image embedding also added to the timestep embedding, dropout 0.1
    "cluster-64": {"image_size": 64, "base_channels": 128, "channel_mults": (1, 2, 3, 4),
                   "num_res_blocks": 3, "attention_resolutions": (32, 16, 8),
                   "head_channels": 64, "dropout": 0.1, "num_timesteps": 1000,
                   "schedule": "cosine", "var_type": "learned_range",
                   "time_conditioning": "timestep_plus_image_emb",
                   "cond_drop_mode": "separate", "image_drop_prob": 0.1, "text_drop_prob": 0.5},
}


def _preset(table: dict[str, dict], name: str, component: str) -> dict:
    if name not in table:
        raise ValueError(f"unknown {component} preset {name!r}; known: {sorted(table)}")
    return dict(table[name])


def build_clip_preset(name: str, **overrides):
    """A randomly initialised CLIP; overrides as in `build_clip` (e.g. text_layers=2)."""
    _preset(CLIP_PRESETS, name, "clip")
    return build_clip(name, **{**CLIP_PRESETS[name], **overrides})


def prior_preset_config(name: str, *, clip_embed_dim: int, text_width: int,
                        context_length: int, **overrides) -> PriorConfig:
    values = _preset(PRIOR_PRESETS, name, "prior")
    values.update(clip_embed_dim=clip_embed_dim, text_width=text_width,
                  context_length=context_length)
    check_known_keys(PriorConfig, overrides, what="prior override")
    return PriorConfig(**{**values, **overrides})


def build_prior_preset(name: str, *, clip_embed_dim: int, text_width: int,
                       context_length: int, **overrides) -> UnCLIPPrior:
    return UnCLIPPrior(config=prior_preset_config(
        name, clip_embed_dim=clip_embed_dim, text_width=text_width,
        context_length=context_length, **overrides))


def decoder_preset_config(name: str, *, clip_embed_dim: int, text_width: int | None = None,
                          image_size: int | None = None, **overrides) -> DecoderConfig:
    values = _preset(DECODER_PRESETS, name, "decoder")
    values["clip_embed_dim"] = clip_embed_dim
    values["text_width"] = text_width
    if image_size is not None:
        values["image_size"] = image_size
    check_known_keys(DecoderConfig, overrides, what="decoder override")
    return DecoderConfig(**{**values, **overrides})


def build_decoder_preset(name: str, *, clip_embed_dim: int, text_width: int | None = None,
                         image_size: int | None = None, **overrides) -> UnCLIPDecoder:
    """Text conditioning (per-token CLIP encodings) is on when `text_width` is given."""
    return UnCLIPDecoder(config=decoder_preset_config(
        name, clip_embed_dim=clip_embed_dim, text_width=text_width, image_size=image_size,
        **overrides))


def _count_params(build) -> int:
    # Building on the meta device allocates no memory, so even ViT-B-32 counts instantly.
    with torch.device("meta"):
        model = build()
    return sum(p.numel() for p in model.parameters())


def clip_preset_sizes(name: str) -> tuple[int, int, int]:
    """(embedding dim, text width, context length) of a CLIP preset, without building it."""
    cfg = clip_model_config(name)
    text = cfg["text_cfg"]
    return cfg["embed_dim"], text.get("width", 512), text.get("context_length", 77)


def list_presets() -> list[dict]:
    """Every preset of every component with its parameter count.

    Prior and decoder presets are counted with the CLIP sizes of the same-named CLIP preset
    (shapes-paper for the others); the decoder is counted image-embedding-only.
    """
    rows = []
    for name in CLIP_PRESETS:
        rows.append({"component": "clip", "name": name,
                     "params": _count_params(lambda n=name: build_clip_preset(n))})
    for name in PRIOR_PRESETS:
        embed, width, context = clip_preset_sizes(name if name in CLIP_PRESETS else "shapes-paper")
        rows.append({"component": "prior", "name": name, "params": _count_params(
            lambda n=name, e=embed, w=width, c=context: build_prior_preset(
                n, clip_embed_dim=e, text_width=w, context_length=c))})
    for name in DECODER_PRESETS:
        embed, _, _ = clip_preset_sizes(name if name in CLIP_PRESETS else "shapes-paper")
        rows.append({"component": "decoder", "name": name, "params": _count_params(
            lambda n=name, e=embed: build_decoder_preset(n, clip_embed_dim=e))})
    return rows
