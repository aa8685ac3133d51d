"""The MLflow Model Registry side: register a pipeline, gate promotion, resolve model URIs.

A version is a pyfunc (orchestration/registry/pyfunc_model.py) whose artifacts are the saved
pipeline directory plus a copy of the `models` package, so it loads where only the model exists.
Lineage (component runs, dataset and manifest hash) and evaluation metrics are version tags,
because the promotion gate and `unclip models list` read them without touching the runs.
MLflow 3 aliases replace stages: new versions get `candidate`, the gate moves `champion`.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
import warnings
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from importlib.util import find_spec
from pathlib import Path

import mlflow
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from data_pipelines.storage import has_credentials
from orchestration.registry import pyfunc_model

CANDIDATE, CHAMPION = "candidate", "champion"
MODEL_NAME_IN_RUN = "unclip-pipeline"
METRIC_TAG_PREFIX = "metric."
COMPONENT_RUN_TAG = "lineage.{}_run_id"  # clip / prior / decoder
DATASET_URI_TAG = "lineage.dataset_uri"
MANIFEST_HASH_TAG = "lineage.manifest_hash"
SOURCE_RUN_TAG = "lineage.source_run_id"
WEIGHTS_TAG = "lineage.weights_marker"  # which trained weights a version holds
PROMOTION_TAG = "promotion"
# Set by `unclip tune guidance`; loaders of that version default to these sampling values.
TUNED_SAMPLING_TAGS = {"best_decoder_guidance": "decoder_guidance",
                       "best_prior_guidance": "prior_guidance"}
MODEL_URI_RE = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w.-]+))$")
# What the pyfunc needs at serving time, pinned to what trained and tested it here.
RUNTIME_DISTRIBUTIONS = ("torch", "torchvision", "open_clip_torch", "pillow", "numpy", "scipy",
                         "safetensors", "pandas")


class RegistryError(ValueError):
    """A registry problem a user can act on (unknown model/version/alias, bad URI)."""


def _connect(tracking_uri: str | None) -> MlflowClient:
    # The registry lives in the tracking store (SQLite locally, the server on a cluster).
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    return MlflowClient()


def pinned_requirements() -> list[str]:
    pins = []
    for name in RUNTIME_DISTRIBUTIONS:
        try:
            # Drop local labels (+cu130, +cpu): they are not on PyPI's index.
            pins.append(f"{name}=={dist_version(name).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


def models_package_dir() -> str:
    # Located without importing it: `unclip models list` should not pay for torch. (Under
    # some editable installs it resolves as a namespace package, so use the search path.)
    return str(Path(list(find_spec("models").submodule_search_locations)[0]))


def stage_pipeline(pipeline_dir: str | Path, staging: Path, sampling: dict | None) -> dict:
    """Copy the pipeline into `staging`, baking `sampling` overrides into its config.json.

    Baking them in (rather than MLflow model_config) means every loader - pyfunc, Ray Serve,
    `unclip generate` - sees the same defaults. Returns the resulting sampling settings.
    """
    source = Path(pipeline_dir)
    if not (source / "config.json").is_file():
        raise RegistryError(f"{source}: not a saved pipeline (no config.json)")
    shutil.copytree(source, staging)
    return _merge_sampling(staging, sampling or {})


def _merge_sampling(pipeline_dir: Path, sampling: dict) -> dict:
    """Overlay `sampling` on the pipeline's saved sampling settings; returns the result."""
    config_path = pipeline_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["sampling"] = {**config.get("sampling", {}), **sampling}
    config_path.write_text(json.dumps(config, indent=2))
    return config["sampling"]


@contextlib.contextmanager
def _run_for_logging(client: MlflowClient, run_id: str | None, experiment: str | None):
    """Log into `run_id` (already active here, or reopened and left as it was) or a new run."""
    active = mlflow.active_run()
    if run_id and active and active.info.run_id == run_id:
        yield run_id
        return
    if run_id:
        status = client.get_run(run_id).info.status
        with mlflow.start_run(run_id=run_id, nested=active is not None):
            yield run_id
        if status == "RUNNING":  # owned by another process (the pipeline driver): keep it open
            client.update_run(run_id, status="RUNNING")
        return
    if experiment:
        mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name="register", nested=active is not None) as run:
        yield run.info.run_id


