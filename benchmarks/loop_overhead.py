"""Steps/s of the unclip-ray training loop vs a bare single-process PyTorch loop.

Same model preset, batch size, optimizer, per-step task work (`to_batch`: e.g. the frozen
CLIP encoding the decoder's images) and thread count. The loop runs as a real Ray Train job
(1 worker, DeepSpeed at the variant's ZeRO stage, Ray Data streaming from a local shards
folder); its step time is the median of the `step_time_s` windows it logs to MLflow,
skipping the first (warm-up). The bare loop trains on one in-memory raw batch. The figure is
bare/loop: the share of the bare loop's throughput the loop keeps (1.0 = no overhead).

Two measures in between split the difference, all in the benchmark's own process (world
size 1, gloo): `engine` runs the bare loop's steps through a DeepSpeed engine built as the
loop builds it; `local` runs the project's own loop (`TrainLoop`) with its in-memory
`LocalSession` instead of Ray Train and streaming. So bare -> engine is DeepSpeed's cost,
engine -> local our loop's, local -> loop that of Ray Train and Ray Data streaming beside
training (on a CPU-only machine they share the cores).

A variant is a ZeRO stage plus DeepSpeed config overrides and, optionally, engine patches
that stand for a proposed change to the project's engine set-up (`ENGINE_PATCHES`). They
reach the Ray Train worker through a worker setup hook that wraps `deepspeed_config` (the
project code is unchanged).

`--profile` samples the Train worker with py-spy (on PATH or in the venv) through each loop
run and adds where its training steps' time goes (ms/step per part, the loop's median step
split by the share of samples). Sampling slows the worker, so take figures from runs
without it. Usage:

    python benchmarks/loop_overhead.py [--stages clip prior decoder] [--threads 1]
        [--variants zero0 zero2] [--steps 50] [--log-every 10] [--repeats 2] [--profile]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch

# name -> (zero stage, DeepSpeed config overrides merged into the project's config; the key
# "patches" lists ENGINE_PATCHES to apply)
VARIANTS: dict[str, tuple[int, dict]] = {
    "zero0": (0, {}),
    "zero2": (2, {}),
    # what the project would do if it used stage 0 whenever world_size == 1
    "zero2-as-0": (2, {"zero_optimization": {"stage": 0}}),
    # ZeRO-2 without its contiguous gradient buffer (grads stay in param.grad until reduce)
    "zero2-nocontig": (2, {"zero_optimization": {"contiguous_gradients": False}}),
    # ZeRO-1: partitions optimizer states only, no per-parameter gradient hooks
    "zero2-as-1": (2, {"zero_optimization": {"stage": 1}}),
    # stage 0, and at world size 1 no all-reduce and torch's fused clipping (see below)
    "zero0-ws1": (0, {"patches": ["no_allreduce_ws1", "torch_clip"]}),
    "zero2-as-0-ws1": (2, {"zero_optimization": {"stage": 0},
                           "patches": ["no_allreduce_ws1", "torch_clip"]}),
}
OVERRIDES_ENV = "LOOP_OVERHEAD_DS_OVERRIDES"  # a JSON file the driver rewrites per run


def _no_allreduce_ws1(engine) -> None:
    # stage 0 all-reduces every gradient after backward (flatten, gloo call, copy back): with
    # one rank that changes nothing; ZeRO-1/2 need the call (it fills their partitions)
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        engine.enable_backward_allreduce = False


def _torch_clip(engine) -> None:
    # DeepSpeed's stage-0 clipping walks the parameters in Python and all-reduces the norm;
    # torch's clip_grad_norm_ uses foreach kernels (the same norm at world size 1)
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        engine.clip_fp32_gradients = lambda: torch.nn.utils.clip_grad_norm_(
            engine.module.parameters(), engine.gradient_clipping())


ENGINE_PATCHES = {"no_allreduce_ws1": _no_allreduce_ws1, "torch_clip": _torch_clip}


def patch_engine_class(names: list[str]) -> None:
    """Apply the named patches to every DeepSpeedEngine built from now on in this process."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = getattr(DeepSpeedEngine, "_unpatched_init", DeepSpeedEngine.__init__)
    DeepSpeedEngine._unpatched_init = original

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        for name in names:
            ENGINE_PATCHES[name](self)

    DeepSpeedEngine.__init__ = init


# --- the bare loop ------------------------------------------------------------------------

