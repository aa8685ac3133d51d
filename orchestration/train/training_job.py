"""Driver side of a training stage: the task's datasets and inputs, the MLflow run, the
TorchTrainer, and the portable export.

Outputs follow `orchestration.common.layout`. Rerunning with the same run name resumes from the
latest checkpoint (Ray Train V2 restores a run from its storage path and name); the MLflow
run is found again by its run key.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from data_pipelines.shards import manifest_hash
from data_pipelines.storage import (
    StorageError,
    is_s3_uri,
    resolve,
    retry_misfiled_transient,
    s3_filesystem,
)
from orchestration.common.layout import (
    DONE_FILE,
    PORTABLE_DIR,
    portable_uri,
    require_stage,
    stage_uri,
)
from orchestration.config import Config
from orchestration.stages import task_class


class StageError(RuntimeError):
    """A stage's workers stopped on something the user can fix (data, layout, budget)."""


# worker errors that already say what is wrong and what to do: shown as they are
USER_FACING_WORKER_ERRORS = ("DataLayoutChanged", "DataExhausted", "DataStalled",
                             "BadRecordBudgetExceeded", "StorageError")


@dataclass
class StageResult:
    stage: str
    run_id: str
    portable_uri: str
    final_metrics: dict


def run_stage(config: Config, stage: str, *, parent_run_id: str | None = None,
              log=print, callbacks: list | None = None, tags: dict | None = None,
              **worker_options) -> StageResult:
    """Train one stage as a Ray Train job; returns where its portable weights are.

    `callbacks` go to the Train RunConfig (a Tune sweep forwards metrics with one); `tags`
    are added to the stage's MLflow run when it is created. `worker_options` are the test
    hooks of `WorkerSpec` (fault injection, the sample log).
    """
    from data_pipelines.streaming import bad_record_budget
    from orchestration.common.data_check import check_batch_fits, ensure_dataset
    from orchestration.common.ray_runtime import check_cluster_fits, connect

    task = task_class(stage)(config)
    connect(config)
    check_cluster_fits(config)  # Ray Train would otherwise wait forever for its workers
    manifest = ensure_dataset(config, log=log)
    for upstream in task.requires:
        require_stage(config, upstream, f"{stage} training")
    if task.stage.steps == 0:
        return adopt_weights(config, stage, parent_run_id, tags, log)
    train_samples = task.train_samples(manifest)
    check_batch_fits(config, stage, train_samples)
    budget = (bad_record_budget(config.data.max_skip_fraction)
              if task.dataset_kind == "images" else contextlib.nullcontext())
    with budget as counter:
        datasets = task.datasets(counter)
        refuse_changed_layout(config, stage, datasets["train"].plan)
        task.prepare()
        run_id = _stage_run(config, stage, parent_run_id, tags)
        epoch_samples = _log_epoch_split(config, run_id, datasets["train"].plan,
                                         task.stage.batch_size, train_samples)
        init_from = (resolve_init_from(task.stage.init_from, config, stage)
                     if task.stage.init_from else None)
        from orchestration.train.train_loop import WorkerSpec

        spec = WorkerSpec(config=config, task=type(task), run_id=run_id,
                          train_samples=epoch_samples, train_stream=datasets["train"],
                          init_from=init_from, **worker_options)
        return _fit(spec, {"test": datasets["test"]}, callbacks, log)


def _log_epoch_split(config: Config, run_id: str, plan, batch_size: int,
                     split_samples: int) -> int:
    """Record what an epoch trains on and leaves for the next (the same every epoch while
    every shard reads); returns the samples an epoch trains on, what `epoch` counts in."""
    from orchestration.common.tracking import client_for, log_metrics, set_tags

    trained = plan.samples_per_epoch(batch_size) if plan.shard_samples else split_samples
    client = client_for(config.mlflow.tracking_uri)
    log_metrics(client, run_id, {"data/epoch_samples_trained": trained,
                                 "data/epoch_samples_left": max(0, split_samples - trained)},
                step=0)
    set_tags(client, run_id, {"data.partition": plan.layout()["partition"]})
    return max(1, trained)


def refuse_changed_layout(config: Config, stage: str, plan) -> None:
    """Before any worker starts: a run resumes only where its latest checkpoint's stream
    positions still mean something (the workers check again as they restore)."""
    from data_pipelines.resumable import layout_changed, layout_difference

    stage_dir = resolve(stage_uri(config, stage))
    snapshot = stage_dir.join("checkpoint_manager_snapshot.json")  # Ray Train's own record
    if not snapshot.exists():
        return
    try:
        latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
        record = stage_dir.join(latest["checkpoint_dir_name"], "data_position_rank0.json")
    except (KeyError, TypeError, ValueError):
        return  # a format this version does not know: the workers' check still holds
    if record.exists():
        changed = layout_difference(json.loads(record.read_text())["layout"], plan.layout())
        if changed:
            raise StageError(layout_changed(stage, config.run_name, changed))


