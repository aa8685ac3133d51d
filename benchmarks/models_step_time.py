"""Parameter count and median CPU forward+backward step time for every model preset.

    python benchmarks/models_step_time.py [--repeats 3] [--bf16] [--only clip,prior,decoder]

One step = loss forward + backward + Adam update on synthetic inputs at the stated batch size.
Big presets (ViT-B-32, cluster-64) use a small batch so the script stays a few minutes on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from models.clip_model import ClipContrastiveLoss, encode_text_with_tokens
from models.presets import (
    CLIP_PRESETS,
    DECODER_PRESETS,
    PRIOR_PRESETS,
    build_clip_preset,
    build_decoder_preset,
    build_prior_preset,
    clip_preset_sizes,
)

BATCH = {"ViT-B-32": 8, "cluster-64": 4, "mlp-translator": 256}
DEFAULT_BATCH = 64
# Prior/decoder presets are sized against the same-named CLIP (shapes-paper otherwise).
CLIP_FOR = {"shapes-tiny": "shapes-tiny"}


def clip_step(name: str, batch: int):
    model = build_clip_preset(name)
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    images = torch.randn(batch, 3, size, size)
    tokens = torch.randint(1, 1000, (batch, model.context_length))
    tokens[:, -1] = model.vocab_size - 1  # an end token for argmax pooling
    loss_fn = ClipContrastiveLoss()

    def loss():
        text, _ = encode_text_with_tokens(model, tokens)
        return loss_fn(image_features=model.encode_image(images), text_features=text,
                       logit_scale=model.logit_scale)
    return model, loss


def clip_sizes(name: str) -> tuple[int, int, int]:
    return clip_preset_sizes(CLIP_FOR.get(name, "shapes-paper"))


def prior_step(name: str, batch: int):
    embed, width, context = clip_sizes(name)
    model = build_prior_preset(name, clip_embed_dim=embed, text_width=width,
                               context_length=context)
    text, image = torch.randn(batch, embed), torch.randn(batch, embed)
    tokens = torch.randn(batch, context, width)
    return model, lambda: model.loss(text_emb=text, image_emb=image, text_tokens=tokens)["loss"]


def decoder_step(name: str, batch: int):
    embed, _, _ = clip_sizes(name)
    model = build_decoder_preset(name, clip_embed_dim=embed)
    size = model.decoder_config.image_size
    images = torch.rand(batch, 3, size, size) * 2 - 1
    emb = torch.randn(batch, embed)
    return model, lambda: model.loss(images=images, image_emb=emb)["loss"]


def time_step(model, loss_fn, *, repeats: int, bf16: bool) -> float:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if bf16
                else contextlib.nullcontext())
    times = []
    for _ in range(repeats + 1):  # the first step warms up allocators and kernels
        start = time.perf_counter()
        with autocast:
            loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="run under bf16 autocast")
    parser.add_argument("--only", default="clip,prior,decoder")
    args = parser.parse_args()
    torch.manual_seed(0)
    tables = {"clip": (CLIP_PRESETS, clip_step), "prior": (PRIOR_PRESETS, prior_step),
              "decoder": (DECODER_PRESETS, decoder_step)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, median of {args.repeats} steps")
    print(f"| {'component':9} | {'preset':14} | {'params':>11} | {'batch':>5} | "
          f"{'s/step':>7} | {'samples/s':>9} |")
    print(f"|{'-' * 11}|{'-' * 16}|{'-' * 13}|{'-' * 7}|{'-' * 9}|{'-' * 11}|")
    for component in args.only.split(","):
        presets, make_step = tables[component]
        for name in presets:
            batch = BATCH.get(name, DEFAULT_BATCH)
            model, loss_fn = make_step(name, batch)
            params = sum(p.numel() for p in model.parameters())
            seconds = time_step(model.train(), loss_fn, repeats=args.repeats, bf16=args.bf16)
            print(f"| {component:9} | {name:14} | {params:>11,} | {batch:>5} | "
                  f"{seconds:>7.3f} | {batch / seconds:>9.1f} |", flush=True)


if __name__ == "__main__":
    main()
