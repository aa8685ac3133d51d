"""Model FLOPs utilisation (MFU) of the decoder's training step on this machine's CPU.

MFU = achieved FLOP/s of one decoder training step / this machine's fp32 matmul ceiling.
The step is forward + backward + Adam (models_step_time.time_step) on synthetic batches of
the configured size; its FLOPs are counted by `models.flops.training_step_flops` (matmuls,
convolutions, attention). The ceiling is the median FLOP/s of a large `torch.mm` at the same
thread count: what this CPU really sustains, rather than a datasheet number. Both are
measured side by side, interleaved over the repeats. Cases: the decoder sections of
configs/tiny.yaml and configs/shapes-paper.yaml (preset, batch, image size, CLIP embedding
width).

    python benchmarks/mfu.py [--repeats 3] [--steps 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
from models_step_time import time_step

from models.flops import mfu, training_step_flops

CASES = ("tiny", "shapes-paper")  # config names; their decoder sections
MATMUL_SIZE = 4096


def matmul_ceiling(size: int = MATMUL_SIZE, reps: int = 3) -> float:
    """FLOP/s of `reps` fp32 (size x size) @ (size x size) products, after one warm-up."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * size**3 * reps / (time.perf_counter() - start)


def stage_model_and_loss(config, stage: str, device: str = "cpu"):
    """(model, loss_fn) of one training step of `stage` at its configured batch size, on
    synthetic inputs shaped like the config's data; `loss_fn(model)` returns the loss.
    On the "meta" device nothing is computed: enough to count FLOPs of any size for free."""
    from orchestration.train.tasks.frozen_clip import preset_clip_sizes

    batch, size = config.stage(stage).batch_size, config.data.preprocess.image_size
    with torch.device(device):
        images = torch.rand(batch, 3, size, size) * 2 - 1
        if stage == "decoder":
            from models.presets import build_decoder_preset

            embed, width, context = preset_clip_sizes(config)
            overrides = dict(config.decoder.overrides)
            text = overrides.pop("text_conditioning", False)
            model = build_decoder_preset(config.decoder.preset, clip_embed_dim=embed,
                                         text_width=width if text else None, image_size=size,
                                         **overrides)
            emb = torch.randn(batch, embed)
            tokens = torch.randn(batch, context, width) if text else None
            return model, lambda m: m.loss(images=images, image_emb=emb,
                                           text_tokens=tokens)["loss"]
        if stage == "clip":
            from orchestration.train.tasks.clip import ClipTask

            task = ClipTask(config)
            task.setup(device=torch.device(device))
            model = task.build_model()
            tokens = torch.randint(1, 1000, (batch, config.data.preprocess.context_length))
            tokens[:, -1] = model.vocab_size - 1  # the end token text pooling looks for
            data = {"image": images, "tokens": tokens}
            return model, lambda m: task.compute_loss(m, data)["loss"]
    raise ValueError(f"no synthetic step for stage {stage!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measure")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from orchestration.config import load_config

    cases = {}
    for name in CASES:
        config = load_config(name)
        model, loss_fn = stage_model_and_loss(config, "decoder")
        cases[name] = {"preset": config.decoder.preset, "batch": config.decoder.batch_size,
                       "model": model.train(), "loss_fn": loss_fn,
                       "flops_per_step": training_step_flops(model, loss_fn)}
    ceilings, times = [], {name: [] for name in CASES}
    for repeat in range(args.repeats):  # interleaved: drift in load hits every measure alike
        ceilings.append(matmul_ceiling())
        for name, case in cases.items():
            times[name].append(time_step(case["model"], lambda c=case: c["loss_fn"](c["model"]),
                                          repeats=args.steps, bf16=False))
        print(json.dumps({"repeat": repeat, "matmul_gflops": round(ceilings[-1] / 1e9, 1),
                          **{f"{n}_s_per_step": round(t[-1], 3) for n, t in times.items()}}),
              flush=True)
    ceiling = statistics.median(ceilings)
    rows = []
    for name, case in cases.items():
        seconds = statistics.median(times[name])
        rows.append({"config": name, "preset": case["preset"], "batch": case["batch"],
                     "gflop_per_step": round(case["flops_per_step"] / 1e9, 2),
                     "s_per_step": round(seconds, 3),
                     "achieved_gflops": round(case["flops_per_step"] / seconds / 1e9, 1),
                     "mfu": round(mfu(case["flops_per_step"], seconds, ceiling), 3)})
    print(json.dumps({"date": time.strftime("%Y-%m-%d"),
                      "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                      "threads": args.threads, "repeats": args.repeats, "steps": args.steps,
                      "matmul_size": MATMUL_SIZE, "matmul_gflops_median": round(ceiling / 1e9, 1),
                      "matmul_gflops_runs": [round(c / 1e9, 1) for c in ceilings],
                      "results": rows}, indent=2))


if __name__ == "__main__":
    main()
