"""Pure-PyTorch unCLIP models: CLIP (open_clip), diffusion, prior, decoder, pipeline, metrics.

Importing this package imports nothing heavy: each name below loads its submodule (torch,
open_clip) on first access. The submodules never import Ray, MLflow or boto3.
"""

from __future__ import annotations

import importlib

# name -> submodule; `from models import X` imports that submodule (and torch) on first use, so
# importing `models.presets` or a light submodule does not pay for every model at once.
_EXPORTS = {
    "ClipContrastiveLoss": "clip_model", "build_clip": "clip_model",
    "clamp_logit_scale_": "clip_model", "encode_text_with_tokens": "clip_model",
    "tokenize": "clip_model",
    "DecoderConfig": "decoder", "UnCLIPDecoder": "decoder", "build_decoder": "decoder",
    "GaussianDiffusion": "diffusion", "LossType": "diffusion", "ModelMeanType": "diffusion",
    "ModelVarType": "diffusion", "beta_schedule": "diffusion",
    "build_clip_preset": "presets", "build_decoder_preset": "presets",
    "build_prior_preset": "presets", "list_presets": "presets",
    "PriorConfig": "prior", "UnCLIPPrior": "prior", "build_prior": "prior",
    "UnCLIPPipeline": "unclip_pipeline",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "ClipContrastiveLoss", "DecoderConfig", "GaussianDiffusion", "LossType", "ModelMeanType",
    "ModelVarType", "PriorConfig", "UnCLIPDecoder", "UnCLIPPipeline", "UnCLIPPrior",
    "beta_schedule", "build_clip", "build_clip_preset", "build_decoder", "build_decoder_preset",
    "build_prior", "build_prior_preset", "clamp_logit_scale_", "encode_text_with_tokens",
    "list_presets", "tokenize",
]
