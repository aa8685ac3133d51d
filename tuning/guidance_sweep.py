"""Guidance-scale sweep as a Ray Tune experiment, scored by the dataset's reference evaluator.

Each (decoder scale, prior scale) pair is one Tune trial: a grid search by default, or an
Optuna search over a continuous range (`search="optuna"`). A trial generates images for the
same held-out captions with the same seed, scores them with the evaluator the pipeline's
eval stage uses, and reports the metrics with the images in its checkpoint. The objective
picks the best pair from Tune's results, which is logged to MLflow and, for a registered
model, set as version tags (`best_decoder_guidance`, `best_prior_guidance`) that loaders
can default to.
"""

from __future__ import annotations

import dataclasses
import io
import json
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from ray import tune

from data_pipelines.storage import resolve
from models.unclip_pipeline import UnCLIPPipeline, images_to_grid
from orchestration.common.data_check import ensure_dataset
from orchestration.common.ray_runtime import connect
from orchestration.common.threads import set_torch_threads
from orchestration.common.tracking import (
    experiment_id,
    log_metrics,
    log_png,
    log_text,
    set_tags,
)
from orchestration.config import Config, ConfigError
from orchestration.evaluate.evaluation import CaptionScorer, held_out_rows, score_images
from orchestration.evaluate.evaluator import Evaluator, ensure_evaluator, load_evaluator
from orchestration.registry.registry import TUNED_SAMPLING_TAGS, model_version, resolve_model_uri
from tuning.guidance_space import SearchSpace, search_space
from tuning.objective import METRICS, parse_objective
from tuning.report import guidance_plot, trial_table_csv, trial_table_markdown

BEST_DECODER_TAG, BEST_PRIOR_TAG = TUNED_SAMPLING_TAGS  # the registry applies them on load
SWEEP_RUN_TAG = "guidance_sweep.run_id"
GRID_CAPTIONS = 8  # images per scale in the side-by-side grid
IMAGES_FILE = "images.npy"


def pipeline_files(directory: Path) -> dict[str, bytes]:
    """The saved pipeline as bytes, so tasks on any node can load it from the object store."""
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in directory.rglob("*") if p.is_file()}


def load_from_files(files: dict[str, bytes]) -> UnCLIPPipeline:
    with tempfile.TemporaryDirectory(prefix="unclip-guidance-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / name).write_bytes(data)
        return UnCLIPPipeline.load(tmp)


EVALUATOR_FILES = ("weights.safetensors", "config.json")


def evaluator_files(evaluator: Evaluator) -> dict[str, bytes]:
    return {name: resolve(evaluator.uri).join(name).read_bytes() for name in EVALUATOR_FILES}


def guidance_trial(params: dict, *, files: dict[str, bytes], scorer_files: dict[str, bytes],
                   evaluator_identity: str, captions: list[str], real_feats: np.ndarray,
                   images_per_caption: int, config: Config, sampler: str | None,
                   steps: int | None) -> None:
    """One Tune trial: generate at one pair of scales, score with the reference evaluator,
    report metrics; the uint8 images [len(captions) * images_per_caption, H, W, 3] go in the
    trial's checkpoint."""
    set_torch_threads()  # the trial's CPUs: no oversubscription between trials
    pipeline = load_from_files(files)
    images = pipeline.generate(captions, num_images_per_prompt=images_per_caption,
                               seed=config.seed, prior_guidance=params["prior_guidance"],
                               decoder_guidance=params["decoder_guidance"],
                               sampler=sampler, steps=steps).numpy()
    with tempfile.TemporaryDirectory(prefix="unclip-evaluator-") as tmp:
        for name, data in scorer_files.items():
            (Path(tmp) / name).write_bytes(data)
        evaluator = load_evaluator(tmp, identity=evaluator_identity)
    fake = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    metrics, _ = score_images(
        CaptionScorer(evaluator), real_feats=real_feats, real_captions=captions,
        fake_feats=evaluator.image_features(fake), captions=captions,
        images_per_caption=images_per_caption, config=config)
    with tempfile.TemporaryDirectory() as directory:
        np.save(Path(directory) / IMAGES_FILE, images)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))