def register_pipeline(pipeline_dir: str | Path, *, tracking_uri: str | None, model_name: str,
                      metrics: dict[str, float], component_runs: dict[str, str],
                      dataset_uri: str, manifest_hash: str, parent_run_id: str | None = None,
                      experiment: str | None = None, sampling: dict | None = None,
                      weights_marker: str | None = None) -> int:
    """Log the pipeline as a pyfunc, register a new version, tag lineage + metrics, alias it
    `candidate`. Returns the version number.

    The version is created with its tags in one call, so a version either exists with its
    `weights_marker` or not at all: a rerun after a crash finds it (`find_version`) instead
    of registering the same weights twice."""
    if has_credentials(dataset_uri):
        raise RegistryError("dataset_uri: credentials in the URI; use the environment instead")
    client = _connect(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="unclip-register-") as tmp:
        staged = Path(tmp) / "pipeline"
        sampling_defaults = stage_pipeline(pipeline_dir, staged, sampling)
        with _run_for_logging(client, parent_run_id, experiment) as run_id, \
                warnings.catch_warnings():
            # The signature is explicit; an input example would run a generation at log time.
            warnings.filterwarnings("ignore", message=".*input example")
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME_IN_RUN,
                python_model=pyfunc_model.__file__,
                artifacts={pyfunc_model.PIPELINE_ARTIFACT: str(staged)},
                code_paths=[models_package_dir()],
                signature=pyfunc_model.model_signature(sampling_defaults),
                pip_requirements=pinned_requirements(),
            )
    tags = {COMPONENT_RUN_TAG.format(name): rid for name, rid in component_runs.items()}
    tags |= {DATASET_URI_TAG: dataset_uri, MANIFEST_HASH_TAG: manifest_hash,
             SOURCE_RUN_TAG: run_id}
    if weights_marker:
        tags[WEIGHTS_TAG] = weights_marker
    tags |= {METRIC_TAG_PREFIX + name: repr(float(value)) for name, value in metrics.items()
             if isinstance(value, int | float) and not isinstance(value, bool)}  # scalars only
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(already exists|Registered model)")
        version = int(mlflow.register_model(info.model_uri, model_name, tags=tags).version)
    client.set_registered_model_alias(model_name, CANDIDATE, str(version))
    return version


def find_version(client: MlflowClient, model_name: str, weights_marker: str) -> int | None:
    """The version registered with these weights, if any."""
    try:
        found = client.search_model_versions(
            f"name = '{model_name}' and tags.`{WEIGHTS_TAG}` = '{weights_marker}'")
    except MlflowException:
        return None
    return min((int(v.version) for v in found), default=None)


def version_metrics(model_version) -> dict[str, float]:
    return {key[len(METRIC_TAG_PREFIX):]: float(value)
            for key, value in model_version.tags.items() if key.startswith(METRIC_TAG_PREFIX)}


def _get_version(client: MlflowClient, model_name: str, version: int | str):
    try:
        return client.get_model_version(model_name, str(version))
    except MlflowException:
        raise RegistryError(_missing_version(client, model_name, version)) from None


def _registered_model(client: MlflowClient, model_name: str):
    """The registered model, or RegistryError naming the models that do exist."""
    try:
        return client.get_registered_model(model_name)
    except MlflowException:
        try:
            names = [m.name for m in client.search_registered_models(max_results=20)]
        except MlflowException:
            names = []
        raise RegistryError(f"no registered model {model_name!r}; registered: "
                            f"{', '.join(names) or 'none'} (register one with "
                            "`unclip pipeline --only register`)") from None


def _missing_version(client: MlflowClient, model_name: str, version: int | str) -> str:
    _registered_model(client, model_name)  # an unknown model is its own message
    try:
        versions = sorted(int(v.version) for v in
                          client.search_model_versions(f"name = '{model_name}'"))
    except MlflowException:
        versions = []
    have = ", ".join(map(str, versions[:20])) + (", ..." if len(versions) > 20 else "")
    return (f"model {model_name!r} has no version {version} (it has: {have or 'none'}); "
            f"see `unclip models list {model_name}`")


