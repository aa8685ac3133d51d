"""Text -> image with CLIP text encoder, prior and decoder; variations, interpolations, text diffs.

Saved as a directory: `config.json` (every component's config plus sampling defaults) and one
weights file per component, so serving rebuilds the models without any training code.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from models.clip_model import clip_from_config, encode_text_with_tokens, tokenize
from models.decoder import UnCLIPDecoder, build_decoder
from models.prior import UnCLIPPrior, build_prior
from models.typed_config import config_from_dict

FORMAT_VERSION = 1
COMPONENTS = ("clip", "prior", "decoder")


@dataclass
class SamplingDefaults:
    prior_guidance: float = 1.0
    prior_sampler: str = "ddpm"
    prior_steps: int | None = None  # None: every training timestep
    num_candidates: int = 2  # best-of-N by dot product with the text embedding
    decoder_guidance: float = 2.0  # Luo 2023, sec. 4.2, fig. 4.3: best FID/KID at s = 2 .. 2.5
    sampler: str = "ddim"
    steps: int | None = 50
    eta: float = 0.0
    thresholding: str = "static"
    dynamic_percentile: float = 0.995


def slerp(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between the directions of a and b (unit-norm result)."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    t = torch.as_tensor(t, dtype=a.dtype, device=a.device)
    if t.dim() == 1 and a.dim() > 0:
        t = t[:, None]
    dot = (a * b).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.arccos(dot)
    sin_omega = torch.sin(omega)
    # Nearly parallel vectors: slerp degenerates to lerp (and avoids dividing by ~0).
    safe = sin_omega.abs() > 1e-6
    sin_omega = torch.where(safe, sin_omega, torch.ones_like(sin_omega))
    mixed = torch.where(safe, (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b)
                        / sin_omega, (1 - t) * a + t * b)
    return F.normalize(mixed, dim=-1)


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] in [-1, 1] -> [N, H, W, 3] uint8 on the CPU."""
    scaled = ((images.float().clamp(-1, 1) + 1.0) * 127.5).round()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).cpu()


def images_to_grid(images: torch.Tensor, nrow: int = 8) -> Image.Image:
    """[N, H, W, 3] uint8 -> one PIL image with `nrow` images per row."""
    count, height, width, _ = images.shape
    rows = math.ceil(count / nrow)
    grid = torch.zeros(rows * height, nrow * width, 3, dtype=torch.uint8)
    for index in range(count):
        row, col = divmod(index, nrow)
        grid[row * height:(row + 1) * height, col * width:(col + 1) * width] = images[index]
    return Image.fromarray(grid.numpy())


