"""The one training loop, run by every Ray Train worker for every stage.

It owns the DeepSpeed engine, the LR schedule, EMA, seeding, data iteration, metrics,
checkpoints and resumption; the stage's task (orchestration.tasks) supplies the model, the
batch-to-tensor mapping, the loss and the evaluation.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import deepspeed
import numpy as np
import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint

from orchestration.config import Config
from orchestration.engine_setup import (
    EMA,
    build_optimizer,
    deepspeed_config,
    gathered,
    warmup_cosine,
)
from orchestration.tasks import EVAL_BATCHES, TASKS, LossModule, load_portable, save_portable
from orchestration.tracking import client_for, log_metrics, log_png

ENGINE_TAG = "engine"
STATE_FILE = "train_state.json"
EMA_FILE = "ema.pt"
PORTABLE_DIR = "portable"


class DataExhausted(RuntimeError):
    pass


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def _device(use_gpu: bool) -> torch.device:
    if use_gpu:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def _mean_across_ranks(values: dict[str, float], device) -> dict[str, float]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    tensor /= dist.get_world_size()
    return dict(zip(keys, tensor.tolist(), strict=True))


class Progress:
    """Console progress on rank 0: step, loss, samples/s, ETA."""

    def __init__(self, stage: str, total: int, start_step: int):
        self.stage, self.total = stage, total
        self.start_step, self.start = start_step, time.monotonic()

    def line(self, step: int, metrics: dict) -> str:
        elapsed = time.monotonic() - self.start
        done = max(1, step - self.start_step)
        eta = elapsed / done * (self.total - step)
        return (f"[{self.stage}] step {step}/{self.total} loss {metrics['loss']:.4f} "
                f"{metrics['samples_per_s']:.0f} samples/s "
                f"data-wait {metrics['data_wait_fraction']:.0%} ETA {eta:.0f}s")


def _batches(shard, batch_size: int, skip: int, seed: int):
    """The worker's stream of numpy batches, skipping those consumed before a resume.

    The seeded local shuffle buffer mixes samples across blocks and keeps the stream
    reproducible, which is what makes skipping consumed batches an exact resume."""
    iterator = iter(shard.iter_batches(batch_size=batch_size, batch_format="numpy",
                                       drop_last=True, prefetch_batches=2,
                                       local_shuffle_buffer_size=4 * batch_size,
                                       local_shuffle_seed=seed))
    for _ in range(skip):
        next(iterator, None)
    return iterator


def train_worker(loop_config: dict) -> None:
    config = Config.model_validate(loop_config["config"])
    stage_name = loop_config["stage"]
    stage = config.stage(stage_name)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = _device(config.scaling.use_gpu)
    if config.scaling.torch_threads:
        torch.set_num_threads(config.scaling.torch_threads)
    _seed(config.seed + rank)  # per-rank randomness (timesteps, noise, dropout)

    task = TASKS[stage_name](config, rank=rank, world_size=world, device=device,
                             **loop_config.get("task_kwargs", {}))
    _seed(config.seed)  # ... but identical initial weights on every rank
    model = task.build_model()
    if loop_config.get("init_from_dir"):
        _, pretrained = load_portable(loop_config["init_from_dir"])
        model.load_state_dict(pretrained.state_dict())
    module = LossModule(model, task.compute_loss).to(device)
    optimizer = build_optimizer(module, stage, config.deepspeed)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(
        s, total_steps=stage.steps, warmup_fraction=stage.optim.warmup_fraction,
        min_lr_ratio=stage.optim.min_lr_ratio))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(stage, config.deepspeed, use_gpu=config.scaling.use_gpu))
    zero_stage = config.deepspeed.zero_stage
    ema = EMA(engine.module.model, decay=stage.optim.ema_decay, zero_stage=zero_stage)
    _seed(config.seed + 1000 * rank + 1)

    state = {"step": 0, "batches_consumed": 0, "samples_seen": 0}
    checkpoint = ray.train.get_checkpoint()
    fail_at_step = None if checkpoint else loop_config.get("fail_at_step")  # fault injection
    if checkpoint:
        with checkpoint.as_directory() as directory:
            engine.load_checkpoint(directory, tag=ENGINE_TAG)
            state = json.loads((Path(directory) / STATE_FILE).read_text())
            ema.load_state_dict(torch.load(Path(directory) / EMA_FILE, weights_only=True))
        _seed(config.seed + 1000 * rank + state["step"])

    is_chief = rank == 0
    tracker = client_for(config.mlflow.tracking_uri) if is_chief else None
    run_id = loop_config["run_id"]
    eval_model = task.build_model().to(device) if is_chief else None
    eval_batches: list[dict] = []
    progress = Progress(stage_name, stage.steps, state["step"])
    per_step = stage.batch_size * stage.grad_accum * world

    batches = _batches(ray.train.get_dataset_shard("train"), stage.batch_size,
                       state["batches_consumed"], seed=config.seed + rank)
    window = {"wait": 0.0, "time": 0.0, "steps": 0, "terms": {}}
    while state["step"] < stage.steps:
        step_start = time.perf_counter()
        for _ in range(stage.grad_accum):
            wait_start = time.perf_counter()
            raw = next(batches, None)
            window["wait"] += time.perf_counter() - wait_start
            if raw is None:
                raise DataExhausted(
                    f"{stage_name}: the data ran out at step {state['step']}; the driver plans "
                    "epochs from the manifest, so a shard must have lost samples")
            terms = engine(task.to_batch(raw, device))
            engine.backward(terms["loss"])
            engine.step()
            state["batches_consumed"] += 1
            for key, value in terms.items():
                window["terms"][key] = window["terms"].get(key, 0.0) + float(value.detach())
        state["step"] += 1
        state["samples_seen"] += per_step
        if state["step"] == fail_at_step:
            raise RuntimeError(f"injected failure at step {fail_at_step} (fault-injection test)")
        ema.update(engine.module.model, state["step"])
        if stage_name == "clip":
            _clamp_logit_scale(engine.module.model, zero_stage)
        window["time"] += time.perf_counter() - step_start
        window["steps"] += 1
        step = state["step"]
        is_last = step == stage.steps
        metrics: dict = {}
        if step % stage.log_every == 0 or is_last:
            metrics = _window_metrics(window, engine, stage.grad_accum, per_step, device)
            metrics["epoch"] = state["samples_seen"] / loop_config["train_samples"]
            window = {"wait": 0.0, "time": 0.0, "steps": 0, "terms": {}}
            if is_chief:
                log_metrics(tracker, run_id, metrics, step)
                print(progress.line(step, metrics), flush=True)
        if step % stage.checkpoint_every == 0 or is_last:
            if is_chief:
                if not eval_batches:
                    eval_batches = _eval_batches(task, device, stage.batch_size)
                ema.copy_to(eval_model, engine.module.model)
                result = task.evaluate(eval_model.eval(), eval_batches)
                metrics.update(result.metrics)
                log_metrics(tracker, run_id, {f"val/{k}": v for k, v in result.metrics.items()}
                            | {"val_loss": result.metrics["val_loss"]}, step)
                for name, image in result.images.items():
                    log_png(tracker, run_id, image, f"samples/{name}_step{step:06d}.png")
            _save_and_report(engine, ema, task, eval_model, state, metrics, is_chief)
        elif metrics:
            ray.train.report(metrics)


def _window_metrics(window: dict, engine, grad_accum: int, per_step: int, device) -> dict:
    steps = max(1, window["steps"])
    local = {k: v / (steps * grad_accum) for k, v in window["terms"].items()}
    local["data_wait_fraction"] = window["wait"] / max(window["time"], 1e-9)
    local["step_time_s"] = window["time"] / steps
    metrics = _mean_across_ranks(local, device)
    metrics["samples_per_s"] = per_step / max(metrics["step_time_s"], 1e-9)
    metrics["lr"] = engine.get_lr()[0]
    grad_norm = engine.get_global_grad_norm()
    if grad_norm is not None and math.isfinite(float(grad_norm)):
        metrics["grad_norm"] = float(grad_norm)
    return metrics


def _eval_batches(task, device, batch_size: int) -> list[dict]:
    """A fixed set of test batches (first N in order), so metrics compare across evaluations."""
    shard = ray.train.get_dataset_shard("test")
    out = []
    for raw in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
        out.append(task.to_batch(raw, device))
        if len(out) >= EVAL_BATCHES:
            break
    return out


@torch.no_grad()
def _clamp_logit_scale(model, zero_stage: int) -> None:
    with gathered(model, zero_stage):
        model.logit_scale.clamp_(0.0, math.log(100.0))


def _save_and_report(engine, ema, task, eval_model, state: dict, metrics: dict,
                     is_chief: bool) -> None:
    """Every rank saves its DeepSpeed shard and reports it; rank 0 adds EMA + portable weights.

    Ray Train merges the ranks' folders into one checkpoint, registered only once all ranks
    reported, so a half-written checkpoint is never the latest one.
    """
    with tempfile.TemporaryDirectory() as directory:
        engine.save_checkpoint(directory, tag=ENGINE_TAG)
        if is_chief:
            path = Path(directory)
            torch.save(ema.state_dict(), path / EMA_FILE)
            (path / STATE_FILE).write_text(json.dumps(state))
            save_portable(str(path / PORTABLE_DIR), task.name, eval_model,
                          task.model_config(eval_model))
        metrics = {**metrics, "step": state["step"]}
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))
