"""`unclip pipeline`: data -> CLIP -> embeddings -> prior + decoder -> eval -> registry.

Each stage writes a completion marker last; a rerun skips complete stages and resumes the
interrupted one from its checkpoint (Ray Train restores a run from its storage path and
name). One MLflow parent run per pipeline run name, with a child run per training stage.
"""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray

from data_pipelines.shards import manifest_hash
from data_pipelines.storage import resolve
from orchestration.config import Config
from orchestration.data_check import ensure_dataset
from orchestration.embed_job import clip_marker, run_embed
from orchestration.evaluation import assemble_pipeline, evaluate_pipeline
from orchestration.layout import DONE_FILE, stage_done, stage_uri
from orchestration.ray_runtime import connect
from orchestration.stages import STAGES, task_class
from orchestration.tracking import (
    client_for,
    find_or_create_run,
    log_config,
    log_metrics,
    log_png,
    set_tags,
)
from orchestration.training_job import run_stage


def training_waves(stages: tuple[str, ...] = STAGES) -> list[list[str]]:
    """The training stages in waves: each wave's `requires` are met by earlier waves, so a
    wave's stages may run concurrently (the prior and the decoder both need only CLIP)."""
    waves, placed, remaining = [], set(), list(stages)
    while remaining:
        wave = [s for s in remaining if set(task_class(s).requires) <= placed]
        if not wave:
            raise ValueError(f"stages {remaining} require each other or an unknown stage")
        waves.append(wave)
        placed.update(wave)
        remaining = [s for s in remaining if s not in wave]
    return waves


def pipeline_plan() -> list[list[str]]:
    """Groups of steps in order: data, the training waves with `embed` just before the first
    wave that trains on embeddings, then eval and register."""
    plan: list[list[str]] = [["data"]]
    for wave in training_waves():
        if "embed" not in sum(plan, []) and any(
                task_class(s).dataset_kind == "embeddings" for s in wave):
            plan.append(["embed"])
        plan.append(wave)
    return plan + [["eval"], ["register"]]


def step_order() -> list[str]:
    return sum(pipeline_plan(), [])


def outputs_dir(config: Config) -> Path:
    """Local folder for things people open: grids, metrics, the saved pipeline."""
    return Path("outputs").absolute() / config.run_name


def _embed_done(config: Config) -> bool:
    """Embeddings exist and were made by the CLIP weights that are there now."""
    location = resolve(config.data.resolved_embeddings_uri).join("manifest.json")
    if not location.exists():
        return False
    made_with = json.loads(location.read_text()).get("clip_marker")
    return made_with == clip_marker(config)


def trained_marker(config: Config) -> str:
    """The three stages' completion records: changes whenever any component is retrained."""
    parts = []
    for stage in STAGES:
        done = resolve(stage_uri(config, stage)).join("portable", DONE_FILE)
        parts.append(done.read_text() if done.exists() else "")
    return json.dumps(parts)


def _marker_matches(path: Path, marker: str) -> bool:
    return path.exists() and json.loads(path.read_text()).get("marker") == marker


def selected_stages(only: list[str] | None, from_stage: str | None) -> list[str]:
    order = step_order()
    for name in (only or []) + ([from_stage] if from_stage else []):
        if name not in order:
            raise ValueError(f"unknown stage {name!r}; stages are {', '.join(order)}")
    if only:
        return [s for s in order if s in only]
    if from_stage:
        return order[order.index(from_stage):]
    return order


