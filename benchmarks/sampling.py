"""Sampling speed: DDIM with few steps vs DDPM over the whole schedule on the same weights,
and Ray Serve's images/s for concurrent (batched) requests vs the same requests one by one.

Samplers: `pipeline.generate` for the same prompts and seed, timed per sampler, interleaved
over the repeats; the prior's sampling (the same for every decoder sampler) is timed on its
own so the decoder's ratio is reported beside the whole call's. DDIM's ceiling is the step
ratio T/steps (Song et al. 2021, sec. 4.2): a 300-step decoder gives DDIM-50 at most 6x, so
DDIM at T/15 steps is timed too. With `--model` and `--quality`, each sampler's images are
also scored by the dataset's reference evaluator (`unclip eval`'s code) and the change in
every metric is reported (a release, e.g. `--model release/shapes`, brings its own eval config
and evaluator); without `--model` the config's architecture runs with random
weights (sampling costs the same as with trained ones), speed only.

Serving: one replica (1 CPU) of `unclip serve`; `--requests` single-image requests without a
seed sent all at once (Serve batches them, up to 8 per call) vs one after another.

    python benchmarks/sampling.py [-c configs/shapes-paper.yaml] [--model URI] [--quality]
        [--prompts 8] [--repeats 3] [--requests 8] [--only samplers serve]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
PROMPTS = ["a large red circle", "a small blue square", "a green triangle",
           "a large yellow star", "a small purple circle", "an orange square",
           "a small red triangle", "a large blue star"]


def random_pipeline(config, directory: Path) -> str:
    """The config's three architectures (overrides included), random weights, saved."""
    import torch

    from models.presets import build_decoder_preset, build_prior_preset
    from models.unclip_pipeline import UnCLIPPipeline
    from orchestration.evaluate.evaluation import pipeline_sampling
    from orchestration.train.tasks.clip import ClipTask
    from orchestration.train.tasks.frozen_clip import preset_clip_sizes

    torch.manual_seed(0)
    embed, width, context = preset_clip_sizes(config)
    decoder_overrides = dict(config.decoder.overrides)
    use_text = bool(decoder_overrides.pop("text_conditioning", False))
    pipeline = UnCLIPPipeline(
        clip=ClipTask(config).build_model(),
        prior=build_prior_preset(config.prior.preset, clip_embed_dim=embed, text_width=width,
                                 context_length=context, **config.prior.overrides),
        decoder=build_decoder_preset(config.decoder.preset, clip_embed_dim=embed,
                                     text_width=width if use_text else None,
                                     image_size=config.data.preprocess.image_size,
                                     **decoder_overrides),
        context_length=config.data.preprocess.context_length,
        sampling=pipeline_sampling(config))
    pipeline.save(directory)
    return str(directory)


def load_pipeline(model_uri: str, config):
    from models.unclip_pipeline import UnCLIPPipeline
    from orchestration.registry.registry import resolve_model_uri

    directory = resolve_model_uri(model_uri, tracking_uri=config.mlflow.tracking_uri,
                                  dst_dir=Path(tempfile.mkdtemp(prefix="sampling-model-")))
    return UnCLIPPipeline.load(directory).eval()


def sampler_variants(num_timesteps: int, ddim_steps: int) -> dict[str, dict]:
    fast = max(1, round(num_timesteps / 15))
    # steps=None would mean the model's default (e.g. 50), not the full schedule: say T
    variants = {"ddpm_full": {"sampler": "ddpm", "steps": num_timesteps},
                f"ddim_{ddim_steps}": {"sampler": "ddim", "steps": ddim_steps, "eta": 0.0}}
    if fast < ddim_steps:
        variants[f"ddim_{fast}"] = {"sampler": "ddim", "steps": fast, "eta": 0.0}
    return variants


def time_samplers(pipeline, prompts: list[str], variants: dict, repeats: int) -> dict:
    """Median seconds of the whole generate call per variant, and of the prior alone."""
    import torch

    times: dict[str, list[float]] = {name: [] for name in [*variants, "prior_only"]}
    text_emb, tokens = pipeline.encode_text(prompts)
    for repeat in range(repeats):
        order = list(variants) if repeat % 2 == 0 else list(variants)[::-1]
        for name in order:
            start = time.perf_counter()
            pipeline.generate(prompts, seed=0, **variants[name])
            times[name].append(time.perf_counter() - start)
        start = time.perf_counter()
        with torch.no_grad():
            pipeline.prior.sample(text_emb=text_emb, text_tokens=tokens,
                                  guidance_scale=pipeline.sampling.prior_guidance,
                                  num_candidates=pipeline.sampling.num_candidates,
                                  generator=torch.Generator().manual_seed(0),
                                  sampler=pipeline.sampling.prior_sampler,
                                  steps=pipeline.sampling.prior_steps)
        times["prior_only"].append(time.perf_counter() - start)
        print(json.dumps({"repeat": repeat, **{k: round(v[-1], 2) for k, v in times.items()}}),
              file=sys.stderr, flush=True)
    return {name: statistics.median(values) for name, values in times.items()}


