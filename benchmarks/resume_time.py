"""Time from resuming to the first training batch, at an early and a late position.

A worker resumes by opening its stream at the saved position (`data_pipelines.resumable`):
it reads the one window the position falls in and decodes only what is left of it. The
reference is what a stream without positions must do (and what unclip-ray did before):
read, decode and discard every batch consumed so far. Both run side by side on the same
shapes shards (local folder), one worker, interleaved repeats; medians reported.

    python benchmarks/resume_time.py [--train-size 16000] [--shard 250] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import tempfile
import time

SETTLE_S = 5.0


def first_batch_seconds(stream, position, batch: int, discard: int = 0) -> float:
    start = time.perf_counter()
    batches = stream.dataset(0, position).iter_batches(batch_size=batch, batch_format="numpy",
                                                       drop_last=True)
    for index, _ in enumerate(batches):
        if index >= discard:
            break
    seconds = time.perf_counter() - start
    del batches  # the abandoned stream's tasks finish before the next measure starts
    gc.collect()
    time.sleep(SETTLE_S)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-size", type=int, default=16000)
    parser.add_argument("--shard", type=int, default=250)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=128,
                        help="rendered size; decoded and resized to 64 (decode cost matters)")
    args = parser.parse_args()

    import ray

    from data_pipelines.resumable import Position
    from data_pipelines.settings import ShapesSettings
    from data_pipelines.shapes import build_shapes
    from data_pipelines.streaming import bad_record_budget
    from orchestration.common.ray_runtime import configure_ray_data
    from orchestration.config import load_config
    from orchestration.train.tasks.clip import ClipTask

    work = tempfile.mkdtemp(prefix="resume-time-")
    ray.init(num_cpus=2, log_to_driver=False)
    configure_ray_data()
    build_shapes(f"{work}/shapes", ShapesSettings(train_size=args.train_size, test_size=64,
                                                  samples_per_shard=args.shard,
                                                  image_size=args.image_size))
    config = load_config("tiny", [f"data.uri={work}/shapes", f"clip.batch_size={args.batch}",
                                  "data.preprocess.image_size=64"])
    windows = -(-args.train_size // args.shard // config.data.shuffle_window_shards)
    per_window = args.shard * config.data.shuffle_window_shards
    # steps done before the "crash": early = 10 steps in; late = the start of the last window
    points = {"early": 10, "late": (windows - 1) * per_window // args.batch + 1}
    times: dict[str, list[float]] = {}
    with bad_record_budget(0.01) as counter:
        stream = ClipTask(config).datasets(counter)["train"]
        first_batch_seconds(stream, Position(), args.batch)  # warm-up: imports, worker pool
        for repeat in range(args.repeats):  # interleaved, order alternating per repeat
            for name, steps in sorted(points.items(), reverse=bool(repeat % 2)):
                consumed = steps * args.batch
                position = Position(0, consumed // per_window, consumed % per_window)
                times.setdefault(f"{name}_position", []).append(
                    first_batch_seconds(stream, position, args.batch))
                times.setdefault(f"{name}_replay", []).append(
                    first_batch_seconds(stream, Position(), args.batch, discard=steps))
    medians = {key: round(statistics.median(values), 3) for key, values in times.items()}
    print(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, "
        f"{__import__('os').cpu_count()} cores", "train_size": args.train_size,
        "shard": args.shard, "image_size": args.image_size,
        "window_shards": config.data.shuffle_window_shards,
        "batch": args.batch, "steps_done": points, "repeats": args.repeats,
        "median_seconds_to_first_batch": medians,
        "late_over_early_position": round(medians["late_position"]
                                          / medians["early_position"], 2),
        "late_over_early_replay": round(medians["late_replay"] / medians["early_replay"], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