class UnCLIPPipeline(nn.Module):
    def __init__(self, *, clip: nn.Module, prior: UnCLIPPrior, decoder: UnCLIPDecoder,
                 context_length: int, sampling: dict | None = None):
        super().__init__()
        self.clip, self.prior, self.decoder = clip, prior, decoder
        self.context_length = context_length
        self.sampling = config_from_dict(SamplingDefaults, dict(sampling or {}),
                                         what="sampling")

    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    def _option(self, value, name: str):
        return getattr(self.sampling, name) if value is None else value

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(text embeddings [B, D], per-token encodings [B, L, W]) from the CLIP text tower."""
        tokens = tokenize(prompts, context_length=self.context_length).to(self.device)
        return encode_text_with_tokens(self.clip, tokens)

    def _decoder_text(self, token_encodings):
        return token_encodings if self.decoder.decoder_config.text_width is not None else None

    def _decode(self, image_emb, *, text_tokens=None, generator, noise=None, guidance=None,
                sampler=None, steps=None, eta=None) -> torch.Tensor:
        s = self.sampling
        images = self.decoder.sample(
            image_emb=image_emb, text_tokens=text_tokens,
            guidance_scale=self._option(guidance, "decoder_guidance"),
            sampler=self._option(sampler, "sampler"), steps=self._option(steps, "steps"),
            eta=self._option(eta, "eta"), thresholding=s.thresholding,
            dynamic_percentile=s.dynamic_percentile, generator=generator, noise=noise)
        return images_to_uint8(images)

    @torch.no_grad()
    def generate(self, prompts: list[str], *, num_images_per_prompt: int = 1, seed: int = 0,
                 prior_guidance: float | None = None, decoder_guidance: float | None = None,
                 sampler: str | None = None, steps: int | None = None,
                 eta: float | None = None) -> torch.Tensor:
        """uint8 images [len(prompts) * num_images_per_prompt, H, W, 3], prompt-major order."""
        generator = torch.Generator().manual_seed(seed)
        text_emb, token_encodings = self.encode_text(prompts)
        text_emb = text_emb.repeat_interleave(num_images_per_prompt, dim=0)
        token_encodings = token_encodings.repeat_interleave(num_images_per_prompt, dim=0)
        s = self.sampling
        image_emb = self.prior.sample(
            text_emb=text_emb, text_tokens=token_encodings,
            guidance_scale=self._option(prior_guidance, "prior_guidance"),
            num_candidates=s.num_candidates, sampler=s.prior_sampler, steps=s.prior_steps,
            generator=generator)
        return self._decode(image_emb, text_tokens=self._decoder_text(token_encodings),
                            generator=generator, guidance=decoder_guidance, sampler=sampler,
                            steps=steps, eta=eta)

    @torch.no_grad()
    def generate_without_prior(self, prompts: list[str], *, image_emb: torch.Tensor | None = None,
                               num_images_per_prompt: int = 1, seed: int = 0) -> torch.Tensor:
        """The decoder alone, for the ablation of Zbinden 2022, sec. 5.1 (table 5.1): each
        prompt's image embedding is given (`image_emb`, one per prompt: the true image's, i.e.
        reconstruction) or, without it, the prompt's CLIP text embedding takes the prior's
        place. The decoder's text tokens still come from the prompts."""
        generator = torch.Generator().manual_seed(seed)
        text_emb, token_encodings = self.encode_text(prompts)
        emb = text_emb if image_emb is None else image_emb.to(self.device)
        emb = emb.repeat_interleave(num_images_per_prompt, dim=0)
        token_encodings = token_encodings.repeat_interleave(num_images_per_prompt, dim=0)
        return self._decode(emb, text_tokens=self._decoder_text(token_encodings),
                            generator=generator)

    def _start_noise(self, count, *, generator, images=None, image_emb=None, steps=None):
        """Shared x_T: DDIM inversion of `images` when given, else one Gaussian draw."""
        if images is not None:
            x_t = self.decoder.invert(images.to(self.device), image_emb=image_emb,
                                      steps=self._option(steps, "steps"))
            return x_t[:1].expand(count, -1, -1, -1)
        noise = torch.randn((1, *self.decoder.image_shape), generator=generator)
        return noise.to(self.device).expand(count, -1, -1, -1)

    @torch.no_grad()
    def variations(self, image_emb: torch.Tensor, *, num_variations: int = 4, seed: int = 0,
                   eta: float = 1.0, steps: int | None = None,
                   decoder_guidance: float | None = None) -> torch.Tensor:
        """Decode one image embedding several times with DDIM eta > 0 (DALL-E 2 variations,
        Ramesh et al. 2022, sec. 3.1)."""
        generator = torch.Generator().manual_seed(seed)
        emb = image_emb.reshape(1, -1).to(self.device).expand(num_variations, -1)
        return self._decode(emb, generator=generator, guidance=decoder_guidance,
                            sampler="ddim", steps=steps, eta=eta)

    @torch.no_grad()
    def interpolate(self, emb_a: torch.Tensor, emb_b: torch.Tensor, *, num: int = 5,
                    seed: int = 0, steps: int | None = None,
                    decoder_guidance: float | None = None,
                    images: torch.Tensor | None = None) -> torch.Tensor:
        """Slerp from emb_a to emb_b in `num` frames, decoded from one fixed x_T (DDIM eta=0);
        the interpolations of Ramesh et al. 2022, sec. 3.2.

        With `images` (image A, [1, 3, H, W]) x_T comes from DDIM inversion of that image.
        """
        generator = torch.Generator().manual_seed(seed)
        ts = torch.linspace(0.0, 1.0, num)
        embs = slerp(emb_a.reshape(1, -1).cpu(), emb_b.reshape(1, -1).cpu(), ts).to(self.device)
        noise = self._start_noise(num, generator=generator, images=images,
                                  image_emb=embs[:1], steps=steps)
        return self._decode(embs, generator=generator, noise=noise, guidance=decoder_guidance,
                            sampler="ddim", steps=steps, eta=0.0)

    @torch.no_grad()
    def text_diff(self, image_emb: torch.Tensor, from_text: str, to_text: str, *,
                  ratios: tuple[float, ...] = (0.0, 0.25, 0.5), seed: int = 0,
                  steps: int | None = None, decoder_guidance: float | None = None,
                  images: torch.Tensor | None = None) -> torch.Tensor:
        """Edit an image towards a new caption: slerp(z_i, norm(z_t' - z_t), r) per ratio.

        Ramesh et al. 2022, sec. 3.3 (Luo 2023, sec. 4.4, mixes linearly; slerp keeps unit norm).
        A fixed x_T (DDIM inversion of `images` when given) keeps the layout across ratios.
        """
        generator = torch.Generator().manual_seed(seed)
        text_emb, _ = self.encode_text([from_text, to_text])
        direction = F.normalize(text_emb[1] - text_emb[0], dim=-1).float().cpu()
        embs = slerp(image_emb.reshape(1, -1).cpu(), direction.reshape(1, -1),
                     torch.tensor(ratios)).to(self.device)
        noise = self._start_noise(len(ratios), generator=generator, images=images,
                                  image_emb=image_emb.reshape(1, -1).to(self.device), steps=steps)
        return self._decode(embs, generator=generator, noise=noise, guidance=decoder_guidance,
                            sampler="ddim", steps=steps, eta=0.0)

    # ----- persistence -----------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        clip_cfg = getattr(self.clip, "unclip_model_cfg", None)
        if clip_cfg is None:
            raise ValueError("the CLIP model has no config; build it with models.build_clip")
        config = {"format_version": FORMAT_VERSION, "clip": clip_cfg,
                  "prior": self.prior.config, "decoder": self.decoder.config,
                  "context_length": self.context_length,
                  "sampling": dataclasses.asdict(self.sampling)}
        (directory / "config.json").write_text(json.dumps(config, indent=2))
        for name in COMPONENTS:
            _save_weights(getattr(self, name).state_dict(), directory / name)

    @classmethod
    def load(cls, directory: str | Path, map_location: str | torch.device = "cpu"
             ) -> UnCLIPPipeline:
        directory = Path(directory)
        config = json.loads((directory / "config.json").read_text())
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported pipeline format {config.get('format_version')!r}")
        pipeline = cls(clip=clip_from_config(config["clip"]), prior=build_prior(config["prior"]),
                       decoder=build_decoder(config["decoder"]),
                       context_length=config["context_length"], sampling=config["sampling"])
        for name in COMPONENTS:
            getattr(pipeline, name).load_state_dict(_load_weights(directory / name))
        return pipeline.to(map_location).eval()


def _save_weights(state: dict, stem: Path) -> None:
    tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
    try:
        from safetensors.torch import save_file
    except ImportError:
        torch.save(tensors, stem.with_suffix(".pt"))
        return
    save_file(tensors, str(stem.with_suffix(".safetensors")))


def _load_weights(stem: Path) -> dict:
    if stem.with_suffix(".safetensors").exists():
        from safetensors.torch import load_file
        return load_file(str(stem.with_suffix(".safetensors")))
    return torch.load(stem.with_suffix(".pt"), map_location="cpu", weights_only=True)
