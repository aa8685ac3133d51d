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
from orchestration.ray_runtime import connect
from orchestration.tracking import (
    client_for,
    find_or_create_run,
    log_config,
    log_metrics,
    log_png,
    set_tags,
)
from orchestration.training_job import DONE_FILE, run_stage, stage_done, stage_uri

STAGE_ORDER = ("data", "clip", "embed", "prior", "decoder", "eval", "register")


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
    for stage in ("clip", "prior", "decoder"):
        done = resolve(stage_uri(config, stage)).join("portable", DONE_FILE)
        parts.append(done.read_text() if done.exists() else "")
    return json.dumps(parts)


def _marker_matches(path: Path, marker: str) -> bool:
    return path.exists() and json.loads(path.read_text()).get("marker") == marker


def selected_stages(only: list[str] | None, from_stage: str | None) -> list[str]:
    for name in (only or []) + ([from_stage] if from_stage else []):
        if name not in STAGE_ORDER:
            raise ValueError(f"unknown stage {name!r}; stages are {', '.join(STAGE_ORDER)}")
    if only:
        return [s for s in STAGE_ORDER if s in only]
    if from_stage:
        return list(STAGE_ORDER[STAGE_ORDER.index(from_stage):])
    return list(STAGE_ORDER)


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
    if "clip" in stages:
        train("clip")
    if "embed" in stages:
        if _embed_done(config) and "embed" not in forced:
            log("[pipeline] embed: complete, skipping")
        else:
            run_embed(config, log=log)
        summary["stages"]["embed"] = config.data.resolved_embeddings_uri
    both = [s for s in ("prior", "decoder") if s in stages]
    if len(both) == 2 and _room_for_both(config):
        log("[pipeline] prior and decoder run concurrently")
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(train, both))
    else:
        for stage in both:
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


def _room_for_both(config: Config) -> bool:
    needed = 2 * config.scaling.num_workers * config.scaling.cpus_per_worker
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
        max_results=1)[0].info.run_id for stage in ("clip", "prior", "decoder")}
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
