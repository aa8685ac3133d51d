"""Epoch time and peak memory of a CLIP training run at 1x and 4x the dataset size.

Streaming training should take time in proportion to the data and memory independent of
it: each worker holds one window of shards at a time, never the dataset. One epoch of CLIP
(configs/tiny.yaml: shapes-tiny, batch 64, one worker, 2 torch threads) runs as a real Ray
Train job, in a fresh process with its own local Ray instance, on shapes datasets rendered
locally with `build_shapes` (32 px, 500 images per shard). Sizes are interleaved over the
repeats. Per run:
- epoch time: the training loop's own time for the epoch (sum of its logged windows, data
  wait included), and the job's wall time (start-up, evaluation and checkpoint included);
- memory over the process tree (the driver, Ray's daemons, every Ray worker), sampled every
  second: peak RSS of the driver and of the Train worker, the worker's private part (RSS
  also counts the pages of Ray's shared object store a process has touched, which grows with
  the distinct blocks it has read until the store's pages are all mapped), and the peak of
  the tree's total private (anonymous) memory: heaps and tensors, what would grow if a
  process held the data.
  Every 5th sample also sums the tree's PSS, which adds shared pages (Ray's object store,
  torch's libraries) split between the processes that map them; reading it is too slow
  (tens of ms per large process) to do every second on 2 cores.

    python benchmarks/scale.py [--base 4000] [--factor 4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent


def build_datasets(work: Path, sizes: list[int]) -> dict[int, str]:
    from data_pipelines.settings import ShapesSettings
    from data_pipelines.shapes import build_shapes

    uris = {}
    for size in sizes:
        uris[size] = str(work / f"shapes-{size}")
        build_shapes(uris[size], ShapesSettings(train_size=size, test_size=400, image_size=32,
                                                samples_per_shard=500), use_ray=False)
    return uris


class TreeMemory:
    """Peaks over a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int, interval: float = 1.0, pss_every: int = 5):
        self.root, self.interval, self.pss_every = psutil.Process(pid), interval, pss_every
        self.peaks = {"driver_rss": 0, "train_worker_rss": 0, "train_worker_private": 0,
                      "tree_private": 0, "tree_pss": 0}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        tick = 0
        while not self.done.wait(self.interval):
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            private = pss = 0
            for proc in processes:
                try:
                    info = proc.memory_info()  # /proc/PID/statm: cheap
                    private += info.rss - info.shared
                    if proc is self.root:
                        self._peak("driver_rss", info.rss)
                    elif "RayTrainWorker" in " ".join(proc.cmdline()):
                        self._peak("train_worker_rss", info.rss)
                        self._peak("train_worker_private", info.rss - info.shared)
                    if tick % self.pss_every == 0:
                        pss += proc.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue  # a worker that ended between listing and reading
            self._peak("tree_private", private)
            self._peak("tree_pss", pss)
            tick += 1

    def _peak(self, key: str, value: int) -> None:
        self.peaks[key] = max(self.peaks[key], value)

    def stop(self) -> dict:
        self.done.set()
        self.thread.join()
        return {f"{key}_mib": round(value / 2**20) for key, value in self.peaks.items()}


def measure(work: Path, uri: str, size: int, run: str) -> dict:
    """One epoch in a child process; returns its times and the tree's memory peaks (MiB)."""
    child = subprocess.Popen([sys.executable, __file__, "--child", uri, "--work", str(work),
                              "--run", run, "--train-size", str(size)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    memory = TreeMemory(child.pid)
    out, _ = child.communicate()
    peaks = memory.stop()
    if child.returncode:
        raise RuntimeError(f"run {run} failed (exit {child.returncode})")
    return {**json.loads(out.strip().splitlines()[-1]), **peaks}


def child(uri: str, work: str, run: str, train_size: int) -> None:
    from mlflow.tracking import MlflowClient

    from orchestration.config import load_config
    from orchestration.train.training_job import run_stage

    batch = 64
    steps = train_size // batch  # one epoch
    config = load_config("tiny", [
        f"data.uri={uri}", f"storage_root={work}/runs", f"run_name={run}",
        f"mlflow.tracking_uri=sqlite:///{work}/{run}.db", f"clip.batch_size={batch}",
        f"clip.steps={steps}", "clip.log_every=10", f"clip.checkpoint_every={steps}"])
    start = time.monotonic()
    result = run_stage(config, "clip", log=lambda *_: None)
    wall = time.monotonic() - start
    history = sorted(MlflowClient(config.mlflow.tracking_uri).get_metric_history(
        result.run_id, "step_time_s"), key=lambda m: m.step)
    # each window logs its mean step time: times the steps it covered gives its duration
    loop, previous = 0.0, 0
    for metric in history:
        loop += metric.value * (metric.step - previous)
        previous = metric.step
    print(json.dumps({"steps": steps, "epoch_loop_s": round(loop, 2),
                      "stage_wall_s": round(wall, 2)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=int, default=4000, help="train images at 1x")
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one run, in a fresh process
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--train-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.work, args.run, args.train_size)
        return

    work = Path(tempfile.mkdtemp(prefix="scale-"))
    sizes = [args.base, args.base * args.factor]
    uris = build_datasets(work, sizes)
    runs: dict[int, list[dict]] = {size: [] for size in sizes}
    for repeat in range(args.repeats):  # interleaved, order alternating per repeat
        for size in sizes if repeat % 2 == 0 else sizes[::-1]:
            row = measure(work, uris[size], size, f"scale-{size}-r{repeat}")
            runs[size].append(row)
            print(json.dumps({"repeat": repeat, "train_size": size, **row}), flush=True)
    medians = {size: {key: statistics.median(r[key] for r in rows) for key in rows[0]}
               for size, rows in runs.items()}
    small, large = (medians[s] for s in sizes)
    ratios = {f"{key}_ratio": round(large[key] / small[key], 2)
              for key in ("epoch_loop_s", "stage_wall_s", "driver_rss_mib",
                          "train_worker_rss_mib", "train_worker_private_mib", "tree_private_mib",
                          "tree_pss_mib")}
    print(json.dumps({"date": time.strftime("%Y-%m-%d"),
                      "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                      "sizes": sizes, "repeats": args.repeats, "medians": medians,
                      "ratios_large_over_small": ratios, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