def _stage_run(config: Config, stage: str, parent_run_id: str | None, tags: dict | None) -> str:
    """The stage's MLflow run (found again on resume), with config, dataset and lineage."""
    from orchestration.common.tracking import (
        client_for,
        find_or_create_run,
        log_config,
        log_text,
        set_tags,
    )

    run_id = find_or_create_run(
        config, run_key=f"{config.run_name}/{stage}", run_name=f"{config.run_name}-{stage}",
        parent_run_id=parent_run_id, tags={"unclip.stage": stage, **(tags or {})})
    client = client_for(config.mlflow.tracking_uri)
    log_config(client, run_id, config)
    data_uri = config.data.uri
    set_tags(client, run_id, {"dataset.uri": data_uri,
                              "dataset.manifest_hash": manifest_hash(data_uri),
                              "stage.output": portable_uri(config, stage)})
    log_text(client, run_id, resolve(data_uri).join("manifest.json").read_text(),
             "dataset/manifest.json")
    return run_id


WORKER_GROUP_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def _fit(spec, datasets: dict, callbacks: list | None, log) -> StageResult:
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from orchestration.common.tracking import client_for, log_loss_curves
    from orchestration.train.train_loop import train_worker

    config, stage = spec.config, spec.task.name
    scaling, stage_config = config.scaling, config.stage(stage)
    # read by Ray Train's controller, to which the trainer passes this variable on
    os.environ[WORKER_GROUP_START_TIMEOUT_ENV] = f"{scaling.resource_wait_s:g}"
    trainer = TorchTrainer(
        functools.partial(train_worker, spec),
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker={"CPU": scaling.cpus_per_worker},
                                     placement_strategy=scaling.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        run_config=RunConfig(
            name=stage, **_storage(config),
            checkpoint_config=CheckpointConfig(num_to_keep=stage_config.keep_checkpoints,
                                               checkpoint_score_attribute="val_loss",
                                               checkpoint_score_order="min"),
            # a worker group that cannot start within resource_wait_s is a controller error,
            # retried as often as a worker failure, so the run ends instead of waiting forever
            failure_config=FailureConfig(max_failures=scaling.max_failures,
                                         controller_failure_limit=scaling.max_failures),
            callbacks=callbacks),
        datasets=datasets,  # test only: each worker opens its own train stream
        dataset_config=DataConfig(datasets_to_split=[]),
    )
    client = client_for(config.mlflow.tracking_uri)
    start = time.monotonic()
    try:
        result = trainer.fit()
    except BaseException as exc:
        client.set_terminated(spec.run_id, status=ended_status(exc))
        reason = user_facing_reason(exc) or resources_never_came(exc, config)
        if reason:
            raise StageError(f"{stage}: {reason}") from None
        raise
    final = dict(result.metrics or {})
    export_final(config, stage, result.checkpoint, final)
    log_loss_curves(client, spec.run_id)
    client.set_terminated(spec.run_id, status="FINISHED")
    log(f"[{stage}] done in {time.monotonic() - start:.0f}s; weights at "
        f"{portable_uri(config, stage)}; MLflow run {spec.run_id}")
    return StageResult(stage, spec.run_id, portable_uri(config, stage), final)


def resources_never_came(exc: BaseException, config: Config) -> str | None:
    """One line for a run whose workers never got their resources within resource_wait_s."""
    failure = getattr(exc, "controller_failure", None)
    if type(failure).__name__ != "WorkerGroupStartupTimeoutError":
        return None
    import ray

    scaling = config.scaling
    wanted = f"{scaling.cpus_per_worker:g} CPU" + (" + 1 GPU" if scaling.use_gpu else "")
    free = ray.available_resources()
    return (f"waited {scaling.resource_wait_s:g} s for {scaling.num_workers} worker(s) of "
            f"{wanted} ({scaling.placement_strategy}); the cluster has "
            f"{free.get('CPU', 0):g} CPU and {free.get('GPU', 0):g} GPU free on "
            f"{len([n for n in ray.nodes() if n['Alive']])} node(s). Add nodes or free "
            "resources (or lower scaling.num_workers), then rerun to continue from the last "
            "checkpoint; scaling.resource_wait_s sets the wait")


def user_facing_reason(exc: BaseException) -> str | None:
    """The one line our own error gave, when a Ray Train failure or a Ray Data task error
    wraps one of ours (Ray Data keeps only its text: the traceback ends `module.Name: msg`)."""
    pattern = re.compile(rf"(?:^|[\s.])(?:{'|'.join(USER_FACING_WORKER_ERRORS)}): (.+)$",
                         re.MULTILINE)
    for failure in [*getattr(exc, "worker_failures", {}).values(), exc]:
        seen = set()
        while failure is not None and id(failure) not in seen:
            seen.add(id(failure))
            found = pattern.findall(str(failure))  # Ray's wrappers: a traceback's text
            if found:
                return found[-1].strip()
            if any(cls.__name__ in USER_FACING_WORKER_ERRORS for cls in type(failure).__mro__):
                return str(failure).strip()
            failure = (getattr(failure, "cause", None) or failure.__cause__
                       or failure.__context__)
    return None


