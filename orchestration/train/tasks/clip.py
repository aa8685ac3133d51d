"""CLIP: contrastive image-text training (Radford et al. 2021) with open_clip's model and loss.

Negatives are gathered across all workers, so 2 workers x batch B trains like 1 x 2B.
"""

from __future__ import annotations

import numpy as np
import torch
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import TextTransformer
from torch import nn

from models.clip_model import (
    MAX_LOGIT_SCALE,
    ClipContrastiveLoss,
    build_clip,
    clip_from_config,
    clip_model_config,
    tokenize,
)
from models.metrics import zero_shot_topk
from models.presets import CLIP_PRESETS
from orchestration.train.engine_setup import clamp_parameter_
from orchestration.train.tasks.base import EvalResult, Task, to_tensor


class ClipTask(Task):
    name = "clip"
    image_columns = ("image", "tokens", "caption")  # captions: zero-shot label sets
    # open_clip's towers re-initialise their blocks' weights, and torch's attention its output
    # bias, after building those child modules
    child_inits = ((ModifiedResNet, "init_parameters"), (TextTransformer, "init_parameters"),
                   (nn.MultiheadAttention, "_reset_parameters"))

    @classmethod
    def check_config(cls, config) -> None:
        stage = config.clip
        if stage.preset not in CLIP_PRESETS:
            raise ValueError(f"unknown clip preset {stage.preset!r}; known: "
                             f"{sorted(CLIP_PRESETS)} (set clip.preset)")
        clip_model_config(stage.preset,
                          context_length=config.data.preprocess.context_length,
                          **stage.overrides)

    def setup(self, *, device, rank: int = 0, world_size: int = 1) -> None:
        super().setup(device=device, rank=rank, world_size=world_size)
        self.loss = ClipContrastiveLoss(rank=rank, world_size=world_size)

    def build_model(self) -> nn.Module:
        return build_clip(self.stage.preset,
                          context_length=self.config.data.preprocess.context_length,
                          **self.stage.overrides)

    def model_config(self, model: nn.Module) -> dict:
        return model.unclip_model_cfg

    @classmethod
    def model_from_config(cls, config: dict) -> nn.Module:
        return clip_from_config(config)

    def to_batch(self, raw: dict, device) -> dict:
        return {"image": to_tensor(raw["image"], device),
                "tokens": to_tensor(raw["tokens"], device), "caption": list(raw["caption"])}

    def compute_loss(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        # open_clip returns (image features, text features, exp(logit_scale))
        image_features, text_features, scale = model(image=batch["image"], text=batch["tokens"])
        loss = self.loss(image_features=image_features, text_features=text_features,
                         logit_scale=scale.log())
        return {"loss": loss, "temperature": 1.0 / scale.detach()}

    def after_step(self, model: nn.Module, *, zero_stage: int) -> None:
        # as open_clip's loop does: keep the temperature at or above 1/100 (Radford et al.
        # 2021, sec. 2.5), in the model and in ZeRO's fp32 master copy
        clamp_parameter_(model.logit_scale, 0.0, MAX_LOGIT_SCALE, zero_stage)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: list[dict]) -> EvalResult:
        images = torch.cat([model.encode_image(b["image"], normalize=True) for b in batches])
        texts = torch.cat([model.encode_text(b["tokens"], normalize=True) for b in batches])
        captions = [c for b in batches for c in b["caption"]]
        # zero-shot retrieval among the distinct captions of the evaluated test samples
        distinct = sorted(set(captions))
        index = {c: i for i, c in enumerate(distinct)}
        caption_emb = model.encode_text(
            tokenize(distinct, context_length=self.config.data.preprocess.context_length)
            .to(images.device), normalize=True)
        labels = np.array([index[c] for c in captions])
        topk = zero_shot_topk(images.cpu().numpy(), caption_emb.cpu().numpy(), labels)
        # a local loss: evaluation runs on rank 0 alone, so no cross-rank gather here
        val_loss = ClipContrastiveLoss()(image_features=images, text_features=texts,
                                         logit_scale=model.logit_scale).item()
        return EvalResult({"val_loss": val_loss,
                           "image_text_cosine": (images * texts).sum(-1).mean().item(),
                           "random_pair_cosine": (images * texts.roll(1, 0)).sum(-1).mean().item(),
                           **{f"zero_shot_{k}": v for k, v in topk.items()}})
