"""What differs between the CLIP, prior and decoder stages; the loop owns everything else.

A task builds its module (wrapped so `forward(batch)` returns the loss terms: DeepSpeed's
ZeRO-3 hooks gather parameters around forward calls, so the loss is computed inside one),
turns a numpy batch from Ray Data into tensors, and evaluates EMA weights on the test split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import nn

from data_pipelines.storage import resolve
from models.clip_model import (
    ClipContrastiveLoss,
    build_clip,
    clip_from_config,
    encode_text_with_tokens,
    tokenize,
)
from models.decoder import build_decoder
from models.metrics import prior_cosines, zero_shot_topk
from models.presets import build_decoder_preset, build_prior_preset
from models.prior import build_prior
from models.unclip_pipeline import images_to_grid
from orchestration.config import Config

EVAL_BATCHES = 4  # test batches per evaluation: enough for stable tiny-model metrics


class LossModule(nn.Module):
    """`forward(batch) -> loss terms`, so DeepSpeed sees one forward per step."""

    def __init__(self, model: nn.Module, loss_fn):
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return self._loss_fn(self.model, batch)


@dataclass
class EvalResult:
    metrics: dict[str, float]
    images: dict[str, Image.Image] = field(default_factory=dict)


def portable_config(component: str, config: dict) -> dict:
    return {"component": component, "config": config}


def read_portable_config(uri: str) -> dict:
    return json.loads(resolve(uri).join("config.json").read_text())


def load_portable(uri: str, map_location="cpu") -> tuple[str, nn.Module]:
    """(component, module) from portable weights (config.json + weights.safetensors) at a
    local folder or s3:// prefix: every worker of a multi-node job can read them."""
    from safetensors.torch import load

    meta = read_portable_config(uri)
    build = {"clip": clip_from_config, "prior": build_prior, "decoder": build_decoder}
    module = build[meta["component"]](meta["config"])
    state = load(resolve(uri).join("weights.safetensors").read_bytes())
    module.load_state_dict(state)
    return meta["component"], module.to(map_location)


def save_portable(uri: str, component: str, module: nn.Module, config: dict) -> None:
    from safetensors.torch import save

    root = resolve(str(uri))
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    root.join("weights.safetensors").write_bytes(save(state))
    root.join("config.json").write_text(json.dumps(portable_config(component, config), indent=2))


