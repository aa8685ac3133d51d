"""The one training loop, run by every Ray Train worker for every stage.

It owns the DeepSpeed engine, the LR schedule, EMA, seeding, data iteration, metrics,
evaluation, checkpoints and resumption; the stage's task (`orchestration.train.tasks`) supplies
the model, the batch-to-tensor mapping, the loss, per-step hooks and the evaluation. It
reads as a chain: `run -> train_step -> end_of_step -> (log_window, evaluate, checkpoint)`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from data_pipelines.resumable import (
    DataLayoutChanged,
    Position,
    layout_changed,
    layout_difference,
)
from models.flops import mfu, peak_bf16_flops
from orchestration.common.layout import PORTABLE_DIR
from orchestration.common.tracking import client_for, log_metrics, log_png
from orchestration.config import Config
from orchestration.train.engine_setup import (
    EMA,
    build_optimizer,
    deepspeed_config,
    model_state_bytes,
    partitioned_construction,
    resolved_precision,
    warmup_cosine,
)
from orchestration.train.loop_session import RankStream
from orchestration.train.tasks.base import LossModule, Task, load_portable_into, save_portable

logger = logging.getLogger("unclip.train")
ENGINE_TAG = "engine"
STATE_FILE = "train_state.json"
EMA_FILE = "ema.pt"
EMA_SHARD_FILE = "ema_rank{rank}.pt"  # under ZeRO-3: each rank's average of its partitions
POSITION_FILE = "data_position_rank{rank}.json"  # each rank's place in its stream
EVAL_BATCHES = 4  # test batches per evaluation: enough for stable tiny-model metrics
STALL_SECONDS = 600  # an injected stall: long enough for any test to act, then it fails


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs; large inputs (e.g. the prior's normalisation sample) are
    read from storage by the task, not shipped here."""

    config: Config
    task: type[Task]
    run_id: str | None  # MLflow run that rank 0 logs to; None: no tracking
    train_samples: int  # one epoch of the train split, for the `epoch` metric
    train_stream: object | None = None  # `TrainStream` (Ray workers open their own stream)
    init_from: str | None = None  # portable weights to start from (fine-tuning)
    # fault injection for tests, once, before any restart: every rank raises at this step,
    # or the last rank's process is SIGKILLed there, or every rank stalls there (so that a
    # test can take a node away at a known step)
    fail_at_step: int | None = None
    fail_with: Literal["exception", "sigkill", "stall"] = "exception"
    sample_log: str | None = None  # local folder: each rank appends the keys of every step


@dataclass
class TrainState:
    step: int = 0
    samples_seen: int = 0


@dataclass
class Window:
    """Sums over the steps since the last log line."""

    wait: float = 0.0
    time: float = 0.0
    steps: int = 0
    terms: dict = field(default_factory=dict)


def train_worker(spec: WorkerSpec, session=None) -> None:
    """Ray Train's per-worker entry (or, with a `LocalSession`, the single-process loop)."""
    if session is None:
        from orchestration.common.quiet_logs import quiet_library_logs
        from orchestration.train.loop_session import RaySession

        quiet_library_logs()  # again: Ray Train configures its loggers after the setup hook
        scaling = spec.config.scaling
        session = RaySession(spec.train_stream, spec.config.data.stall_timeout_s,
                             f"the {scaling.num_workers} Train workers hold "
                             f"{scaling.cpus_per_worker:g} CPU each")
    TrainLoop(spec, session).run()


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def _step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one rank's step (timesteps, noise, dropout): a function of where the run
    is, so a resumed run draws exactly what an uninterrupted one would."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


