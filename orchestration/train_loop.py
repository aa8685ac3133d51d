"""The one training loop, run by every Ray Train worker for every stage.

It owns the DeepSpeed engine, the LR schedule, EMA, seeding, data iteration, metrics,
evaluation, checkpoints and resumption; the stage's task (`orchestration.tasks`) supplies
the model, the batch-to-tensor mapping, the loss, per-step hooks and the evaluation. It
reads as a chain: `run -> train_step -> end_of_step -> (log_window, evaluate, checkpoint)`.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.distributed as dist

from orchestration.config import Config
from orchestration.engine_setup import EMA, build_optimizer, deepspeed_config, warmup_cosine
from orchestration.layout import PORTABLE_DIR
from orchestration.tasks.base import LossModule, Task, load_portable, save_portable
from orchestration.tracking import client_for, log_metrics, log_png

logger = logging.getLogger("unclip.train")
ENGINE_TAG = "engine"
STATE_FILE = "train_state.json"
EMA_FILE = "ema.pt"
EVAL_BATCHES = 4  # test batches per evaluation: enough for stable tiny-model metrics


class DataExhausted(RuntimeError):
    pass


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs; large inputs (e.g. the prior's normalisation sample) are
    read from storage by the task, not shipped here."""

    config: Config
    task: type[Task]
    run_id: str | None  # MLflow run that rank 0 logs to; None: no tracking
    train_samples: int  # one epoch of the train split, for the `epoch` metric
    init_from: str | None = None  # portable weights to start from (fine-tuning)
    fail_at_step: int | None = None  # fault injection for tests: raise once at this step


@dataclass
class TrainState:
    step: int = 0
    batches_consumed: int = 0  # micro-batches drawn from the stream (skipped on resume)
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
        from orchestration.loop_session import RaySession
        from orchestration.quiet_logs import quiet_library_logs

        quiet_library_logs()  # again: Ray Train configures its loggers after the setup hook
        session = RaySession()
    TrainLoop(spec, session).run()


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


