"""Steps/s of the unclip-ray training loop vs a bare single-process PyTorch loop.

Same model preset, batch size, optimizer and thread count. The loop runs as a real Ray Train
job (1 worker, DeepSpeed ZeRO-0 and ZeRO-2, Ray Data streaming from a local shards folder);
its step time is the median of the `step_time_s` windows it logs to MLflow, skipping the
first (warm-up). The bare loop trains on in-memory tensors, so the ratio also includes any
data-path cost the loop does not hide. Usage:

    python benchmarks/loop_overhead.py [--steps 60] [--stages clip decoder] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch


def bare_step_time(config, stage: str, steps: int) -> float:
    """Median seconds per optimizer step of the plain loop (same task code, no Ray/DS)."""
    from orchestration.engine_setup import build_optimizer
    from orchestration.tasks import TASKS, LossModule
    from orchestration.training_job import portable_uri

    kwargs = {"clip_dir": portable_uri(config, "clip")} if stage != "clip" else {}
    task = TASKS[stage](config, **kwargs)
    torch.manual_seed(0)
    module = LossModule(task.build_model(), task.compute_loss)
    optimizer = build_optimizer(module, config.stage(stage), config.deepspeed)
    size, length = config.data.preprocess.image_size, config.data.preprocess.context_length
    batch_size = config.stage(stage).batch_size
    raw = {"image": torch.rand(batch_size, 3, size, size).numpy() * 2 - 1,
           "tokens": torch.randint(1, 1000, (batch_size, length)).numpy(),
           "caption": ["a red circle"] * batch_size}
    batch = task.to_batch(raw, "cpu")
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = module(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--stages", nargs="+", default=["clip", "decoder"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from orchestration.config import load_config
    from orchestration.ray_runtime import connect
    from orchestration.training_job import run_stage, stage_done

    work = tempfile.mkdtemp(prefix="loop-overhead-")
    rows = []
    for zero in (0, 2):
        overrides = [f"data.uri={work}/shapes", f"storage_root={work}/runs",
                     f"run_name=z{zero}", f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db",
                     f"deepspeed.zero_stage={zero}", f"scaling.torch_threads={args.threads}",
                     "data.shapes.train_size=2000", "data.shapes.test_size=64"]
        for stage in ("clip", "decoder"):
            overrides += [f"{stage}.steps={args.steps}", f"{stage}.log_every=10",
                          f"{stage}.checkpoint_every={args.steps}"]
        config = load_config("tiny", overrides)
        connect(config)
        if "decoder" in args.stages and not stage_done(config, "clip"):
            run_stage(config, "clip", log=lambda *_: None)
        for stage in args.stages:
            bare = bare_step_time(config, stage, args.steps)
            loop, wait = loop_step_time(config, stage)
            rows.append({"stage": stage, "zero_stage": zero,
                         "batch_size": config.stage(stage).batch_size,
                         "bare_s_per_step": round(bare, 4), "loop_s_per_step": round(loop, 4),
                         "loop_data_wait": round(wait, 3),
                         "overhead_ratio": round(loop / bare, 3)})
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"threads": args.threads, "steps": args.steps, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
