"""Steps/s of the unclip-ray training loop vs a bare single-process PyTorch loop.

Same model preset, batch size, optimizer and thread count. The loop runs as a real Ray Train
job (1 worker, DeepSpeed ZeRO-0 and ZeRO-2, Ray Data streaming from a local shards folder);
its step time is the median of the `step_time_s` windows it logs to MLflow, skipping the
first (warm-up). The bare loop trains on in-memory tensors; the loop streams (Ray Data
decodes beside training, competing for the same cores on a CPU-only machine). Usage:

    python benchmarks/loop_overhead.py [--steps 60] [--stages clip decoder] [--threads 2]
        [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch


def bare_step_time(config, stage: str, steps: int) -> float:
    """Median seconds per optimizer step of the plain loop: same task code and recipe
    (AdamW, grad clipping, EMA of weights), no Ray, no DeepSpeed."""
    from orchestration.engine_setup import EMA, build_optimizer
    from orchestration.stages import task_class
    from orchestration.tasks.base import LossModule

    task = task_class(stage)(config)
    task.setup(device=torch.device("cpu"))
    torch.manual_seed(0)
    module = LossModule(task.build_model(), task.compute_loss)
    optimizer = build_optimizer(module, config.stage(stage), config.deepspeed)
    ema = EMA(module.model, decay=config.stage(stage).optim.ema_decay, zero_stage=0)
    size, length = config.data.preprocess.image_size, config.data.preprocess.context_length
    batch_size = config.stage(stage).batch_size
    raw = {"image": torch.rand(batch_size, 3, size, size).numpy() * 2 - 1,
           "tokens": torch.randint(1, 1000, (batch_size, length)).numpy(),
           "caption": ["a red circle"] * batch_size}
    batch = task.to_batch(raw, "cpu")
    times = []
    for step in range(steps):
        start = time.perf_counter()
        loss = module(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        ema.update(module.model, step)
        times.append(time.perf_counter() - start)
    return statistics.median(times[5:])


def loop_step_time(config, stage: str) -> tuple[float, float]:
    from mlflow.tracking import MlflowClient

    from orchestration.training_job import run_stage

    result = run_stage(config, stage, log=lambda *_: None)
    client = MlflowClient(config.mlflow.tracking_uri)
    times = [m.value for m in sorted(client.get_metric_history(result.run_id, "step_time_s"),
                                     key=lambda m: m.step)][1:]
    waits = [m.value for m in client.get_metric_history(result.run_id, "data_wait_fraction")]
    return statistics.median(times), statistics.median(waits)


def bare_step_time_in_ray(config, stage: str, steps: int, threads: int) -> float:
    """The same bare loop as a plain Ray task: same niceness and neighbours as a Train worker
    (Ray runs workers at nice 15 beside its own control processes), but no Train/DeepSpeed."""
    import ray

    @ray.remote(num_cpus=config.scaling.cpus_per_worker)
    def run(config_json: dict) -> float:
        from orchestration.config import Config

        torch.set_num_threads(threads)
        return bare_step_time(Config.model_validate(config_json), stage, steps)

    return ray.get(run.remote(config.model_dump(mode="json")))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--stages", nargs="+", default=["clip", "decoder"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from orchestration.config import load_config
    from orchestration.ray_runtime import connect
    from orchestration.training_job import run_stage, stage_done
    from tuning.lr_sweep import share_upstream

    work = tempfile.mkdtemp(prefix="loop-overhead-")

    def config_for(name: str, zero: int):
        overrides = [f"data.uri={work}/shapes", f"storage_root={work}/runs", f"run_name={name}",
                     f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db",
                     f"deepspeed.zero_stage={zero}", f"scaling.torch_threads={args.threads}",
                     "data.shapes.train_size=2000", "data.shapes.test_size=64"]
        for stage in ("clip", "decoder"):
            overrides += [f"{stage}.steps={args.steps}", f"{stage}.log_every=10",
                          f"{stage}.checkpoint_every={args.steps}"]
        return load_config("tiny", overrides)

    base = config_for("clip-for-decoder", 0)
    connect(base)
    if "decoder" in args.stages and not stage_done(base, "clip"):
        run_stage(base, "clip", log=lambda *_: None)
    samples: dict = {}  # (stage, zero) -> measure -> [seconds per step, one per repeat]
    for repeat in range(args.repeats):  # interleaved, so drift hits every measure alike
        for zero in (0, 2):
            stream = config_for(f"z{zero}-stream-r{repeat}", zero)
            for stage in args.stages:
                if stage != "clip":
                    share_upstream(base, stream, stage)
                row = samples.setdefault((stage, zero), {})
                measures = {
                    "bare_process": bare_step_time(stream, stage, args.steps),
                    "bare_ray_task": bare_step_time_in_ray(stream, stage, args.steps,
                                                           args.threads),
                    "loop_stream": loop_step_time(stream, stage)[0],
                }
                for key, value in measures.items():
                    row.setdefault(key, []).append(value)
                print(json.dumps({"repeat": repeat, "stage": stage, "zero_stage": zero,
                                  **{k: round(v, 4) for k, v in measures.items()}}), flush=True)
    rows = []
    for (stage, zero), row in samples.items():
        median = {key: statistics.median(values) for key, values in row.items()}
        rows.append({"stage": stage, "zero_stage": zero,
                     "batch_size": base.stage(stage).batch_size,
                     **{f"{k}_s_per_step": round(v, 4) for k, v in median.items()},
                     "ratio_stream_vs_process": round(median["loop_stream"]
                                                      / median["bare_process"], 3),
                     "ratio_stream_vs_ray_task": round(median["loop_stream"]
                                                       / median["bare_ray_task"], 3)})
    print(json.dumps({"threads": args.threads, "steps": args.steps, "repeats": args.repeats,
                      "results": rows}, indent=2))


if __name__ == "__main__":
    main()
