"""Decoder training step with NCHW (default) vs channels-last (NHWC) weights, on this CPU.

One step = forward + backward + Adam on synthetic batches (models_step_time.time_step,
median of 3 steps); the two layouts alternate over the repeats, fresh models each time.

    python benchmarks/channels_last.py [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
from models_step_time import decoder_step, time_step  # noqa: E402

CASES = (("shapes-tiny", 32), ("shapes-paper", 64))  # preset, batch


def step_seconds(preset: str, batch: int, layout: str) -> float:
    torch.manual_seed(0)
    model, loss_fn = decoder_step(preset, batch)
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    return time_step(model.train(), loss_fn, repeats=3, bf16=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for preset, batch in CASES:
        times: dict[str, list[float]] = {"nchw": [], "channels_last": []}
        for repeat in range(args.repeats):
            for layout in list(times) if repeat % 2 == 0 else list(times)[::-1]:
                times[layout].append(step_seconds(preset, batch, layout))
        medians = {k: round(statistics.median(v), 3) for k, v in times.items()}
        print(json.dumps({"preset": preset, "batch": batch, "median_s": medians,
                          "nchw_over_channels_last": round(
                              medians["nchw"] / medians["channels_last"], 3)}), flush=True)


if __name__ == "__main__":
    main()