def speed_ratios(medians: dict, variants: dict) -> dict:
    prior = medians["prior_only"]
    full = medians["ddpm_full"]
    out = {}
    for name in variants:
        if name == "ddpm_full":
            continue
        out[f"ddpm_full_over_{name}"] = round(full / medians[name], 2)
        out[f"ddpm_full_over_{name}_decoder_only"] = round(
            (full - prior) / max(medians[name] - prior, 1e-9), 2)
    return out


def quality(model_uri: str, config, variants: dict) -> dict:
    """Each sampler's evaluation metrics (the pipeline's eval code and evaluator)."""
    from orchestration.evaluate.evaluation import evaluate_model

    reports = {}
    for name, sampling in variants.items():
        out_dir = Path(tempfile.mkdtemp(prefix=f"sampling-{name}-"))
        reports[name] = evaluate_model(model_uri, config, out_dir, log=lambda *_: None,
                                       sampling=sampling).metrics
        print(json.dumps({"quality": name, **{k: round(v, 4) for k, v in
                                              reports[name].items()}}), file=sys.stderr)
    base = reports["ddpm_full"]
    change = {name: {k: round(m[k] / base[k] - 1, 4) for k in m
                     if not k.endswith(("_lo", "_hi", "_seconds")) and base.get(k)}
              for name, m in reports.items() if name != "ddpm_full"}
    return {"metrics": reports, "relative_change_vs_ddpm_full": change}


def serve_rate(model_uri: str, tracking_uri: str, requests: int, repeats: int) -> dict:
    """Images/s of `requests` concurrent single-image requests vs the same sent in turn."""
    import ray
    import requests as http
    from ray import serve

    from orchestration.serve.serving import run_server

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    url = run_server(model_uri, tracking_uri=tracking_uri, port=port, blocking=False)
    body = {"prompt": PROMPTS[0], "num_images": 1}  # no seed: such requests may share a call

    def post(_=None) -> int:
        response = http.post(f"{url}/generate", json=body, timeout=900)
        response.raise_for_status()
        return response.json()["batch_size"]  # how many requests shared its generate call

    post()  # warm-up
    rates: dict[str, list[float]] = {"sequential": [], "concurrent": []}
    shared: list[int] = []
    for repeat in range(repeats):
        order = ["sequential", "concurrent"] if repeat % 2 == 0 else ["concurrent", "sequential"]
        for mode in order:
            start = time.perf_counter()
            if mode == "sequential":
                for _ in range(requests):
                    post()
            else:
                with concurrent.futures.ThreadPoolExecutor(requests) as pool:
                    shared += pool.map(post, range(requests))
            rates[mode].append(requests / (time.perf_counter() - start))
        print(json.dumps({"repeat": repeat, **{k: round(v[-1], 3) for k, v in rates.items()}}),
              file=sys.stderr, flush=True)
    serve.shutdown()
    ray.shutdown()
    medians = {f"{mode}_images_per_s": round(statistics.median(v), 3)
               for mode, v in rates.items()}
    return {**medians, "mean_requests_per_call_concurrent": round(statistics.mean(shared), 2),
            "concurrent_over_sequential": round(
        medians["concurrent_images_per_s"] / medians["sequential_images_per_s"], 2)}


def _config(path: str | None, model: str | None, overrides: list[str]):
    from orchestration.config import load_config
    from orchestration.release import is_release, release_config

    if path is None and model and is_release(model):
        return release_config(model, overrides)
    return load_config(path or str(REPO / "configs" / "shapes-paper.yaml"), overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", help="default: a release's own eval.yaml (with its "
                        "evaluator), else configs/shapes-paper.yaml")
    parser.add_argument("--set", action="append", default=[], help="config overrides")
    parser.add_argument("--model", help="a trained model URI (default: random weights)")
    parser.add_argument("--quality", action="store_true",
                        help="also score each sampler with the reference evaluator")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="+", default=["samplers", "serve"],
                        choices=["samplers", "serve"])
    args = parser.parse_args()
    if args.quality and not args.model:
        parser.error("--quality needs --model (a trained model; random weights score noise)")

    import torch

    torch.set_num_threads(args.threads)
    config = _config(args.config, args.model, args.set)
    model_uri = args.model or random_pipeline(
        config, Path(tempfile.mkdtemp(prefix="sampling-random-")) / "pipeline")
    result = {"date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "config": args.config or "(default)", "model": args.model or "random weights",
              "torch_threads": args.threads, "repeats": args.repeats}
    if "samplers" in args.only:
        pipeline = load_pipeline(model_uri, config)
        variants = sampler_variants(pipeline.decoder.diffusion.num_timesteps, args.ddim_steps)
        prompts = (PROMPTS * args.prompts)[: args.prompts]
        medians = time_samplers(pipeline, prompts, variants, args.repeats)
        result.update({"decoder_timesteps": pipeline.decoder.diffusion.num_timesteps,
                       "images": len(prompts),
                       "median_seconds": {k: round(v, 2) for k, v in medians.items()},
                       **speed_ratios(medians, variants)})
        if args.quality:
            result["quality"] = quality(model_uri, config, variants)
    if "serve" in args.only:
        result["serve"] = {"requests": args.requests,
                           **serve_rate(model_uri, config.mlflow.tracking_uri, args.requests,
                                        args.repeats)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