class TrainLoop:
    def __init__(self, spec: WorkerSpec, session):
        self.spec, self.session, self.config = spec, session, spec.config
        self.task = spec.task(spec.config)
        self.stage = self.task.stage
        self.is_chief = session.rank == 0
        self.zero_stage = self.config.deepspeed.zero_stage
        self.device = _device(self.config.scaling.use_gpu)
        self.engine, self.ema = self._set_up_engine()
        self.state, self.fail_at_step = self._restore()
        self.tracker = client_for(self.config.mlflow.tracking_uri) if (
            self.is_chief and spec.run_id) else None
        self.eval_model = self.task.build_model().to(self.device) if self.is_chief else None
        self.eval_batches: list[dict] = []
        self.eval_model_step = -1  # the step whose EMA weights eval_model holds
        self.window = Window()
        self.progress = Progress(self.task.name, self.stage.steps, self.state.step)
        self.per_step = self.stage.batch_size * self.stage.grad_accum * session.world_size

    def _set_up_engine(self):
        config, stage, rank = self.config, self.stage, self.session.rank
        if config.scaling.torch_threads:
            torch.set_num_threads(config.scaling.torch_threads)
        _seed(config.seed + rank)  # per-rank randomness in the task's own state
        self.task.setup(device=self.device, rank=rank, world_size=self.session.world_size)
        _seed(config.seed)  # ... but identical initial weights on every rank
        model = self.task.build_model()
        if self.spec.init_from:
            model.load_state_dict(load_portable(self.spec.init_from)[1].state_dict())
        module = LossModule(model, self.task.compute_loss).to(self.device)
        optimizer = build_optimizer(module, stage, config.deepspeed)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(
            s, total_steps=stage.steps, warmup_fraction=stage.optim.warmup_fraction,
            min_lr_ratio=stage.optim.min_lr_ratio))
        engine, _, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(stage, config.deepspeed, use_gpu=config.scaling.use_gpu))
        ema = EMA(engine.module.model, decay=stage.optim.ema_decay, zero_stage=self.zero_stage)
        _seed(config.seed + 1000 * rank + 1)  # timesteps, noise, dropout: per rank
        return engine, ema

    def _restore(self) -> tuple[TrainState, int | None]:
        """(state, fault-injection step): the latest checkpoint's, or a fresh start's."""
        with self.session.restored() as directory:
            if directory is None:
                return TrainState(), self.spec.fail_at_step
            self.engine.load_checkpoint(directory, tag=ENGINE_TAG)
            state = TrainState(**json.loads((Path(directory) / STATE_FILE).read_text()))
            self.ema.load_state_dict(torch.load(Path(directory) / EMA_FILE, weights_only=True))
        _seed(self.config.seed + 1000 * self.session.rank + state.step)
        return state, None  # the injected fault fires only before the first restart

    def run(self) -> None:
        batches = self.session.train_batches(self.stage.batch_size,
                                             skip=self.state.batches_consumed,
                                             seed=self.config.seed + self.session.rank)
        while self.state.step < self.stage.steps:
            started = time.perf_counter()
            self.train_step(batches)
            self.window.time += time.perf_counter() - started
            self.window.steps += 1
            self.end_of_step()

    def train_step(self, batches) -> None:
        """One optimizer step over `grad_accum` micro-batches, then EMA and the task's hook."""
        for _ in range(self.stage.grad_accum):
            wait_start = time.perf_counter()
            raw = next(batches, None)
            self.window.wait += time.perf_counter() - wait_start
            if raw is None:
                raise DataExhausted(
                    f"{self.task.name}: the data ran out at step {self.state.step}; the driver "
                    "plans epochs from the manifest, so a shard must have lost samples")
            terms = self.engine(self.task.to_batch(raw, self.device))
            self.engine.backward(terms["loss"])
            self.engine.step()
            self.state.batches_consumed += 1
            for key, value in terms.items():
                self.window.terms[key] = self.window.terms.get(key, 0.0) + float(value.detach())
        self.state.step += 1
        self.state.samples_seen += self.per_step
        if self.state.step == self.fail_at_step:
            raise RuntimeError(f"injected failure at step {self.fail_at_step} (fault injection)")
        self.ema.update(self.engine.module.model, self.state.step)
        self.task.after_step(self.engine.module.model, zero_stage=self.zero_stage)

    def end_of_step(self) -> None:
        """Log, evaluate and checkpoint on their cadences; the last step does all three.
        The decisions depend on the step only, so every rank reports at the same steps."""
        step, stage = self.state.step, self.stage
        last = step == stage.steps
        logging_step = last or step % stage.log_every == 0
        evaluating = last or step % stage.evaluation_interval == 0
        metrics = self.log_window() if logging_step else {}
        if evaluating and self.is_chief:
            metrics.update(self.evaluate())
        metrics["step"] = step
        if last or step % stage.checkpoint_every == 0:
            self.checkpoint(metrics)
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
        self.window = Window()
        if self.is_chief:
            self._log(metrics)
            logger.info(self.progress.line(self.state.step, metrics))
        return metrics

    def evaluate(self) -> dict:
        """The task's evaluation of the EMA weights on fixed test batches (rank 0)."""
        if not self.eval_batches:  # the first N in order, so evaluations compare over time
            for raw in self.session.test_batches(self.stage.batch_size):
                self.eval_batches.append(self.task.to_batch(raw, self.device))
                if len(self.eval_batches) >= EVAL_BATCHES:
                    break
        self._load_ema_into_eval_model()
        result = self.task.evaluate(self.eval_model.eval(), self.eval_batches)
        self._log({f"val/{k}": v for k, v in result.metrics.items()}
                  | {"val_loss": result.metrics["val_loss"]})
        for name, image in result.images.items():
            if self.tracker:
                log_png(self.tracker, self.spec.run_id, image,
                        f"samples/{name}_step{self.state.step:06d}.png")
        return dict(result.metrics)

    def _load_ema_into_eval_model(self) -> None:
        if self.eval_model_step != self.state.step:
            self.ema.copy_to(self.eval_model, self.engine.module.model)
            self.eval_model_step = self.state.step

    def _log(self, metrics: dict) -> None:
        if self.tracker:
            log_metrics(self.tracker, self.spec.run_id, metrics, self.state.step)

    def checkpoint(self, metrics: dict) -> None:
        """Every rank saves its DeepSpeed shard and reports it; rank 0 adds the loop state,
        EMA and portable weights. Ray Train registers the checkpoint only once all ranks
        reported, so a half-written checkpoint is never the latest one."""
        with tempfile.TemporaryDirectory() as directory:
            self.engine.save_checkpoint(directory, tag=ENGINE_TAG)
            if self.is_chief:
                path = Path(directory)
                torch.save(self.ema.state_dict(), path / EMA_FILE)
                (path / STATE_FILE).write_text(json.dumps(asdict(self.state)))
                self._load_ema_into_eval_model()  # no-op when evaluate() just did
                save_portable(str(path / PORTABLE_DIR), self.task.name, self.eval_model,
                              self.task.model_config(self.eval_model))
            self.session.report(metrics, directory)


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
