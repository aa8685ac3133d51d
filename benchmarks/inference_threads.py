"""Latency of `unclip generate` and of a Ray Serve request, before and after the thread policy.

Before: the code of a revision without `orchestration.common.threads` (`--before-rev`), exported
with `git archive` into a temporary folder and run from there with the same venv, so torch
keeps its defaults (one intra-op and one inter-op thread per core of the machine). After:
this working tree, where generation and replicas size their pools to the CPUs they hold.
Also timed: the old code with OMP_NUM_THREADS=1, the workaround a user found.

The model is the tiny config's three presets (configs/tiny.yaml: shapes-tiny CLIP, prior and
decoder, DDPM over the decoder's 100 steps) with random weights: sampling costs the same as
with trained ones. Each measure runs in a fresh process, interleaved over the repeats.

    python benchmarks/inference_threads.py [--repeats 3] [--only generate serve]
        [--before-rev 25bbfe4]
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
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPT = "a large red circle"
IMAGES = 4


def save_random_tiny_pipeline(directory: Path) -> Path:
    """The tiny config's pipeline with random weights (the same sampling work as trained)."""
    import torch

    from models.clip_model import build_clip
    from models.presets import build_decoder_preset, build_prior_preset, clip_preset_sizes
    from models.unclip_pipeline import UnCLIPPipeline
    from orchestration.config import load_config
    from orchestration.evaluate.evaluation import pipeline_sampling

    config = load_config("tiny")
    torch.manual_seed(0)
    context = config.data.preprocess.context_length
    embed, width, _ = clip_preset_sizes(config.clip.preset)
    pipeline = UnCLIPPipeline(
        clip=build_clip(config.clip.preset, context_length=context),
        prior=build_prior_preset(config.prior.preset, clip_embed_dim=embed, text_width=width,
                                 context_length=context),
        decoder=build_decoder_preset(config.decoder.preset, clip_embed_dim=embed,
                                     image_size=config.data.preprocess.image_size),
        context_length=context, sampling=pipeline_sampling(config))
    pipeline.save(directory)
    return directory


def export_revision(rev: str, target: Path) -> Path:
    """The repository's files at `rev` (read from git, the working tree untouched)."""
    target.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def run_timed(command: list[str], tree: Path, env: dict) -> float:
    """Wall seconds of `command` run with `tree`'s code first on the path."""
    start = time.perf_counter()
    subprocess.run(command, cwd=tree, check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(tree), **env})
    return time.perf_counter() - start


def generate_seconds(tree: Path, model: Path, out: Path, env: dict) -> float:
    return run_timed([sys.executable, "-m", "orchestration.cli", "generate", "--model",
                      str(model), "--prompt", PROMPT, "--n", str(IMAGES), "--seed", "0",
                      "--out", str(out)], tree, env)


def serve_seconds(tree: Path, model: Path, env: dict, requests: int) -> float:
    """Median latency of `requests` sequential requests for 4 images, one replica with
    Serve's default num_cpus (1), in a fresh Ray instance started from `tree`."""
    out = subprocess.run([sys.executable, __file__, "--serve-child", str(model),
                          "--requests", str(requests)], cwd=tree, check=True,
                         capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tree), **env})
    return json.loads(out.stdout.strip().splitlines()[-1])["median_s"]


def serve_child(model: str, requests: int) -> None:
    import ray
    import requests as http
    from ray import serve

    from orchestration.serve.serving import run_server

    with socket.socket() as sock:  # a free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    url = run_server(model, port=port, blocking=False)
    body = {"prompt": PROMPT, "num_images": IMAGES, "seed": 0}
    times = []
    for _ in range(requests + 1):  # the first request warms the replica up
        start = time.perf_counter()
        http.post(f"{url}/generate", json=body, timeout=600).raise_for_status()
        times.append(time.perf_counter() - start)
    serve.shutdown()
    print(json.dumps({"median_s": statistics.median(times[1:])}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="+", default=["generate", "serve"])
    parser.add_argument("--before-rev", default="25bbfe4",
                        help="a revision without the thread policy")
    parser.add_argument("--requests", type=int, default=3, help="per serve measure")
    parser.add_argument("--busy", type=int, default=0,
                        help="CPU-bound processes kept running beside every measure (what a "
                             "training run or another user does to a shared machine)")
    parser.add_argument("--serve-child", help=argparse.SUPPRESS)  # one serve measure
    args = parser.parse_args()
    if args.serve_child:
        serve_child(args.serve_child, args.requests)
        return

    work = Path(tempfile.mkdtemp(prefix="inference-threads-"))
    model = save_random_tiny_pipeline(work / "pipeline")
    before = export_revision(args.before_rev, work / "before")
    variants = {"before": (before, {}), "before_omp1": (before, {"OMP_NUM_THREADS": "1"}),
                "after": (REPO, {})}
    times: dict[str, list[float]] = {}
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(args.busy)]
    try:
        run_measures(args, variants, model, work, times)
    finally:
        for hog in hogs:
            hog.kill()
    medians = {key: round(statistics.median(values), 2) for key, values in times.items()}
    ratios = {f"{what}_before_over_after": round(medians[f"{what}_before"]
                                                 / medians[f"{what}_after"], 2)
              for what in args.only}
    print(json.dumps({"date": time.strftime("%Y-%m-%d"),
                      "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                      "before_rev": args.before_rev, "repeats": args.repeats,
                      "busy_processes": args.busy, "median_seconds": medians, "runs": times,
                      **ratios}, indent=2))


def run_measures(args, variants: dict, model: Path, work: Path, times: dict) -> None:
    for repeat in range(args.repeats):  # interleaved, so load from elsewhere hits all alike
        for name, (tree, env) in variants.items():
            measures = {}
            if "generate" in args.only:
                measures["generate"] = generate_seconds(tree, model, work / "grid.png", env)
            if "serve" in args.only and name != "before_omp1":  # Ray sets OMP in replicas
                measures["serve"] = serve_seconds(tree, model, env, args.requests)
            for what, seconds in measures.items():
                times.setdefault(f"{what}_{name}", []).append(seconds)
            print(json.dumps({"repeat": repeat, "variant": name, "load": os.getloadavg()[0],
                              **{k: round(v, 2) for k, v in measures.items()}}), flush=True)


if __name__ == "__main__":
    main()
