"""Streaming throughput (images/s) from a real S3 endpoint through decode + preprocessing.

Two cases, each read from a local moto S3 server over HTTP:
  A. 32x32 PNG shapes, preprocessed at 32 (the setting of Luo 2023, sec. 3.1);
  B. 256x256 JPEG shapes, random crop then resize to 128 (as in Grazys 2023, sec. 3.2).
Two readers per case, measured side by side in one run:
  ray-data   : this project's Ray Data pipeline (data_pipelines.streaming), one consumer;
  wds-loader : torch DataLoader(num_workers=2) over the webdataset library, reading the same
               shards through presigned HTTP URLs, applying the same preprocess_image().
Usage: python benchmarks/data_throughput.py [--repeats 3] [--small 4000] [--large 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time


def start_s3() -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL_S3=endpoint, AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1")
    for _ in range(100):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return proc, endpoint
        time.sleep(0.1)
    raise RuntimeError("moto server did not start")


def ray_data_rate(uri: str, settings, batch_size: int) -> float:
    from data_pipelines.streaming import image_caption_dataset

    dataset = image_caption_dataset(uri, "train", settings, seed=0)
    start, count = time.monotonic(), 0
    for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
        count += len(batch["key"])
    return count / (time.monotonic() - start)


def _wds_sample(sample: dict, settings):
    """The same decode + preprocess + tokenise as the Ray Data path, for one sample."""
    import io

    import torch
    from PIL import Image

    from data_pipelines.streaming import _sample_rng, preprocess_image, tokenize

    data = sample.get("png") or sample.get("jpg")
    image = Image.open(io.BytesIO(data)).convert("RGB")
    array = preprocess_image(image, settings, _sample_rng(sample["__key__"], 0, 0), train=True)
    tokens = tokenize([sample["txt"].decode()], settings.context_length)[0]
    return torch.from_numpy(array), torch.from_numpy(tokens)


def wds_loader_rate(urls: list[str], settings, batch_size: int) -> float:
    import functools

    import torch
    import webdataset as wds

    dataset = wds.WebDataset(urls, shardshuffle=False).map(
        functools.partial(_wds_sample, settings=settings)).batched(batch_size)
    # forkserver, not fork: forking a Ray driver breaks its gRPC connection to the cluster
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2,
                                         multiprocessing_context="forkserver")
    start, count = time.monotonic(), 0
    for images, _tokens in loader:
        count += images.shape[0]
    return count / (time.monotonic() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small", type=int, default=4000, help="32x32 PNG train images")
    parser.add_argument("--large", type=int, default=1000, help="256x256 JPEG train images")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    proc, endpoint = start_s3()
    try:
        import boto3
        import ray

        from data_pipelines.settings import PreprocessSettings, ShapesSettings
        from data_pipelines.shapes import build_shapes
        from data_pipelines.shards import read_manifest

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="bench")
        cases = {
            "A 32px PNG -> 32": (
                ShapesSettings(train_size=args.small, test_size=10, image_size=32,
                               samples_per_shard=500),
                PreprocessSettings(image_size=32)),
            "B 256px JPEG -> crop -> 128": (
                ShapesSettings(train_size=args.large, test_size=10, image_size=256,
                               image_format="jpg", samples_per_shard=250),
                PreprocessSettings(image_size=128, random_crop=True)),
        }
        # build every dataset before any DataLoader forks worker processes from this driver
        prepared = []
        for index, (name, (shapes, preprocess)) in enumerate(cases.items()):
            uri = f"s3://bench/case{index}"
            build_shapes(uri, shapes)
            shards = read_manifest(uri).splits["train"].shards
            urls = [s3.generate_presigned_url("get_object", Params={
                "Bucket": "bench", "Key": f"case{index}/{shard}"}, ExpiresIn=3600)
                for shard in shards]
            prepared.append((name, shapes, preprocess, uri, urls))
        rows = []
        for name, shapes, preprocess, uri, urls in prepared:
            results = {"ray-data": [], "wds-loader": []}
            for _ in range(args.repeats):  # interleaved, so both see the same machine state
                results["ray-data"].append(ray_data_rate(uri, preprocess, args.batch_size))
                results["wds-loader"].append(wds_loader_rate(urls, preprocess, args.batch_size))
            medians = {k: statistics.median(v) for k, v in results.items()}
            rows.append({"case": name, "images": shapes.train_size,
                         **{f"{k} median img/s": round(v, 1) for k, v in medians.items()},
                         "runs": {k: [round(x, 1) for x in v] for k, v in results.items()},
                         "ratio ray/wds": round(medians["ray-data"] / medians["wds-loader"], 2)})
        print(json.dumps({"machine": f"{platform.machine()} {os.cpu_count()} cores",
                          "batch_size": args.batch_size, "repeats": args.repeats,
                          "results": rows}, indent=2))
    finally:
        proc.terminate()


if __name__ == "__main__":
    main()
