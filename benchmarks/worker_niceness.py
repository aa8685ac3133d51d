"""Side check for the loop-overhead result: does Ray's worker niceness slow a training step?

Runs the bare CLIP loop of `loop_overhead.py` (tiny preset, batch 64, 2 threads) three ways,
each in a fresh process, interleaved: as a plain process, as a Ray task at Ray's default
worker niceness (15), and as a Ray task with RAY_worker_niceness=0. Usage:

    python benchmarks/worker_niceness.py [--repeats 3] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def measure(mode: str, steps: int) -> float:
    import ray
    import torch

    sys.path.insert(0, str(HERE))
    from loop_overhead import bare_step_time

    from orchestration.config import load_config

    def step_time() -> float:
        sys.path.insert(0, str(HERE))
        torch.set_num_threads(2)
        return bare_step_time(load_config("tiny"), "clip", steps)

    if mode == "process":
        return step_time()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    return ray.get(ray.remote(num_cpus=1)(step_time).remote())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # one measurement, in a child
    args = parser.parse_args()
    if args.mode:
        print(json.dumps({"s": measure(args.mode, args.steps)}))
        return
    modes = {"process": {}, "ray_task_nice15": {}, "ray_task_nice0": {"RAY_worker_niceness": "0"}}
    times: dict[str, list[float]] = {}
    for repeat in range(args.repeats):
        for mode, env in modes.items():
            out = subprocess.run(
                [sys.executable, __file__, "--mode", mode.split("_nice")[0],
                 "--steps", str(args.steps)],
                env={**os.environ, **env}, capture_output=True, text=True, check=True)
            seconds = json.loads(out.stdout.strip().splitlines()[-1])["s"]
            times.setdefault(mode, []).append(seconds)
            print(json.dumps({"repeat": repeat, "mode": mode, "s_per_step": round(seconds, 4)}),
                  flush=True)
    print(json.dumps({mode: round(statistics.median(v), 4) for mode, v in times.items()}))


if __name__ == "__main__":
    main()