def _grid(real: np.ndarray, per_scale: list[np.ndarray]) -> bytes:
    """Row 0: held-out images; then one row per scale (same captions, same seed)."""
    rows = [torch.from_numpy(np.array(real))] + [torch.from_numpy(np.array(images))
                                                 for images in per_scale]
    image = images_to_grid(torch.cat(rows), nrow=len(real))
    side = image.size[1] // len(rows)
    scale = max(1, 64 // max(side, 1))
    buffer = io.BytesIO()
    image.resize((image.size[0] * scale, image.size[1] * scale), 0).save(buffer, format="PNG")
    return buffer.getvalue()


def run_guidance_sweep(model_uri: str, *, config: Config, decoder_scales: list[float],
                       prior_scales: list[float] | None = None, num_samples: int | None = None,
                       sampler: str | None = None, steps: int | None = None,
                       objective: str = "fd_clip:min", search: str = "grid",
                       num_trials: int = 8, log=print) -> dict:
    """Generate, score and compare (decoder, prior) scale pairs; tag the best.

    `search="grid"` tries every pair of the given scales; `search="optuna"` samples
    `num_trials` pairs from the range [min, max] of each list with Optuna's TPE sampler."""
    goal = parse_objective(objective)
    count = num_samples or config.eval.num_captions
    _check_sweep_arguments(decoder_scales, search, count)
    space = search_space(search, decoder_scales, prior_scales, goal, num_trials)
    start = time.monotonic()
    connect(config)
    ensure_dataset(config, log=log)
    evaluator = ensure_evaluator(config, log=log)
    directory = resolve_model_uri(model_uri, tracking_uri=config.mlflow.tracking_uri)
    pipeline = UnCLIPPipeline.load(directory)
    priors = prior_scales or [pipeline.sampling.prior_guidance]
    per_caption = config.eval.images_per_caption

    rows = held_out_rows(config, count)
    captions = [str(c) for c in rows["caption"]]
    real_feats = evaluator.image_features(torch.tensor(np.array(rows["image"])))
    log(f"[guidance] {space.describe(priors)} x {len(captions) * per_caption} images "
        f"({model_uri}), one Ray Tune trial each, scored by {evaluator.identity}")
    trainable = tune.with_parameters(
        guidance_trial, files=pipeline_files(directory), scorer_files=evaluator_files(evaluator),
        evaluator_identity=evaluator.identity, captions=captions, real_feats=real_feats,
        images_per_caption=per_caption, config=config, sampler=sampler, steps=steps)
    results, generated = _run_trials(config, trainable, space.param_space(priors), space)
    _log_trials(results, log)
    best_index, satisfied = goal.pick(results)
    best = results[best_index]

    sweep_id = f"{config.run_name}-guidance-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(config.mlflow.tracking_uri, registry_uri=config.mlflow.tracking_uri)
    run_id = _log_sweep(client, config, sweep_id, model_uri, results, best_index, goal,
                        satisfied, generated, rows["image"], per_caption,
                        {"sampler": sampler or pipeline.sampling.sampler,
                         "steps": steps or pipeline.sampling.steps, "num_samples": count,
                         "search": search, "evaluator": evaluator.identity})
    version = _tag_best(client, model_uri, best, run_id=run_id, goal=goal,
                        tag_prior=bool(prior_scales), log=log)
    _log_choice(best, goal, satisfied, f"{time.monotonic() - start:.0f}s", run_id, log)
    return {"sweep_id": sweep_id, "run_id": run_id, "objective": str(goal),
            "objective_satisfied": satisfied, "results": results, "best": best,
            "model_version": _version_dict(version),
            "sampling": dataclasses.asdict(pipeline.sampling)}


def _log_choice(best: dict, goal, satisfied: bool, took: str, run_id: str, log) -> None:
    if not satisfied:
        log(f"[guidance] no scale meets {goal}; chose the closest")
    log(f"[guidance] best: decoder {best['decoder_guidance']:g} prior "
        f"{best['prior_guidance']:g} by {goal} in {took} (MLflow run {run_id})")


def _version_dict(version: tuple[str, str] | None) -> dict | None:
    return {"name": version[0], "version": version[1]} if version else None


def _log_trials(results: list[dict], log) -> None:
    for row in results:
        log(f"[guidance] decoder {row['decoder_guidance']:g} prior "
            f"{row['prior_guidance']:g}: " + " ".join(
                f"{k}={row[k]:.4g}" for k in METRICS if k in row))


def _check_sweep_arguments(decoder_scales: list[float], search: str, count: int) -> None:
    if not decoder_scales:
        raise ConfigError("--decoder-scales: give at least one scale, e.g. 1,1.5,2,2.5,3")
    if search not in ("grid", "optuna"):
        raise ConfigError(f"--search {search!r}: use grid or optuna")
    if count < 4:
        raise ConfigError(f"--samples {count}: precision/recall need at least 4 images")


def _tag_best(client: MlflowClient, model_uri: str, best: dict, *, run_id: str, goal,
              tag_prior: bool, log) -> tuple[str, str] | None:
    """Tag the registered version the sweep ran on with its best scales (serving reads
    them); a folder or run URI is no version and gets nothing."""
    version = model_version(client, model_uri)
    if not version:
        log(f"[guidance] {model_uri} is not a registered model version; nothing tagged")
        return None
    tags = {BEST_DECODER_TAG: repr(best["decoder_guidance"]), SWEEP_RUN_TAG: run_id,
            "guidance_sweep.objective": str(goal)}
    if tag_prior:
        tags[BEST_PRIOR_TAG] = repr(best["prior_guidance"])
    for key, value in tags.items():
        client.set_model_version_tag(version[0], version[1], key, value)
    log(f"[guidance] tagged {version[0]} v{version[1]} with {json.dumps(tags)}")
    return version


def _run_trials(config: Config, trainable, param_space: dict,
                space: SearchSpace) -> tuple[list[dict], list[np.ndarray]]:
    """The Tune experiment; (rows, images), ordered by (prior, decoder) scale whatever order
    the trials finished in."""
    from tuning.lr_sweep import _tune_storage

    options = {"tune_config": space.tune_config()} if space.search != "grid" else {}
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}), param_space=param_space,
        run_config=tune.RunConfig(name=f"{config.run_name}-guidance-{uuid.uuid4().hex[:8]}",
                                  verbose=0, **_tune_storage(config)), **options)
    grid = tuner.fit()
    failed = [result.error for result in grid if result.error is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} guidance trial(s) failed; first: {failed[0]}")
    ordered = sorted(grid, key=lambda r: (r.config["prior_guidance"],
                                          r.config["decoder_guidance"]))
    rows, images = [], []
    for result in ordered:
        rows.append({"decoder_guidance": result.config["decoder_guidance"],
                     "prior_guidance": result.config["prior_guidance"],
                     **{key: result.metrics[key] for key in METRICS if key in result.metrics}})
        with result.checkpoint.as_directory() as directory:
            images.append(np.load(Path(directory) / IMAGES_FILE))
    return rows, images


