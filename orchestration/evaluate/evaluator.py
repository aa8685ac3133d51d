"""The reference evaluator: one fixed CLIP per dataset that every evaluation scores with.

Scoring a model with its own freshly trained CLIP puts every version in a different feature
space, so their distances cannot be compared. The evaluator is instead trained once per
dataset (keyed by the manifest hash and its own recipe, bigger and longer-trained than a
demo's CLIP, registered in MLflow as `<registered_model>-evaluator`) or is any portable CLIP
folder the user points to. Its identity (name and weights hash) goes with every number it
produces, and the promotion gate refuses to compare numbers made by different evaluators.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from data_pipelines.shards import manifest_hash
from data_pipelines.storage import StorageError, resolve
from orchestration.common.layout import portable_uri, stage_done
from orchestration.config import Config

AUTO = "auto"
TEXT_BATCH = 512


@dataclass
class Evaluator:
    clip: nn.Module
    context_length: int
    identity: str  # "<source name>@<first 16 hex of the weights' sha256>"
    uri: str

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> np.ndarray:
        """Unit-norm features [N, D] of images [N, 3, H, W] in [-1, 1]."""
        parts = [self.clip.encode_image(chunk.float(), normalize=True)
                 for chunk in images.split(TEXT_BATCH)]
        return torch.cat(parts).numpy()

    @torch.no_grad()
    def text_features(self, captions: list[str]) -> np.ndarray:
        from models.clip_model import tokenize

        parts = []
        for start in range(0, len(captions), TEXT_BATCH):
            tokens = tokenize(captions[start:start + TEXT_BATCH],
                              context_length=self.context_length)
            parts.append(self.clip.encode_text(tokens, normalize=True))
        return torch.cat(parts).numpy()


def load_evaluator(uri: str, *, identity: str | None = None) -> Evaluator:
    """A portable CLIP folder (local or s3://) as an evaluator (`identity` keeps the original's
    name for a copy)."""
    from orchestration.train.tasks.base import load_portable, read_portable_config

    location = resolve(uri)
    if not location.join("weights.safetensors").exists():
        raise StorageError(f"eval.evaluator: no portable CLIP weights at {uri} "
                           "(expected weights.safetensors + config.json, as `unclip train clip`"
                           " writes under <run>/clip/portable); set eval.evaluator.uri=auto "
                           "to train one for this dataset")
    meta = read_portable_config(uri)
    if meta["component"] != "clip":
        raise StorageError(f"eval.evaluator: {uri} holds a {meta['component']}, not a CLIP")
    digest = hashlib.sha256(location.join("weights.safetensors").read_bytes()).hexdigest()
    _, clip = load_portable(uri)
    name = uri.rstrip("/").split("/")[-2 if uri.rstrip("/").endswith("portable") else -1]
    return Evaluator(clip=clip.eval(), context_length=int(clip.context_length),
                     identity=identity or f"{name}@{digest[:16]}", uri=uri)


def evaluator_training_config(config: Config) -> Config:
    """The config that trains this dataset's default evaluator: the dataset and cluster of
    `config`, the evaluator's own CLIP section and seed, a run named after the manifest hash
    and the evaluator's architecture."""
    spec = config.eval.evaluator
    mlflow = config.mlflow.model_copy(
        update={"experiment": f"{config.mlflow.experiment}-evaluator"})
    return config.model_copy(update={"run_name": evaluator_run_name(config), "seed": spec.seed,
                                     "clip": spec.clip, "mlflow": mlflow})


def evaluator_run_name(config: Config) -> str:
    """`evaluator-<manifest hash>-<recipe hash>`. The recipe hash covers what makes a different
    network (preset, overrides, seed), so a changed architecture trains a new evaluator rather
    than resuming an incompatible checkpoint; it leaves out steps and the optimiser, so more
    steps continue the same one."""
    spec = config.eval.evaluator
    recipe = json.dumps({"preset": spec.clip.preset, "overrides": spec.clip.overrides,
                         "seed": spec.seed}, sort_keys=True)
    recipe_key = hashlib.sha256(recipe.encode()).hexdigest()[:8]
    return f"evaluator-{manifest_hash(config.data.uri)[:12]}-{recipe_key}"


def evaluator_uri(config: Config) -> str:
    """Where this config's evaluator is (trained or not yet)."""
    chosen = config.eval.evaluator.uri
    return portable_uri(evaluator_training_config(config), "clip") if chosen == AUTO else chosen


def ensure_evaluator(config: Config, log=print) -> Evaluator:
    """The config's evaluator; the dataset's default one is trained first if missing (once:
    later runs, and every model version, reuse it)."""
    if config.eval.evaluator.uri == AUTO:
        training = evaluator_training_config(config)
        if not stage_done(training, "clip"):
            from orchestration.train.training_job import run_stage

            log(f"[eval] training this dataset's reference evaluator ({training.run_name}, "
                f"clip preset {training.clip.preset}, {training.clip.steps} steps); "
                "it is trained once and reused by every later evaluation")
            result = run_stage(training, "clip", log=log,
                               tags={"unclip.role": "reference-evaluator"})
            register_evaluator(training, result.run_id)
    evaluator = load_evaluator(evaluator_uri(config))
    log(f"[eval] reference evaluator {evaluator.identity}")
    return evaluator


def register_evaluator(training: Config, run_id: str) -> None:
    """Log the evaluator's weights to its training run and register them as their own model."""
    import tempfile

    from pyarrow.fs import LocalFileSystem, copy_files

    from orchestration.common.tracking import client_for

    client = client_for(training.mlflow.tracking_uri)
    location = resolve(portable_uri(training, "clip"))
    with tempfile.TemporaryDirectory() as local:
        copy_files(location.path, local, source_filesystem=location.filesystem,
                   destination_filesystem=LocalFileSystem())
        client.log_artifacts(run_id, local, "evaluator")
    name = f"{training.mlflow.registered_model}-evaluator"
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(
            name, description="Reference CLIP that scores every model of this dataset")
    version = client.create_model_version(name, f"runs:/{run_id}/evaluator", run_id=run_id,
                                          tags={"dataset.manifest_hash":
                                                manifest_hash(training.data.uri)})
    client.set_registered_model_alias(name, "current", version.version)
