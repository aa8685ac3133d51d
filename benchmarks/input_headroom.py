"""Input headroom: the share of a real decoder run's step time spent waiting for data, with the
shards streamed from an S3 endpoint.

It starts a local moto S3 server (HTTP on loopback), renders the shapes dataset into it
with the project's builder (what `unclip data shapes --out s3://...` runs), trains CLIP
briefly (the decoder needs its frozen image encoder), then trains the decoder as a Ray Train
job with `data.uri` and `storage_root` on S3. The loop logs `data_wait_fraction` and
`step_time_s` per window of `log_every` steps to MLflow; this reads them back. Usage:

    python benchmarks/input_headroom.py [--config tiny] [--steps 100] [--log-every 10]
        [--set key=value ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # data_throughput's S3 server
from data_throughput import start_s3  # noqa: E402


def window_metrics(config, run_id: str) -> list[dict]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(config.mlflow.tracking_uri)

    def history(key):
        return {m.step: m.value for m in client.get_metric_history(run_id, key)}

    waits, times = history("data_wait_fraction"), history("step_time_s")
    return [{"step": s, "step_time_s": times[s], "data_wait_fraction": waits[s]}
            for s in sorted(waits)]


def summarise(windows: list[dict]) -> dict:
    """Waiting as a share of all step time, over every window and without the first (the
    first holds the stream's start-up: its first blocks are read and decoded while the loop
    waits)."""
    def overall(rows):  # windows have equal step counts, so time-weight by step_time_s
        total = sum(r["step_time_s"] for r in rows)
        return sum(r["data_wait_fraction"] * r["step_time_s"] for r in rows) / total

    steady = windows[1:]
    return {"data_wait_fraction_all_windows": round(overall(windows), 4),
            "data_wait_fraction_after_first_window": round(overall(steady), 4),
            "max_window_after_first": round(max(r["data_wait_fraction"] for r in steady), 4),
            "median_step_time_s": round(statistics.median(r["step_time_s"] for r in steady), 4)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--clip-steps", type=int, default=30)
    parser.add_argument("--set", action="append", default=[], help="extra config overrides")
    args = parser.parse_args()

    proc, endpoint = start_s3()  # sets AWS_ENDPOINT_URL_S3 etc. before Ray starts
    try:
        import boto3

        from data_pipelines.shapes import build_shapes
        from orchestration.common.ray_runtime import connect
        from orchestration.config import load_config
        from orchestration.train.training_job import run_stage

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="headroom")
        work = tempfile.mkdtemp(prefix="input-headroom-")
        overrides = ["data.uri=s3://headroom/shapes", "storage_root=s3://headroom/runs",
                     f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db", "run_name=headroom",
                     f"clip.steps={args.clip_steps}", f"clip.checkpoint_every={args.clip_steps}",
                     f"decoder.steps={args.steps}", f"decoder.log_every={args.log_every}",
                     f"decoder.checkpoint_every={args.steps}", *args.set]
        config = load_config(args.config, overrides)
        connect(config)
        build_shapes(config.data.uri, config.data.shapes)
        run_stage(config, "clip", log=lambda *_: None)
        result = run_stage(config, "decoder", log=lambda *_: None)
        windows = window_metrics(config, result.run_id)
        print(json.dumps({"date": datetime.date.today().isoformat(),
                          "machine": f"{platform.machine()} {os.cpu_count()} cores",
                          "config": args.config, "overrides": overrides,
                          "decoder_preset": config.decoder.preset,
                          "batch_size": config.decoder.batch_size,
                          "torch_threads": config.scaling.torch_threads,
                          **summarise(windows), "windows": windows}, indent=2))
    finally:
        proc.terminate()


if __name__ == "__main__":
    main()
