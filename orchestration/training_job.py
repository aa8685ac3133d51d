"""Driver side of a training stage: datasets, MLflow run, TorchTrainer, portable export.

Outputs follow one layout under `storage_root` (local folder or S3), so later stages, the
pipeline and other nodes find them without being told:
    <storage_root>/<run_name>/<stage>/checkpoint_*/   Ray Train checkpoints (DeepSpeed shards)
    <storage_root>/<run_name>/<stage>/portable/       EMA fp32 weights + config (the export)
Rerunning with the same run name resumes from the latest checkpoint (Ray Train V2 restores a
run from its storage path and name); the MLflow run is found again by its run key.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.data
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from data_pipelines.shards import manifest_hash
from data_pipelines.storage import StorageError, is_s3_uri, resolve, s3_filesystem
from data_pipelines.streaming import bad_record_budget, image_caption_dataset
from orchestration.config import Config
from orchestration.data_check import ensure_dataset
from orchestration.ray_runtime import connect
from orchestration.tracking import (
    client_for,
    find_or_create_run,
    log_config,
    log_loss_curves,
    log_text,
    set_tags,
)
from orchestration.train_loop import PORTABLE_DIR, train_worker

STAGES = ("clip", "prior", "decoder")
DONE_FILE = "DONE.json"


@dataclass
class StageResult:
    stage: str
    run_id: str
    portable_uri: str
    final_metrics: dict


def stage_uri(config: Config, stage: str) -> str:
    return f"{config.storage_root.rstrip('/')}/{config.run_name}/{stage}"


def portable_uri(config: Config, stage: str) -> str:
    return f"{stage_uri(config, stage)}/{PORTABLE_DIR}"


def stage_done(config: Config, stage: str) -> bool:
    return resolve(portable_uri(config, stage)).join(DONE_FILE).exists()


def _require_stage(config: Config, stage: str, needed_by: str) -> str:
    uri = portable_uri(config, stage)
    if not stage_done(config, stage):
        raise StorageError(
            f"{needed_by} needs trained {stage} weights at {uri}; run `unclip train {stage}` "
            f"with the same run_name ({config.run_name}) first")
    return uri


def _epochs(samples: int, config: Config, stage: str) -> int:
    spec = config.stage(stage)
    per_step = spec.batch_size * spec.grad_accum * config.scaling.num_workers
    # +1: drop_last and uneven streaming_split leave each worker a little short per epoch
    return math.ceil(spec.steps * per_step / samples) + 1


REORDER_BLOCKS = 64


def _image_datasets(config: Config, stage: str, train_samples: int, counter) -> dict:
    pre, uri = config.data.preprocess, config.data.uri
    columns = ["image", "tokens", "caption"] if stage == "clip" else ["image", "tokens"]

    def epoch(e: int) -> ray.data.Dataset:
        return image_caption_dataset(uri, "train", pre, train=True, seed=config.seed, epoch=e,
                                     shuffle_files=True, counter=counter).select_columns(columns)

    num_epochs = _epochs(train_samples, config, stage)
    if config.data.materialize_train:
        train = _reordered_epochs(epoch(0), num_epochs, config.seed)
    else:
        train = _concat([epoch(e) for e in range(num_epochs)])
    test = image_caption_dataset(uri, "test", pre, train=False, seed=config.seed,
                                 counter=counter)
    return {"train": train, "test": test.select_columns(["image", "tokens", "caption"])}


def _reordered_epochs(base: ray.data.Dataset, num_epochs: int, seed: int) -> ray.data.Dataset:
    """A materialized split repeated `num_epochs` times, each in its own seeded block order
    (the worker's local shuffle buffer mixes within blocks). Split into REORDER_BLOCKS blocks
    first: a small split is often one or two blocks, whose order barely changes."""
    base = base.repartition(REORDER_BLOCKS).materialize()
    return _concat([base.randomize_block_order(seed=seed + e) for e in range(num_epochs)])


def _concat(parts: list[ray.data.Dataset]) -> ray.data.Dataset:
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def embedding_split_dataset(config: Config, split: str) -> ray.data.Dataset:
    root = resolve(config.data.resolved_embeddings_uri).join(split)
    files = [p for p in root.list_files() if p.endswith(".parquet")]
    if not files:
        raise StorageError(f"no embedding shards at {root.uri}; run `unclip embed` first")
    return ray.data.read_parquet(files, filesystem=root.filesystem)


def _embedding_datasets(config: Config, train_samples: int) -> dict:
    # embeddings are small: read once, then a seeded block order per epoch (plus the
    # worker's local shuffle buffer) instead of a full all-to-all shuffle every epoch
    base = embedding_split_dataset(config, "train")
    return {"train": _reordered_epochs(base, _epochs(train_samples, config, "prior"), config.seed),
            "test": embedding_split_dataset(config, "test")}


def _storage(config: Config, stage: str) -> dict:
    root = f"{config.storage_root.rstrip('/')}/{config.run_name}"
    if is_s3_uri(root):  # pyarrow filesystem + path without the scheme (Ray's convention)
        return {"storage_path": root[len("s3://"):], "storage_filesystem": s3_filesystem()}
    return {"storage_path": root}


def run_stage(config: Config, stage: str, *, parent_run_id: str | None = None,
              log=print, fail_at_step: int | None = None, callbacks: list | None = None,
              tags: dict | None = None) -> StageResult:
    """Train one stage as a Ray Train job; returns where its portable weights are.

    `callbacks` go to the Train RunConfig (a Tune sweep forwards metrics with one); `tags`
    are added to the stage's MLflow run when it is created.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    connect(config)
    manifest = ensure_dataset(config, log=log)
    budget = (contextlib.nullcontext() if stage == "prior"  # embeddings: no image decoding
              else bad_record_budget(config.data.max_skip_fraction))
    with budget as counter:
        return _train_stage(config, stage, manifest, counter, parent_run_id=parent_run_id,
                            log=log, fail_at_step=fail_at_step, callbacks=callbacks, tags=tags)


def _train_stage(config: Config, stage: str, manifest, counter, *, parent_run_id, log,
                 fail_at_step, callbacks, tags) -> StageResult:
    spec = config.stage(stage)
    data_uri = config.data.uri
    task_kwargs: dict = {}
    if stage == "prior":
        task_kwargs["clip_dir"] = _require_stage(config, "clip", "prior training")
        embed_manifest = read_manifest_json(config.data.resolved_embeddings_uri)
        train_samples = embed_manifest["splits"]["train"]["num_samples"]
        datasets = _embedding_datasets(config, train_samples)
        sample = embedding_split_dataset(config, "train").limit(2048).take_batch(2048)
        task_kwargs["norm_sample"] = [list(map(float, row)) for row in sample["image_emb"]]
    else:
        if stage == "decoder":
            task_kwargs["clip_dir"] = _require_stage(config, "clip", "decoder training")
        train_samples = manifest.splits["train"].num_samples
        datasets = _image_datasets(config, stage, train_samples, counter)

    run_id = find_or_create_run(
        config, run_key=f"{config.run_name}/{stage}", run_name=f"{config.run_name}-{stage}",
        parent_run_id=parent_run_id, tags={"unclip.stage": stage, **(tags or {})})
    client = client_for(config.mlflow.tracking_uri)
    log_config(client, run_id, config)
    set_tags(client, run_id, {"dataset.uri": data_uri,
                              "dataset.manifest_hash": manifest_hash(data_uri),
                              "stage.output": portable_uri(config, stage)})
    log_text(client, run_id, resolve(data_uri).join("manifest.json").read_text(),
             "dataset/manifest.json")
    init_from_dir = resolve_init_from(spec.init_from, config, stage) if spec.init_from else None

    scaling = config.scaling
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": config.model_dump(mode="json"), "stage": stage,
                           "run_id": run_id, "task_kwargs": task_kwargs,
                           "train_samples": train_samples, "init_from_dir": init_from_dir,
                           "fail_at_step": fail_at_step},
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker={"CPU": scaling.cpus_per_worker},
                                     placement_strategy=scaling.placement_strategy),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        run_config=RunConfig(
            name=stage, **_storage(config, stage),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.keep_checkpoints,
                                               checkpoint_score_attribute="val_loss",
                                               checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=scaling.max_failures),
            callbacks=callbacks),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    start = time.monotonic()
    try:
        result = trainer.fit()
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    final = dict(result.metrics or {})
    export_final(config, stage, result.checkpoint, final)
    log_loss_curves(client, run_id)
    client.set_terminated(run_id, status="FINISHED")
    log(f"[{stage}] done in {time.monotonic() - start:.0f}s; weights at "
        f"{portable_uri(config, stage)}; MLflow run {run_id}")
    return StageResult(stage, run_id, portable_uri(config, stage), final)