def raw_batch(config, stage: str) -> dict:
    """One raw batch as the stage's Ray Data stream yields it (random contents)."""
    batch_size = config.stage(stage).batch_size
    if stage == "prior":
        from orchestration.train.tasks.frozen_clip import clip_sizes

        embed, width, context = clip_sizes(config)
        raw = {"text_emb": np.random.randn(batch_size, embed).astype(np.float32),
               "image_emb": np.random.randn(batch_size, embed).astype(np.float32)}
        if config.data.embed_token_encodings:
            raw["text_tokens"] = np.random.randn(batch_size, context, width).astype(np.float16)
        return raw
    size, length = config.data.preprocess.image_size, config.data.preprocess.context_length
    return {"image": np.random.rand(batch_size, 3, size, size).astype(np.float32) * 2 - 1,
            "tokens": np.random.randint(1, 1000, (batch_size, length)),
            "caption": ["a red circle"] * batch_size}


def columns(config, stage: str, batches: int) -> dict:
    """`batches` raw batches as the in-memory columns `LocalSession` serves."""
    parts = [raw_batch(config, stage) for _ in range(batches)]
    out = {k: np.concatenate([np.asarray(p[k], dtype=object if k == "caption" else None)
                              for p in parts]) for k in parts[0]}
    out["key"] = np.array([f"k{i}" for i in range(len(next(iter(out.values()))))],
                          dtype=object)
    return out


def bare_step_time(config, stage: str, steps: int) -> float:
    """Median seconds per optimizer step of the plain loop: same task code and recipe
    (to_batch, AdamW, grad clipping, EMA of weights), no Ray, no DeepSpeed."""
    from orchestration.stages import task_class
    from orchestration.train.engine_setup import EMA, build_optimizer
    from orchestration.train.tasks.base import LossModule

    task = task_class(stage)(config)
    task.setup(device=torch.device("cpu"))
    torch.manual_seed(0)
    module = LossModule(task.build_model(), task.compute_loss)
    optimizer = build_optimizer(module, config.stage(stage), config.deepspeed)
    ema = EMA(module.model, decay=config.stage(stage).optim.ema_decay, zero_stage=0)
    raw = raw_batch(config, stage)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        loss = module(task.to_batch(raw, "cpu"))["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        ema.update(module.model, step)
        times.append(time.perf_counter() - start)
    return statistics.median(times[5:])


def engine_step_time(config, stage: str, steps: int, overrides: dict) -> float:
    """The bare loop's steps through a DeepSpeed engine set up as the loop sets it up."""
    import deepspeed

    from orchestration.stages import task_class
    from orchestration.train.engine_setup import (
        EMA,
        build_optimizer,
        deepspeed_config,
        warmup_cosine,
    )
    from orchestration.train.loop_session import init_single_process_group
    from orchestration.train.tasks.base import LossModule

    init_single_process_group()
    task = task_class(stage)(config)
    task.setup(device=torch.device("cpu"))
    stage_config = config.stage(stage)
    torch.manual_seed(0)
    module = LossModule(task.build_model(), task.compute_loss)
    optimizer = build_optimizer(module, stage_config, config.deepspeed)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(
        s, total_steps=stage_config.steps, warmup_fraction=stage_config.optim.warmup_fraction,
        min_lr_ratio=stage_config.optim.min_lr_ratio))
    ds_config = config_with(deepspeed_config(stage_config, config.deepspeed, use_gpu=False),
                            overrides)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=ds_config)
    ema = EMA(engine.module.model, decay=stage_config.optim.ema_decay,
              zero_stage=config.deepspeed.zero_stage)
    raw = raw_batch(config, stage)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        terms = engine(task.to_batch(raw, "cpu"))
        engine.backward(terms["loss"])
        engine.step()
        ema.update(engine.module.model, step)
        times.append(time.perf_counter() - start)
    engine.destroy()
    patch_engine_class([])
    return statistics.median(times[5:])


def local_step_time(config, stage: str, overrides: dict) -> float:
    """The project's loop in this process: median `step_time_s` window after the first."""
    from orchestration.stages import task_class
    from orchestration.train import train_loop
    from orchestration.train.engine_setup import deepspeed_config
    from orchestration.train.loop_session import LocalSession, init_single_process_group

    init_single_process_group()
    data = {"train": columns(config, stage, 4), "test": columns(config, stage, 1)}
    session = LocalSession(data, tempfile.mkdtemp(prefix="local-loop-"))
    spec = train_loop.WorkerSpec(config=config, task=task_class(stage), run_id=None,
                                 train_samples=len(data["train"]["key"]))
    train_loop.deepspeed_config = lambda *a, **k: config_with(deepspeed_config(*a, **k),
                                                              overrides)
    try:
        train_loop.train_worker(spec, session)
    finally:
        train_loop.deepspeed_config = deepspeed_config
        patch_engine_class([])
    times = [r["step_time_s"] for r in session.reports if "step_time_s" in r][1:]
    return statistics.median(times)