def _to_tensor(array, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(device, non_blocking=True)


class ClipTask:
    name = "clip"
    dataset_kind = "images"

    def __init__(self, config: Config, *, rank: int = 0, world_size: int = 1, **_):
        self.config = config
        self.loss = ClipContrastiveLoss(rank=rank, world_size=world_size)

    def build_model(self) -> nn.Module:
        stage = self.config.clip
        return build_clip(stage.preset, context_length=self.config.data.preprocess.context_length,
                          **stage.overrides)

    def model_config(self, model: nn.Module) -> dict:
        return model.unclip_model_cfg

    def to_batch(self, batch: dict, device) -> dict:
        return {"image": _to_tensor(batch["image"], device),
                "tokens": _to_tensor(batch["tokens"], device), "caption": list(batch["caption"])}

    def compute_loss(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        # open_clip returns (image features, text features, exp(logit_scale))
        image_features, text_features, scale = model(image=batch["image"], text=batch["tokens"])
        loss = self.loss(image_features=image_features, text_features=text_features,
                         logit_scale=scale.log())
        return {"loss": loss, "temperature": 1.0 / scale.detach()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: list[dict]) -> EvalResult:
        image_emb, text_emb, captions = [], [], []
        for batch in batches:
            image_emb.append(model.encode_image(batch["image"], normalize=True))
            text_emb.append(model.encode_text(batch["tokens"], normalize=True))
            captions.extend(batch["caption"])
        images, texts = torch.cat(image_emb), torch.cat(text_emb)
        # zero-shot retrieval among the distinct captions of the evaluated test samples
        distinct = sorted(set(captions))
        index = {c: i for i, c in enumerate(distinct)}
        caption_emb = model.encode_text(
            tokenize(distinct, context_length=self.config.data.preprocess.context_length)
            .to(images.device), normalize=True)
        labels = np.array([index[c] for c in captions])
        topk = zero_shot_topk(images.cpu().numpy(), caption_emb.cpu().numpy(), labels)
        paired = (images * texts).sum(-1).mean().item()
        shuffled = (images * texts.roll(1, 0)).sum(-1).mean().item()
        # a local loss: evaluation runs on rank 0 alone, so no cross-rank gather here
        val_loss = ClipContrastiveLoss()(image_features=images, text_features=texts,
                                         logit_scale=model.logit_scale).item()
        return EvalResult({"val_loss": val_loss, "image_text_cosine": paired,
                           "random_pair_cosine": shuffled,
                           **{f"zero_shot_{k}": v for k, v in topk.items()}})


class _FrozenClipMixin:
    """Stages after CLIP read the trained CLIP's portable weights, frozen."""

    def _load_clip(self, clip_dir: str, device) -> nn.Module:
        component, clip = load_portable(clip_dir)
        if component != "clip":
            raise ValueError(f"{clip_dir} holds {component} weights, not CLIP")
        clip.requires_grad_(False)
        return clip.eval().to(device)

    def clip_sizes(self) -> tuple[int, int, int]:
        meta = read_portable_config(self.clip_dir)["config"]
        return (meta["embed_dim"], meta["text_cfg"].get("width", 512),
                meta["text_cfg"].get("context_length", 77))


class PriorTask(_FrozenClipMixin):
    name = "prior"
    dataset_kind = "embeddings"

    def __init__(self, config: Config, *, clip_dir: str, norm_sample=None, **_):
        self.config, self.clip_dir = config, clip_dir
        self.norm_sample = norm_sample

    def build_model(self) -> nn.Module:
        embed_dim, width, context = self.clip_sizes()
        stage = self.config.prior
        prior = build_prior_preset(stage.preset, clip_embed_dim=embed_dim, text_width=width,
                                   context_length=context, **stage.overrides)
        if self.norm_sample is not None:
            prior.set_normalisation(torch.as_tensor(np.asarray(self.norm_sample)))
        return prior

    def model_config(self, model: nn.Module) -> dict:
        return model.config

    def to_batch(self, batch: dict, device) -> dict:
        out = {"text_emb": _to_tensor(np.stack(batch["text_emb"]), device).float(),
               "image_emb": _to_tensor(np.stack(batch["image_emb"]), device).float()}
        if "text_tokens" in batch:
            out["text_tokens"] = _to_tensor(np.stack(batch["text_tokens"]), device).float()
        return out

    def compute_loss(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        return model.loss(text_emb=batch["text_emb"], image_emb=batch["image_emb"],
                          text_tokens=batch.get("text_tokens"))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: list[dict]) -> EvalResult:
        text = torch.cat([b["text_emb"] for b in batches])
        image = torch.cat([b["image_emb"] for b in batches])
        tokens = (torch.cat([b["text_tokens"] for b in batches])
                  if "text_tokens" in batches[0] else None)
        generator = torch.Generator().manual_seed(0)
        t = torch.randint(0, getattr(model.diffusion, "num_timesteps", 1), (len(text),),
                          generator=generator).to(text.device)
        val = model.loss(text_emb=text, image_emb=image, text_tokens=tokens, t=t)
        s = self.config.sampling
        generated = model.sample(text_emb=text, text_tokens=tokens, guidance_scale=s.prior_guidance,
                                 num_candidates=s.num_candidates, sampler=s.sampler,
                                 steps=s.prior_steps, generator=generator)
        cosines = prior_cosines(generated.cpu().numpy(), text.cpu().numpy(), image.cpu().numpy())
        return EvalResult({"val_loss": float(val["loss"]), **cosines})


class DecoderTask(_FrozenClipMixin):
    """Images from the image shards; their CLIP embeddings from a frozen CLIP in the worker."""

    name = "decoder"
    dataset_kind = "images"

    def __init__(self, config: Config, *, clip_dir: str, device="cpu", **_):
        self.config, self.clip_dir = config, clip_dir
        self.clip = self._load_clip(clip_dir, device)
        self.use_text = bool(config.decoder.overrides.get("text_conditioning", False))

    def build_model(self) -> nn.Module:
        embed_dim, width, _ = self.clip_sizes()
        stage = self.config.decoder
        overrides = {k: v for k, v in stage.overrides.items() if k != "text_conditioning"}
        return build_decoder_preset(stage.preset, clip_embed_dim=embed_dim,
                                    text_width=width if self.use_text else None,
                                    image_size=self.config.data.preprocess.image_size,
                                    **overrides)

    def model_config(self, model: nn.Module) -> dict:
        return model.config

    @torch.no_grad()
    def to_batch(self, batch: dict, device) -> dict:
        images = _to_tensor(batch["image"], device)
        tokens = _to_tensor(batch["tokens"], device)
        out = {"images": images, "image_emb": self.clip.encode_image(images).float()}
        if self.use_text:
            out["text_tokens"] = encode_text_with_tokens(self.clip, tokens)[1].float()
        return out

    def compute_loss(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        return model.loss(images=batch["images"], image_emb=batch["image_emb"],
                          text_tokens=batch.get("text_tokens"))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: list[dict]) -> EvalResult:
        first = batches[0]
        generator = torch.Generator().manual_seed(0)
        images = first["images"]
        t = torch.randint(0, model.diffusion.num_timesteps, (len(images),),
                          generator=generator).to(images.device)
        noise = torch.randn(images.shape, generator=generator).to(images.device)
        val = model.loss(images=images, image_emb=first["image_emb"],
                         text_tokens=first.get("text_tokens"), t=t, noise=noise)
        # a fixed grid: the first 8 test images' embeddings, fixed seed -> comparable over time
        count = min(8, len(images))
        s = self.config.sampling
        samples = model.sample(image_emb=first["image_emb"][:count],
                               text_tokens=(first["text_tokens"][:count]
                                            if "text_tokens" in first else None),
                               guidance_scale=s.decoder_guidance, sampler=s.sampler,
                               steps=s.decoder_steps, generator=torch.Generator().manual_seed(0))
        pairs = torch.cat([images[:count], samples]).clamp(-1, 1)
        grid = images_to_grid(((pairs + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu(),
                              nrow=count)
        return EvalResult({"val_loss": float(val["loss"])}, {"samples": grid})


TASKS = {"clip": ClipTask, "prior": PriorTask, "decoder": DecoderTask}