def run_pipeline(config: Config, *, only: list[str] | None = None,
                 from_stage: str | None = None, log=print) -> dict:
    stages = selected_stages(only, from_stage)
    forced = set(only or []) | ({from_stage} if from_stage else set())
    start = time.monotonic()
    connect(config)
    parent = find_or_create_run(config, run_key=f"{config.run_name}/pipeline",
                                run_name=f"{config.run_name}-pipeline",
                                tags={"unclip.stage": "pipeline"})
    client = client_for(config.mlflow.tracking_uri)
    log_config(client, parent, config)
    summary: dict = {"parent_run_id": parent, "stages": {}}

    def train(stage: str) -> None:
        if stage_done(config, stage) and stage not in forced:
            log(f"[pipeline] {stage}: complete, skipping")
            summary["stages"][stage] = "skipped (complete)"
            return
        result = run_stage(config, stage, parent_run_id=parent, log=log)
        summary["stages"][stage] = result.run_id

    if "data" in stages:
        manifest = ensure_dataset(config, log=log)
        set_tags(client, parent, {"dataset.uri": config.data.uri,
                                  "dataset.manifest_hash": manifest_hash(config.data.uri)})
        summary["stages"]["data"] = {k: v.num_samples for k, v in manifest.splits.items()}
    for group in pipeline_plan()[1:-2]:  # between data and eval
        if group == ["embed"] and "embed" in stages:
            if _embed_done(config) and "embed" not in forced:
                log("[pipeline] embed: complete, skipping")
            else:
                run_embed(config, log=log)
            summary["stages"]["embed"] = config.data.resolved_embeddings_uri
            continue
        wave = [s for s in group if s in stages and s != "embed"]
        if len(wave) > 1 and _room_for(config, len(wave)):
            log(f"[pipeline] {' and '.join(wave)} run concurrently")
            with ThreadPoolExecutor(len(wave)) as pool:
                list(pool.map(train, wave))
        else:
            for stage in wave:
                train(stage)
    out = outputs_dir(config)
    metrics: dict = {}
    marker = trained_marker(config)
    if "eval" in stages and _marker_matches(out / "eval_done.json", marker) and (
            "eval" not in forced):
        log("[pipeline] eval: complete for these weights, skipping")
        metrics = json.loads((out / "metrics.json").read_text())
        summary["grid"] = str(out / "samples.png")
    elif "eval" in stages:
        pipeline = assemble_pipeline(config)
        metrics = evaluate_pipeline(config, pipeline, out, log=log)
        log_metrics(client, parent, {f"eval/{k}": v for k, v in metrics.items()}, step=0)
        from PIL import Image

        for name in ("samples.png", "eval_real_vs_generated.png"):
            log_png(client, parent, Image.open(out / name), f"eval/{name}")
        saved = out / "pipeline"
        shutil.rmtree(saved, ignore_errors=True)
        pipeline.save(saved)
        summary["grid"] = str(out / "samples.png")
        (out / "eval_done.json").write_text(json.dumps({"marker": marker}))
    if "register" in stages and _marker_matches(out / "registered.json", marker) and (
            "register" not in forced):
        registered = json.loads((out / "registered.json").read_text())
        log(f"[pipeline] register: version {registered['version']} already holds these "
            "weights, skipping")
        summary["registry"] = registered
    elif "register" in stages:
        summary["registry"] = _register(config, parent, out, metrics, log)
        (out / "registered.json").write_text(json.dumps({**summary["registry"],
                                                         "marker": marker}))
    client.set_terminated(parent, status="FINISHED")
    summary["seconds"] = round(time.monotonic() - start, 1)
    (out / "pipeline_summary.json").parent.mkdir(parents=True, exist_ok=True)
    (out / "pipeline_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _room_for(config: Config, stages: int) -> bool:
    needed = stages * config.scaling.num_workers * config.scaling.cpus_per_worker
    return ray.cluster_resources().get("CPU", 0) >= needed + 2  # + room for Ray Data


def _register(config: Config, parent: str, out: Path, metrics: dict, log) -> dict:
    from orchestration.registry import maybe_promote, register_pipeline

    if not metrics:
        metrics_file = out / "metrics.json"
        if not metrics_file.exists():
            raise FileNotFoundError(f"no evaluation at {metrics_file}; run the eval stage first")
        metrics = json.loads(metrics_file.read_text())
    client = client_for(config.mlflow.tracking_uri)
    components = {stage: client.search_runs(
        [client.get_run(parent).info.experiment_id],
        filter_string=f"tags.`unclip.run_key` = '{config.run_name}/{stage}'",
        max_results=1)[0].info.run_id for stage in STAGES}
    version = register_pipeline(
        str(out / "pipeline"), tracking_uri=config.mlflow.tracking_uri,
        model_name=config.mlflow.registered_model,
        metrics={f"eval/{k}": v for k, v in metrics.items()}, component_runs=components,
        dataset_uri=config.data.uri, manifest_hash=manifest_hash(config.data.uri),
        parent_run_id=parent)
    promoted, reason = maybe_promote(client, config.mlflow.registered_model, version,
                                     metric=config.mlflow.promote_metric,
                                     direction=config.mlflow.promote_direction)
    log(f"[register] {config.mlflow.registered_model} version {version}: candidate; "
        f"{'champion' if promoted else 'not promoted'} ({reason})")
    return {"model": config.mlflow.registered_model, "version": version, "champion": promoted,
            "reason": reason}