def _log_sweep(client, config: Config, sweep_id: str, model_uri: str, results: list[dict],
               best_index: int, goal, satisfied: bool, generated: list[np.ndarray],
               real_images: np.ndarray, per_caption: int, settings: dict) -> str:
    """One parent run (table, plot, grid, best) and one nested run per scale pair."""
    exp = experiment_id(client, config.mlflow.experiment)
    parent = client.create_run(exp, run_name=f"{config.run_name}-guidance-sweep", tags={
        "unclip.sweep": "guidance", "unclip.sweep_id": sweep_id, "unclip.model_uri": model_uri,
    }).info.run_id
    for key, value in {**settings, "objective": str(goal), "seed": config.seed}.items():
        client.log_param(parent, key, str(value))
    for index, row in enumerate(results):
        child = client.create_run(exp, run_name=f"guidance-d{row['decoder_guidance']:g}"
                                                f"-p{row['prior_guidance']:g}",
                                  tags={"mlflow.parentRunId": parent,
                                        "unclip.sweep_id": sweep_id}).info.run_id
        client.log_param(child, "decoder_guidance", row["decoder_guidance"])
        client.log_param(child, "prior_guidance", row["prior_guidance"])
        log_metrics(client, child, {k: row[k] for k in METRICS if k in row}, step=0)
        log_metrics(client, parent, {k: row[k] for k in METRICS if k in row}, step=index)
        client.set_terminated(child)
    best = results[best_index]
    log_metrics(client, parent, {f"best/{k}": best[k] for k in METRICS if k in best}, step=0)
    set_tags(client, parent, {BEST_DECODER_TAG: best["decoder_guidance"],
                              BEST_PRIOR_TAG: best["prior_guidance"],
                              "objective_satisfied": satisfied})
    log_text(client, parent, trial_table_csv(results), "guidance/scales.csv")
    log_text(client, parent, trial_table_markdown(results), "guidance/scales.md")
    log_png(client, parent, guidance_plot(results, [k for k in METRICS if k in best],
                                          best_index),
            "guidance/metrics_vs_scale.png")
    shown = min(GRID_CAPTIONS, len(real_images))
    real = ((torch.from_numpy(np.array(real_images[:shown])) + 1) * 127.5).round().byte()
    per_scale = [images[: shown * per_caption: per_caption] for images in generated]
    log_png(client, parent, Image.open(io.BytesIO(_grid(real.permute(0, 2, 3, 1).numpy(),
                                                        per_scale))),
            "guidance/samples_by_scale.png")
    for row, images in zip(results, per_scale, strict=True):
        grid = images_to_grid(torch.from_numpy(images), nrow=shown)
        log_png(client, parent, grid, f"guidance/samples/decoder_{row['decoder_guidance']:g}"
                                      f"_prior_{row['prior_guidance']:g}.png")
    client.set_terminated(parent)
    return parent