# --- the loop, with DeepSpeed overrides ---------------------------------------------------

def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def config_with(base: dict, overrides: dict) -> dict:
    """The DeepSpeed config with the variant's overrides; its engine patches applied."""
    overrides = dict(overrides)
    patch_engine_class(overrides.pop("patches", []))
    return _merge(base, overrides)


def worker_setup_hook() -> None:
    """Every Ray worker: the project's own hook, then `deepspeed_config` wrapped to merge the
    overrides file in (train_loop imports the name later, so it gets the wrapper; deepspeed
    is imported by then, and the engine is built after its config)."""
    from orchestration.common.quiet_logs import quiet_library_logs
    from orchestration.train import engine_setup

    quiet_library_logs()
    original = engine_setup.deepspeed_config

    def with_overrides(*args, **kwargs):
        with open(os.environ[OVERRIDES_ENV]) as file:
            return config_with(original(*args, **kwargs), json.load(file))

    engine_setup.deepspeed_config = with_overrides


def start_ray(num_cpus: int | None, overrides_file: str) -> None:
    """As `orchestration.common.ray_runtime.connect` starts a local instance, plus our hook."""
    import logging

    import ray

    from orchestration.common.ray_runtime import configure_ray_data

    os.environ[OVERRIDES_ENV] = overrides_file
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(address="local", num_cpus=num_cpus, logging_level=logging.WARNING,
             dashboard_host="127.0.0.1",
             runtime_env={"worker_process_setup_hook": worker_setup_hook,
                          "env_vars": {OVERRIDES_ENV: overrides_file}})
    configure_ray_data()


def loop_step_time(config, stage: str) -> tuple[float, float]:
    """(median step_time_s window after the first, median data-wait fraction)."""
    from mlflow.tracking import MlflowClient

    from orchestration.train.training_job import run_stage

    result = run_stage(config, stage, log=lambda *_: None)
    client = MlflowClient(config.mlflow.tracking_uri)
    times = [m.value for m in sorted(client.get_metric_history(result.run_id, "step_time_s"),
                                     key=lambda m: m.step)][1:]
    waits = [m.value for m in client.get_metric_history(result.run_id, "data_wait_fraction")]
    return statistics.median(times), statistics.median(waits)


# --- profiling ----------------------------------------------------------------------------

# (part, substrings of a stack, any of which puts a sample there); first match wins
PARTS = [
    ("data wait", ("next_batch",)),
    ("to_batch (task)", ("to_batch",)),
    ("EMA", ("engine_setup.py",)),
    ("ZeRO-1/2 grad hooks, buckets, copies (backward)",
     ("reduce_ready_partitions", "reduce_independent_p_g", "reduce_ipg_grads",
      "independent_gradient_partition_epilogue", "average_tensor")),
    ("optimizer math (AdamW)", ("adamw.py", "adam.py")),
    ("grad norm + clip", ("get_grad_norm", "clip_grad_norm", "unscale_and_clip",
                          "scaled_global_norm")),
    ("ZeRO-1/2 step bookkeeping", ("stage_1_and_2.py",)),
    ("backward compute", ("backward",)),
    ("forward compute", ("forward",)),
]


def train_worker_pid(driver: int) -> int | None:
    import psutil

    for child in psutil.Process(driver).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    return None