def ended_status(exc: BaseException) -> str:
    """MLflow's status for a run ended by `exc`: FAILED on an error; KILLED when stopped
    (Ctrl-C, SIGTERM from `unclip jobs stop`, a Tune scheduler ending the trial), which
    arrive as BaseExceptions that are not Exceptions."""
    return "FAILED" if isinstance(exc, Exception) else "KILLED"


def _storage(config: Config) -> dict:
    root = f"{config.storage_root.rstrip('/')}/{config.run_name}"
    if is_s3_uri(root):  # pyarrow filesystem + path without the scheme (Ray's convention)
        return {"storage_path": root[len("s3://"):], "storage_filesystem": s3_filesystem()}
    return {"storage_path": root}


def export_final(config: Config, stage: str, checkpoint, metrics: dict) -> None:
    """Copy the latest checkpoint's portable EMA weights to <stage>/portable. The old DONE
    goes first and the new one is written last, so weights half-way through being replaced
    are never taken for complete."""
    if checkpoint is None:
        raise RuntimeError(f"{stage}: training finished without a checkpoint")
    target = resolve(portable_uri(config, stage))
    target.join(DONE_FILE).delete()
    with tempfile.TemporaryDirectory() as directory:
        retry_misfiled_transient(lambda: checkpoint.to_directory(directory))
        for name in ("config.json", "weights.safetensors"):
            target.join(name).write_bytes((Path(directory) / PORTABLE_DIR / name).read_bytes())
    done = {"step": metrics.get("step"), "val_loss": metrics.get("val_loss"),
            "checkpoint": checkpoint.path, "finished_unix": time.time()}
    target.join(DONE_FILE).write_text(json.dumps(done, indent=2))


def resolve_init_from(init_from: str, config: Config, stage: str) -> str:
    """Fine-tuning source -> portable weights every worker can read.

    Accepts portable weights (a folder or URI holding config.json + weights.safetensors, e.g.
    <storage_root>/<run>/<stage>/portable of an earlier run), a registered model
    (models:/NAME@alias, models:/NAME/VERSION, runs:/ID/path) or a saved pipeline or release
    folder (e.g. release/shapes); of a whole pipeline, its `stage` component is exported first.
    """
    whole_pipeline = init_from.startswith(("models:/", "runs:/"))
    if not whole_pipeline:
        source = resolve(init_from)
        if source.join("config.json").exists():
            if source.join("weights.safetensors").exists():
                return init_from
            whole_pipeline = not source.is_s3  # a saved pipeline or release folder
    if whole_pipeline:
        from models.unclip_pipeline import UnCLIPPipeline
        from orchestration.registry.registry import resolve_model_uri
        from orchestration.train.tasks.base import save_portable

        directory = resolve_model_uri(init_from, tracking_uri=config.mlflow.tracking_uri)
        module = getattr(UnCLIPPipeline.load(directory), stage)
        target = f"{stage_uri(config, stage)}/init"
        save_portable(target, stage, module, task_class(stage)(config).model_config(module))
        return target
    raise StorageError(
        f"{stage}.init_from: no weights at {init_from}; use portable weights (config.json + "
        "weights.safetensors, e.g. <storage_root>/<run_name>/<stage>/portable of an earlier "
        "run), a saved pipeline or release folder, or models:/NAME@alias")


def adopt_weights(config: Config, stage: str, parent_run_id: str | None, tags: dict | None,
                  log) -> StageResult:
    """`steps: 0`: the stage's weights are init_from's as they are (e.g. a release's CLIP, so
    that only its decoder trains on), exported to <stage>/portable and marked complete; the
    marker and the stage's MLflow run say where they came from."""
    source = config.stage(stage).init_from
    run_id = _stage_run(config, stage, parent_run_id,
                        {**(tags or {}), "stage.adopted_from": source})
    portable = resolve(resolve_init_from(source, config, stage))
    target = resolve(portable_uri(config, stage))
    target.join(DONE_FILE).delete()
    for name in ("config.json", "weights.safetensors"):
        target.join(name).write_bytes(portable.join(name).read_bytes())
    done = {"step": 0, "adopted_from": source, "finished_unix": time.time()}
    target.join(DONE_FILE).write_text(json.dumps(done, indent=2))
    from orchestration.common.tracking import client_for

    client_for(config.mlflow.tracking_uri).set_terminated(run_id, status="FINISHED")
    log(f"[{stage}] steps 0: took the weights of {source} untrained; at "
        f"{portable_uri(config, stage)}; MLflow run {run_id}")
    return StageResult(stage, run_id, portable_uri(config, stage), {})