def _version_by_alias(client: MlflowClient, model_name: str, alias: str):
    """The version an alias points at, or RegistryError naming the aliases that are set."""
    registered = _registered_model(client, model_name)
    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        aliases = ", ".join(sorted(registered.aliases or {})) or "none"
        raise RegistryError(
            f"models:/{model_name}@{alias}: alias {alias!r} is not set on model "
            f"{model_name!r} (set: {aliases}); use one of those, models:/{model_name}/VERSION, "
            f"or set it with `unclip models promote {model_name} VERSION` (champion)") from None


def _champion(client: MlflowClient, model_name: str):
    try:
        return client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None


GATE_TAG_PREFIX = "gate."


def paired_gate(client: MlflowClient, model_name: str, version: int | str, *, metric: str,
                candidate, champion_report, reps: int = 2000) -> tuple[bool, str]:
    """The promotion gate: `champion` moves to `version` only when the candidate beats the
    champion on `metric` beyond the uncertainty.

    `candidate` is the version's evaluation report (`orchestration.evaluate.evaluation.EvalReport`);
    `champion_report(champion_version)` returns the champion's on the same captions, seeds and
    evaluator. The per-caption differences are resampled (paired bootstrap): promotion needs
    the 95% interval of the mean difference to lie above zero. The decision, the interval and
    the evaluator go on the version as `gate.*` tags."""
    from models.metrics import paired_bootstrap

    _get_version(client, model_name, version)
    if metric not in candidate.per_caption:
        return _gate_result(client, model_name, version, False, (
            f"v{version} has no per-caption {metric}; promote it explicitly with "
            f"`unclip models promote {model_name} {version}`"), {})
    champion = _champion(client, model_name)
    if champion is None:
        return _gate_result(client, model_name, version, True,
                            f"v{version} is the first champion", {"evaluator": candidate.evaluator})
    if str(champion.version) == str(version):
        return False, f"v{version} is already the champion"
    theirs = champion_report(champion.version)
    why_not = candidate.comparable_with(theirs) if theirs is not None else "no evaluation"
    if why_not or metric not in theirs.per_caption:
        return _gate_result(client, model_name, version, False, (
            f"cannot compare with champion v{champion.version} ({why_not or 'no ' + metric}); "
            "compare by hand and promote explicitly"), {})
    stats = paired_bootstrap(candidate.per_caption[metric], theirs.per_caption[metric],
                             reps=reps)
    better = stats["low"] > 0
    reason = (f"v{version} {metric} {stats['difference']:+.4f} vs champion v{champion.version}"
              f" (95% paired bootstrap interval [{stats['low']:+.4f}, {stats['high']:+.4f}] over "
              f"{stats['items']} captions, evaluator {candidate.evaluator}): "
              f"{'better' if better else 'not better'} beyond the uncertainty")
    return _gate_result(client, model_name, version, better, reason, {
        "metric": metric, "difference": stats["difference"], "low": stats["low"],
        "high": stats["high"], "captions": stats["items"], "champion_version": champion.version,
        "evaluator": candidate.evaluator})


def _gate_result(client: MlflowClient, model_name: str, version: int | str, promoted: bool,
                 reason: str, stats: dict) -> tuple[bool, str]:
    tags = {GATE_TAG_PREFIX + key: str(value) for key, value in stats.items()}
    tags[GATE_TAG_PREFIX + "decision"] = "promoted" if promoted else "not promoted"
    tags[GATE_TAG_PREFIX + "reason"] = reason
    for key, value in tags.items():
        client.set_model_version_tag(model_name, str(version), key, value)
    if promoted:
        _set_champion(client, model_name, version, f"gate: {reason}")
    return promoted, reason


def _set_champion(client: MlflowClient, model_name: str, version: int | str, why: str) -> None:
    client.set_registered_model_alias(model_name, CHAMPION, str(version))
    client.set_model_version_tag(model_name, str(version), PROMOTION_TAG, why)


def promote(model_name: str, version: int | str, *, tracking_uri: str | None = None) -> None:
    """Explicit promotion: move `champion` to `version`, whatever the metrics say."""
    client = _connect(tracking_uri)
    _get_version(client, model_name, version)
    _set_champion(client, model_name, version, "explicit")


