"""Pure-PyTorch unCLIP models: CLIP (open_clip), diffusion, prior, decoder, pipeline, metrics.

Importing this package imports torch and open_clip only (never Ray, MLflow or boto3).
"""

from models.clip_model import (
    ClipContrastiveLoss,
    build_clip,
    clamp_logit_scale_,
    encode_text_with_tokens,
    tokenize,
)
from models.decoder import DecoderConfig, UnCLIPDecoder, build_decoder
from models.diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType, beta_schedule
from models.presets import (
    build_clip_preset,
    build_decoder_preset,
    build_prior_preset,
    list_presets,
)
from models.prior import PriorConfig, UnCLIPPrior, build_prior
from models.unclip_pipeline import UnCLIPPipeline

__all__ = [
    "ClipContrastiveLoss", "DecoderConfig", "GaussianDiffusion", "LossType", "ModelMeanType",
    "ModelVarType", "PriorConfig", "UnCLIPDecoder", "UnCLIPPipeline", "UnCLIPPrior",
    "beta_schedule", "build_clip", "build_clip_preset", "build_decoder", "build_decoder_preset",
    "build_prior", "build_prior_preset", "clamp_logit_scale_", "encode_text_with_tokens",
    "list_presets", "tokenize",
]