def read_manifest_json(uri: str) -> dict:
    location = resolve(uri).join("manifest.json")
    if not location.exists():
        raise StorageError(f"no embeddings at {uri}; run `unclip embed` first")
    return json.loads(location.read_text())


def export_final(config: Config, stage: str, checkpoint, metrics: dict) -> None:
    """Copy the latest checkpoint's portable EMA weights to <stage>/portable, DONE last."""
    if checkpoint is None:
        raise RuntimeError(f"{stage}: training finished without a checkpoint")
    target = resolve(portable_uri(config, stage))
    with checkpoint.as_directory() as directory:
        for name in ("config.json", "weights.safetensors"):
            target.join(name).write_bytes((Path(directory) / PORTABLE_DIR / name).read_bytes())
    done = {"step": metrics.get("step"), "val_loss": metrics.get("val_loss"),
            "checkpoint": checkpoint.path, "finished_unix": time.time()}
    target.join(DONE_FILE).write_text(json.dumps(done, indent=2))


def resolve_init_from(init_from: str, config: Config, stage: str) -> str:
    """Fine-tuning source -> portable weights every worker can read.

    Accepts portable weights (a folder or URI holding config.json + weights.safetensors, e.g.
    <storage_root>/<run>/<stage>/portable of an earlier run) or a registered model
    (models:/NAME@alias, models:/NAME/VERSION), whose `stage` component is exported first.
    """
    if init_from.startswith(("models:/", "runs:/")):
        from models.unclip_pipeline import UnCLIPPipeline
        from orchestration.registry import resolve_model_uri
        from orchestration.tasks import save_portable

        directory = resolve_model_uri(init_from, tracking_uri=config.mlflow.tracking_uri)
        module = getattr(UnCLIPPipeline.load(directory), stage)
        module_config = module.unclip_model_cfg if stage == "clip" else module.config
        target = f"{stage_uri(config, stage)}/init"
        save_portable(target, stage, module, module_config)
        return target
    if resolve(init_from).join("config.json").exists():
        return init_from
    raise StorageError(
        f"{stage}.init_from: no portable weights (config.json + weights.safetensors) at "
        f"{init_from}; use <storage_root>/<run_name>/<stage>/portable of an earlier run or "
        "models:/NAME@alias")