class TrainLoop:
    def __init__(self, spec: WorkerSpec, session):
        self.spec, self.session, self.config = spec, session, spec.config
        self.task = spec.task(spec.config)
        self.stage = self.task.stage
        self.is_chief = session.rank == 0
        self.zero_stage = self.config.deepspeed.zero_stage
        self.device = _device(self.config.scaling.use_gpu)
        self.engine, self.ema = self._set_up_engine()
        self.state, self.position, self.fail_at_step = self._restore()
        self.tracker = client_for(self.config.mlflow.tracking_uri) if (
            self.is_chief and spec.run_id) else None
        # steps up to here are in MLflow already (an attempt that died after its checkpoint)
        # (also after a restart from no checkpoint at all)
        self.logged_through = _last_logged_step(self.tracker, spec.run_id) if (
            self.tracker) else 0
        self.eval_batches: list[dict] = []
        self.state_bytes_to_log = self.state.step == 0  # once per run, at its first step
        self.window = Window()
        self.progress = Progress(self.task.name, self.stage.steps, self.state.step)
        self.per_step = self.stage.batch_size * self.stage.grad_accum * session.world_size
        self.flops_per_step: int | None = None  # this rank's, counted during the first step
        self.peak_flops = _peak_flops(self.config, self.device)

    def _set_up_engine(self):
        config, stage, rank = self.config, self.stage, self.session.rank
        if config.scaling.torch_threads:
            torch.set_num_threads(config.scaling.torch_threads)
        _seed(config.seed + rank)  # per-rank randomness in the task's own state
        self.task.setup(device=self.device, rank=rank, world_size=self.session.world_size)
        _seed(config.seed)  # ... but identical initial weights on every rank
        ds_config = deepspeed_config(stage, config.deepspeed, use_gpu=config.scaling.use_gpu)
        with partitioned_construction(ds_config, self.zero_stage, self.task.child_inits):
            model = self.task.build_model()
        if self.spec.init_from:
            load_portable_into(model, self.spec.init_from, zero_stage=self.zero_stage)
        module = LossModule(model, self.task.compute_loss).to(self.device)
        optimizer = build_optimizer(module, stage, config.deepspeed)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(
            s, total_steps=stage.steps, warmup_fraction=stage.optim.warmup_fraction,
            min_lr_ratio=stage.optim.min_lr_ratio))
        engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer,
                                               lr_scheduler=scheduler, config=ds_config)
        ema = EMA(engine.module.model, decay=stage.optim.ema_decay, zero_stage=self.zero_stage)
        # counted inside the first optimizer step (ZeRO steps this same optimizer), the one
        # moment gradients and optimizer state are both held
        self.model_state_bytes: int | None = None
        self._count_hook = optimizer.register_step_post_hook(self._count_model_state)
        return engine, ema

    def _count_model_state(self, optimizer, args, kwargs) -> None:
        self.model_state_bytes = model_state_bytes(self.engine, self.ema)
        self._count_hook.remove()

    def _restore(self) -> tuple[TrainState, Position, int | None]:
        """(state, this rank's data position, fault-injection step): the latest checkpoint's,
        or a fresh start's."""
        with self.session.restored() as directory:
            if directory is None:
                return TrainState(), Position(), self.spec.fail_at_step
            position = self._saved_position(Path(directory))
            self.engine.load_checkpoint(directory, tag=ENGINE_TAG)
            state = TrainState(**json.loads((Path(directory) / STATE_FILE).read_text()))
            self.ema.load_state_dict(torch.load(Path(directory) / self._ema_file(),
                                                weights_only=True))
        return state, position, None  # the injected fault fires only before the first restart

    def _ema_file(self) -> str:
        return EMA_SHARD_FILE.format(rank=self.session.rank) if self.ema.sharded else EMA_FILE

    def _saved_position(self, directory: Path) -> Position:
        """This rank's position, if the data layout still gives it a meaning; a changed
        batch size carries over exactly (positions count samples, not batches)."""
        rank, layout = self.session.rank, self.session.layout()
        path = directory / POSITION_FILE.format(rank=rank)
        saved = json.loads(path.read_text()) if path.exists() else {"layout": {}}
        changed = layout_difference(saved["layout"], layout)
        if changed:
            raise DataLayoutChanged(layout_changed(self.task.name, self.config.run_name,
                                                   changed))
        if saved["batch_size"] != self.stage.batch_size and self.is_chief:
            logger.info("[%s] batch size %s -> %s: stream positions count samples, so the run "
                        "resumes exactly where it stopped", self.task.name, saved["batch_size"],
                        self.stage.batch_size)
        return Position(**saved["position"])

    def run(self) -> None:
        batches = RankStream(self.session.open_epoch, self.stage.batch_size, self.position,
                             self._all_ranks_have)
        while self.state.step < self.stage.steps:
            started = time.perf_counter()
            self.train_step(batches)
            self.window.time += time.perf_counter() - started
            self.window.steps += 1
            self.end_of_step()

    def train_step(self, batches: RankStream) -> None:
        """One optimizer step over `grad_accum` micro-batches, then EMA and the task's hook."""
        torch.manual_seed(_step_seed(self.config.seed, self.session.rank, self.state.step))
        keys = []
        for _ in range(self.stage.grad_accum):
            wait_start = time.perf_counter()
            raw = batches.next_batch()
            self.window.wait += time.perf_counter() - wait_start
            keys.extend(str(k) for k in raw.get("key", ()))
            batch = self.task.to_batch(raw, self.device)
            counting = self.flops_per_step is None
            with FlopCounterMode(display=False) if counting else contextlib.nullcontext() as (
                    counter):
                terms = self.engine(batch)
                self.engine.backward(terms["loss"])
            if counting:  # the model's own FLOPs: not the frozen encoders of to_batch
                self.flops_per_step = counter.get_total_flops() * self.stage.grad_accum
            self.engine.step()
            for key, value in terms.items():
                self.window.terms[key] = self.window.terms.get(key, 0.0) + float(value.detach())
        self.position = batches.position
        self.state.step += 1
        self.state.samples_seen += self.per_step
        self._record_keys(keys)
        if self.state.step == self.fail_at_step:
            self._inject_fault()
        # the hook first: the average takes the weights as the step left them (e.g. clamped)
        self.task.after_step(self.engine.module.model, zero_stage=self.zero_stage)
        self.ema.update(self.engine.module.model, self.state.step)

    def _all_ranks_have(self, has_batch: bool) -> bool:
        if self.session.world_size == 1:
            return has_batch
        flag = torch.tensor([int(has_batch)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _record_keys(self, keys: list[str]) -> None:
        """The sample log (an audit of exactly-once reading): one JSON line per step."""
        if self.spec.sample_log:
            path = Path(self.spec.sample_log) / f"rank{self.session.rank}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as out:
                out.write(json.dumps({"step": self.state.step, "keys": keys}) + "\n")

    def _inject_fault(self) -> None:
        step = self.fail_at_step
        if self.spec.fail_with == "sigkill":
            if self.session.rank == self.session.world_size - 1:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup: a lost process
            return
        if self.spec.fail_with == "stall":
            time.sleep(STALL_SECONDS)  # the test kills this process long before
            raise RuntimeError(f"injected stall at step {step}: nothing stopped the worker "
                               f"within {STALL_SECONDS} s (fault injection)")
        raise RuntimeError(f"injected failure at step {step} (fault injection)")

    def end_of_step(self) -> None:
        """Log, evaluate and checkpoint on their cadences; the last step does all three.
        The decisions depend on the step only, so every rank reports at the same steps."""
        step, stage = self.state.step, self.stage
        last = step == stage.steps
        logging_step = last or step % stage.log_every == 0
        evaluating = last or step % stage.evaluation_interval == 0
        checkpointing = last or step % stage.checkpoint_every == 0
        metrics = self.log_window() if logging_step else {}
        if self.state_bytes_to_log and self.model_state_bytes is not None:
            self._log({"model_state_bytes_rank0": self.model_state_bytes})
            self.state_bytes_to_log = False
        averaged = self.ema_model() if evaluating or checkpointing else None  # rank 0's
        if evaluating and self.is_chief:
            metrics.update(self.evaluate(averaged))
        metrics["step"] = step
        if checkpointing:
            self.checkpoint(metrics, averaged)
        elif logging_step or evaluating:
            self.session.report(metrics)

    def log_window(self) -> dict:
        """Mean loss terms, throughput and data wait since the last log (all ranks)."""
        window, steps = self.window, max(1, self.window.steps)
        local = {k: v / (steps * self.stage.grad_accum) for k, v in window.terms.items()}
        local["data_wait_fraction"] = window.wait / max(window.time, 1e-9)
        local["step_time_s"] = window.time / steps
        metrics = _mean_across_ranks(local, self.device)
        metrics["samples_per_s"] = self.per_step / max(metrics["step_time_s"], 1e-9)
        metrics["lr"] = self.engine.get_lr()[0]
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None and math.isfinite(float(grad_norm)):
            metrics["grad_norm"] = float(grad_norm)
        metrics["epoch"] = self.state.samples_seen / self.spec.train_samples
        if self.flops_per_step:  # per rank: matmuls, convolutions and attention
            metrics["tflops_per_s"] = self.flops_per_step / metrics["step_time_s"] / 1e12
            if self.peak_flops:
                metrics["mfu"] = mfu(self.flops_per_step, metrics["step_time_s"],
                                     self.peak_flops)
        self.window = Window()
        if self.is_chief:
            self._log(metrics)
            logger.info(self.progress.line(self.state.step, metrics))
        return metrics

    def ema_model(self) -> nn.Module | None:
        """The EMA weights in a freshly built plain model on rank 0 (None on the others). It
        is made when an evaluation or checkpoint needs it and dropped after, so no second
        full model stays resident. Every rank must call it (ZeRO-3 gathers the average)."""
        source = self.engine.module.model
        target = self.task.model_from_config(self.task.model_config(source)) if (
            self.is_chief) else None
        self.ema.copy_to(target, source)
        return target.to(self.device).eval() if target is not None else None

    def evaluate(self, model: nn.Module) -> dict:
        """The task's evaluation of the EMA weights (`model`) on fixed test batches (rank 0)."""
        if not self.eval_batches:  # the first N in order, so evaluations compare over time
            for raw in self.session.test_batches(self.stage.batch_size):
                self.eval_batches.append(self.task.to_batch(raw, self.device))
                if len(self.eval_batches) >= EVAL_BATCHES:
                    break
        result = self.task.evaluate(model, self.eval_batches)
        self._log({f"val/{k}": v for k, v in result.metrics.items()}
                  | {"val_loss": result.metrics["val_loss"]})
        for name, image in result.images.items():
            if self.tracker and self.state.step > self.logged_through:
                log_png(self.tracker, self.spec.run_id, image,
                        f"samples/{name}_step{self.state.step:06d}.png")
        return dict(result.metrics)

    def _log(self, metrics: dict) -> None:
        """To MLflow, once per step: a resumed run redoes the steps since its checkpoint
        exactly, and what the lost attempt logged for them stands."""
        if self.tracker and self.state.step > self.logged_through:
            log_metrics(self.tracker, self.spec.run_id, metrics, self.state.step)

    def checkpoint(self, metrics: dict, averaged: nn.Module | None) -> None:
        """Every rank saves its DeepSpeed shard and its stream position (under ZeRO-3 also
        its EMA partitions) and reports them; rank 0 adds the loop state, the EMA (at ZeRO
        0-2) and the portable weights of `averaged`, the EMA model. Ray Train registers the
        checkpoint only once all ranks reported, so a half-written one is never the latest."""
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory)
            self.engine.save_checkpoint(directory, tag=ENGINE_TAG)
            record = {"position": asdict(self.position), "layout": self.session.layout(),
                      "batch_size": self.stage.batch_size}
            (path / POSITION_FILE.format(rank=self.session.rank)).write_text(json.dumps(record))
            if self.ema.sharded or self.is_chief:
                torch.save(self.ema.state_dict(), path / self._ema_file())
            if self.is_chief:
                (path / STATE_FILE).write_text(json.dumps(asdict(self.state)))
                save_portable(str(path / PORTABLE_DIR), self.task.name, averaged,
                              self.task.model_config(averaged))
            self.session.report(metrics, directory)


def _last_logged_step(client, run_id: str) -> int:
    # every log window logs step_time_s, every evaluation val_loss
    return max((m.step for key in ("step_time_s", "val_loss")
                for m in client.get_metric_history(run_id, key)), default=0)


def _peak_flops(config: Config, device: torch.device) -> float | None:
    """The device's peak FLOP/s for MFU: the configured one, or a known GPU's bf16 peak."""
    if config.scaling.peak_tflops:
        return config.scaling.peak_tflops * 1e12
    if device.type == "cuda" and resolved_precision(config.deepspeed, True) == "bf16":
        return peak_bf16_flops(torch.cuda.get_device_name(device))
    return None


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
        eta = elapsed / max(1, step - self.start_step) * (self.total - step)
        return (f"[{self.stage}] step {step}/{self.total} loss {metrics['loss']:.4f} "
                f"{metrics['samples_per_s']:.0f} samples/s "
                f"data-wait {metrics['data_wait_fraction']:.0%} ETA {eta:.0f}s")