def list_versions(model_name: str, *, tracking_uri: str | None = None) -> list[dict]:
    """Every version, oldest first, with its aliases, metric tags and creation time."""
    client = _connect(tracking_uri)
    registered = _registered_model(client, model_name)
    aliases: dict[str, list[str]] = {}
    for alias, version in (registered.aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for mv in client.search_model_versions(f"name = '{model_name}'"):
        created = datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=UTC)
        rows.append({"version": int(mv.version),
                     "aliases": sorted(aliases.get(str(mv.version), [])),
                     "metrics": version_metrics(mv),
                     "created": created.isoformat(timespec="seconds"), "run_id": mv.run_id})
    return sorted(rows, key=lambda row: row["version"])


def pipeline_dir_in(directory: Path) -> Path | None:
    """The pipeline directory inside a saved pipeline or a logged pyfunc model directory."""
    if (directory / "config.json").is_file():
        return directory
    mlmodel = directory / "MLmodel"
    if mlmodel.is_file():
        flavor = (yaml.safe_load(mlmodel.read_text()).get("flavors") or {}).get(
            "python_function", {})
        artifact = (flavor.get("artifacts") or {}).get(pyfunc_model.PIPELINE_ARTIFACT, {})
        if artifact.get("path") and (directory / artifact["path"] / "config.json").is_file():
            return directory / artifact["path"]
    return None


def resolve_model_uri(uri: str, *, tracking_uri: str | None = None,
                      dst_dir: str | Path | None = None) -> Path:
    """`models:/NAME@alias`, `models:/NAME/VERSION`, `runs:/ID/path` or a local directory
    -> a local directory `UnCLIPPipeline.load` accepts (downloaded when remote)."""
    check_model_uri(uri, tracking_uri=tracking_uri)  # a clear line before any download
    if "://" not in uri and not uri.startswith(("models:", "runs:")):
        return pipeline_dir_in(Path(uri).expanduser().absolute())
    client = _connect(tracking_uri)
    target = Path(dst_dir) if dst_dir else Path(tempfile.mkdtemp(prefix="unclip-model-"))
    try:
        downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri,
                                                              dst_path=str(target)))
    except MlflowException as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RegistryError(f"{uri}: {first_line}") from None
    found = pipeline_dir_in(downloaded)
    if found is None:
        raise RegistryError(f"{uri}: downloaded, but it holds no unCLIP pipeline")
    version = model_version(client, uri)
    if version:
        apply_tuned_sampling(_get_version(client, *version).tags, found)
    return found


def model_version(client: MlflowClient, model_uri: str) -> tuple[str, str] | None:
    """(name, version) for models:/NAME/VERSION or models:/NAME@alias, else None."""
    match = MODEL_URI_RE.match(model_uri)
    if not match:
        return None
    name = match.group("name")
    if match.group("version"):
        return name, match.group("version")
    return name, str(_version_by_alias(client, name, match.group("alias")).version)


def check_model_uri(uri: str, *, tracking_uri: str | None = None) -> None:
    """Fail fast, in one RegistryError line, on a model URI that cannot load: a missing local
    directory, or a registered model, version or alias that does not exist. Downloads nothing."""
    if "://" not in uri and not uri.startswith(("models:", "runs:")):
        local = Path(uri).expanduser()
        if not local.is_dir():
            raise RegistryError(f"{uri}: no such model directory (or use models:/NAME@alias)")
        if pipeline_dir_in(local.absolute()) is None:
            raise RegistryError(f"{uri}: neither a saved pipeline nor an MLflow pyfunc model")
        return
    if not uri.startswith("models:"):
        return  # runs:/ and remote artifact URIs are checked by their download
    client = _connect(tracking_uri)
    found = model_version(client, uri)
    if found is not None:  # other forms (models:/NAME/latest) are checked by their download
        _get_version(client, *found)


def apply_tuned_sampling(tags: dict, pipeline_dir: Path) -> dict:
    """Write a version's tuned guidance tags into the (downloaded copy's) config.json, so
    every loader serves the sweep's choice by default. Returns what was applied."""
    tuned = {}
    for tag, key in TUNED_SAMPLING_TAGS.items():
        try:
            tuned[key] = float(tags[tag])
        except (KeyError, ValueError):
            continue  # absent, or not a number: keep the saved default
    if tuned:
        _merge_sampling(pipeline_dir, tuned)
    return tuned