def record_profile(out: str) -> threading.Thread:
    """Samples the Train worker from its start to its exit (only `train_step` counts)."""
    def run():
        deadline = time.monotonic() + 120
        pid = None
        while pid is None and time.monotonic() < deadline:
            time.sleep(0.2)
            pid = train_worker_pid(os.getpid())
        if pid is None:
            return
        py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        subprocess.run([py_spy, "record", "-p", str(pid), "-r", "100", "--nonblocking",
                        "-f", "raw", "-o", out], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def summarise_profile(path: str, steps: int) -> dict:
    """ms per training step of each part: samples inside `train_step` at 100 Hz, over all
    steps (so the first window's stream start-up counts under data wait)."""
    counts: collections.Counter = collections.Counter()
    for line in open(path):
        stack, _, count = line.rstrip().rpartition(" ")
        if "train_step" not in stack:
            continue
        inner = stack[stack.index("train_step"):]
        part = next((name for name, keys in PARTS if any(k in inner for k in keys)), "other")
        counts[part] += int(count)
    return {part: round(10 * n / steps, 1) for part, n in counts.most_common()}


# --- the benchmark ------------------------------------------------------------------------

def prepare_upstream(base, stages: list[str]) -> None:
    """CLIP (for the decoder and the prior) and its embeddings (for the prior), once."""
    from orchestration.common.layout import stage_done
    from orchestration.train.embed_job import run_embed
    from orchestration.train.training_job import run_stage

    if set(stages) & {"prior", "decoder"} and not stage_done(base, "clip"):
        run_stage(base, "clip", log=lambda *_: None)
    if "prior" in stages:
        from data_pipelines.storage import resolve

        if not resolve(base.data.resolved_embeddings_uri).join("manifest.json").exists():
            run_embed(base, log=lambda *_: None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stages", nargs="+", default=["clip", "prior", "decoder"],
                        choices=["clip", "prior", "decoder"])
    parser.add_argument("--variants", nargs="+", default=["zero0", "zero2"], choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--work", help="reuse this folder (dataset, CLIP, embeddings)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from orchestration.common.quiet_logs import quiet_library_logs
    from orchestration.config import load_config
    from tuning.lr_sweep import share_upstream

    work = args.work or tempfile.mkdtemp(prefix="loop-overhead-")
    overrides_file = os.path.join(work, "ds_overrides.json")

    def config_for(name: str, zero: int):
        overrides = [f"data.uri={work}/shapes", f"storage_root={work}/runs", f"run_name={name}",
                     f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db",
                     f"deepspeed.zero_stage={zero}", f"scaling.torch_threads={args.threads}",
                     "data.shapes.train_size=2000", "data.shapes.test_size=64",
                     # the last step's evaluation samples: fewer steps, same timed windows
                     "sampling.decoder_steps=4", "sampling.prior_steps=4"]
        for stage in ("clip", "prior", "decoder"):
            overrides += [f"{stage}.steps={args.steps}", f"{stage}.log_every={args.log_every}",
                          f"{stage}.checkpoint_every={args.steps}"]
        return load_config("tiny", overrides)

    quiet_library_logs()
    start_ray(None, overrides_file)
    base = config_for("upstream", 0)
    with open(overrides_file, "w") as file:
        json.dump({}, file)
    prepare_upstream(base, args.stages)
    run_tag = f"{os.getpid()}"
    samples: dict = {}  # (stage, variant) -> measure -> [one value per repeat]
    profiles: dict = {}
    for repeat in range(args.repeats):  # interleaved, so drift hits every measure alike
        for variant in args.variants:
            zero, ds_overrides = VARIANTS[variant]
            with open(overrides_file, "w") as file:
                json.dump(ds_overrides, file)
            config = config_for(f"{variant}-r{repeat}-{run_tag}", zero)
            for stage in args.stages:
                if stage != "clip":
                    share_upstream(base, config, stage)
                profile = os.path.join(work, f"profile-{stage}-{variant}-r{repeat}.txt")
                recorder = record_profile(profile) if args.profile else None
                loop, wait = loop_step_time(config, stage)
                if recorder:
                    recorder.join(timeout=30)  # py-spy ends when the worker exits
                    if os.path.exists(profile):
                        profiles.setdefault((stage, variant), []).append(
                            summarise_profile(profile, args.steps))
                measures = {"bare": bare_step_time(config, stage, args.steps),
                            "engine": engine_step_time(config, stage, args.steps, ds_overrides),
                            "local": local_step_time(config, stage, ds_overrides),
                            "loop": loop, "data_wait": wait}
                row = samples.setdefault((stage, variant), {})
                for key, value in measures.items():
                    row.setdefault(key, []).append(value)
                print(json.dumps({"repeat": repeat, "stage": stage, "variant": variant,
                                  **{k: round(v, 4) for k, v in measures.items()}}), flush=True)
    rows = []
    for (stage, variant), row in samples.items():
        median = {key: statistics.median(values) for key, values in row.items()}
        rows.append({"stage": stage, "variant": variant, "zero_stage": VARIANTS[variant][0],
                     "ds_overrides": VARIANTS[variant][1],
                     "batch_size": base.stage(stage).batch_size,
                     "bare_s_per_step": round(median["bare"], 4),
                     "engine_s_per_step": round(median["engine"], 4),
                     "local_s_per_step": round(median["local"], 4),
                     "loop_s_per_step": round(median["loop"], 4),
                     "bare_over_engine": round(median["bare"] / median["engine"], 3),
                     "bare_over_local": round(median["bare"] / median["local"], 3),
                     "bare_over_loop": round(median["bare"] / median["loop"], 3),
                     "loop_data_wait_fraction": round(median["data_wait"], 4),
                     "runs": {k: [round(x, 4) for x in v] for k, v in row.items()},
                     **({"profile_ms_per_step": profiles[(stage, variant)]}
                        if (stage, variant) in profiles else {})})
    print(json.dumps({"threads": args.threads, "steps": args.steps, "log_every": args.log_every,
                      "repeats": args.repeats, "work": work, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
