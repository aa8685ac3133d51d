"""MLflow tracking: one run per stage (found again by key on resume), nested under a parent.

Everything goes through an explicit `MlflowClient` and run id, so the driver and rank 0 of
a Ray Train job can write to the same run without sharing MLflow's global active-run state.
"""

from __future__ import annotations

import io
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from orchestration.config import Config, dump_yaml, flatten

RUN_KEY_TAG = "unclip.run_key"
PARENT_TAG = "mlflow.parentRunId"
INTERRUPTED_TAG = "unclip.interrupted"  # set when a killed attempt's run is found RUNNING
INTERRUPTIONS_TAG = "unclip.interruptions"  # how many times that happened
MAX_BATCH = 100  # MLflow's limit on params per batch


def client_for(tracking_uri: str) -> MlflowClient:
    # the registry lives in the tracking store; without registry_uri the client would use
    # whatever registry an earlier `mlflow.set_registry_uri` in this process named
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    return client.create_experiment(name)


def find_or_create_run(config: Config, *, run_key: str, run_name: str,
                       parent_run_id: str | None = None, tags: dict | None = None,
                       log=None) -> str:
    """The run tagged with `run_key` if it exists (resume), else a new one.

    A found run still RUNNING belongs to an attempt whose process died without ending it
    (SIGKILL, OOM, a lost node: nothing runs in the dying process): it is ended KILLED and
    tagged as interrupted first, then reopened for this attempt."""
    client = client_for(config.mlflow.tracking_uri)
    exp = experiment_id(client, config.mlflow.experiment)
    found = client.search_runs([exp], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
                               max_results=1, order_by=["attributes.start_time DESC"])
    if found:
        run_id = found[0].info.run_id
        if found[0].info.status == "RUNNING":
            end_interrupted(client, found[0])
            if log:
                log(f"[mlflow] run {run_id} ({run_key}) was left RUNNING by an attempt that "
                    "was killed; ended it KILLED before resuming")
        client.update_run(run_id, status="RUNNING")
        return run_id
    all_tags = {RUN_KEY_TAG: run_key, **(tags or {})}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    return client.create_run(exp, run_name=run_name, tags=all_tags).info.run_id


def end_interrupted(client: MlflowClient, run) -> None:
    """End a run its dead process left RUNNING: KILLED, with tags saying when it was found
    and how many attempts have been interrupted so far."""
    count = int(run.data.tags.get(INTERRUPTIONS_TAG, "0") or 0) + 1
    found_at = datetime.now(UTC).isoformat(timespec="seconds")
    set_tags(client, run.info.run_id, {
        INTERRUPTED_TAG: f"an attempt was killed without ending this run; found RUNNING "
                         f"and ended KILLED at {found_at} by the next attempt",
        INTERRUPTIONS_TAG: count})
    client.set_terminated(run.info.run_id, status="KILLED")


def log_config(client: MlflowClient, run_id: str, config: Config) -> None:
    """Flattened config as params (chunked to MLflow's batch limit) + the YAML as an artifact."""
    existing = client.get_run(run_id).data.params
    params = [Param(k, v) for k, v in flatten(config).items() if k not in existing]
    for start in range(0, len(params), MAX_BATCH):
        client.log_batch(run_id, params=params[start:start + MAX_BATCH])
    log_text(client, run_id, dump_yaml(config), "config/resolved.yaml")


def log_metrics(client: MlflowClient, run_id: str, metrics: dict, step: int) -> None:
    import time

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    for start in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[start:start + 1000])


def set_tags(client: MlflowClient, run_id: str, tags: dict) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_text(client: MlflowClient, run_id: str, text: str, artifact_file: str) -> None:
    client.log_text(run_id, text, artifact_file)


def log_png(client: MlflowClient, run_id: str, image, artifact_file: str) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        path.write_bytes(buffer.getvalue())
        parent = str(Path(artifact_file).parent)
        client.log_artifact(run_id, str(path), None if parent == "." else parent)


def log_loss_curves(client: MlflowClient, run_id: str, keys=("loss", "val_loss")) -> None:
    """A PNG of the loss histories: what people look at first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key in keys:
        history = client.get_metric_history(run_id, key)
        if history:
            history.sort(key=lambda m: m.step)
            ax.plot([m.step for m in history], [m.value for m in history], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    from PIL import Image

    log_png(client, run_id, Image.open(buffer), "plots/loss_curves.png")
