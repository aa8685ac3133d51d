"""Learning-rate / warm-up sweep: Ray Tune over Ray Train runs, ASHA on the validation loss.

Train V2 pattern: each Tune trial runs `train_trial`, a driver function that calls the normal
`run_stage` (same loop, same checkpoints, same MLflow run layout) with a callback forwarding
the Train run's reports to Tune. Layout under `storage_root`:
    <run_name>-tune-<stage>/                       the Tune experiment (restorable)
    <run_name>-tune-<stage>/<run_name>-trial-<id>/ each trial's Train run and checkpoints
MLflow: one sweep parent run; each trial's stage run nested under it, tagged with the sweep id.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from data_pipelines.storage import is_s3_uri, resolve
from orchestration.common.data_check import ensure_dataset
from orchestration.common.layout import DONE_FILE, portable_uri, stage_done
from orchestration.common.ray_runtime import check_cluster_fits, connect
from orchestration.common.tracking import (
    client_for,
    find_or_create_run,
    log_config,
    log_metrics,
    log_text,
    set_tags,
)
from orchestration.config import Config, ConfigError, dump_yaml
from orchestration.stages import UnknownStage, task_class
from orchestration.train.training_job import run_stage
from tuning.report import log_lr_plot, trial_table_csv, trial_table_markdown
from tuning.search_space import apply_params, check_space, describe

METRIC = "val_loss"
DIVERGED = "diverged"
SWEEP_TAG, TRIAL_TAG, STATUS_TAG = "unclip.sweep_id", "unclip.trial_id", "unclip.trial_status"
SWEEP_FILE = "unclip_sweep.json"
TRIAL_RUN_STATUS = {"completed": "FINISHED", "stopped_early": "KILLED", "diverged": "KILLED",
                    "error": "FAILED"}  # a trial's ending -> its MLflow run's status
LR_RANGE = (1e-5, 3e-3)  # Grazys 2023, sec. 4.2, fig. 5: 3e-4 best, above 1e-3 diverged
WARMUP_CHOICES = (0.0, 0.05, 0.1, 0.2)  # Grazys 2023, sec. 4.2, fig. 6: no warm-up was best
DATA_CPUS_PER_TRIAL = 1.0  # Ray Data decoding/augmenting beside the Train workers
DRIVER_MEMORY = 256 * 1024**2  # logical reservation for each trial's driver function
PORTABLE_FILES = ("config.json", "weights.safetensors", DONE_FILE)


class SweepError(ConfigError):
    """A sweep problem a user can fix (exists already, missing upstream stage)."""


@dataclass
class SweepResult:
    sweep_id: str
    parent_run_id: str
    experiment_uri: str
    rows: list[dict]
    best: dict | None
    best_config_path: Path | None
    counts: dict = field(default_factory=dict)


# --- inside a trial -------------------------------------------------------------------------

class SweepReportCallback(TuneReportCallback):
    """Forwards the Train run's evaluation reports to Tune and flags divergence.

    Runs in the Train controller. Loss-only reports stay in MLflow (Tune decides on the
    validation loss); a report showing divergence (NaN/inf, or the loss above `factor` times
    the first logged loss) is forwarded at once with diverged=1, so the stopper ends the trial.
    """

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor
        self.first_loss: float | None = None
        self.reason: str | None = None

    def _divergence(self, report: dict) -> str | None:
        loss, val = report.get("loss"), report.get(METRIC)
        if loss is not None:
            if not math.isfinite(loss):
                return f"loss is {loss}"
            if self.first_loss is None:
                self.first_loss = loss
            elif loss > self.factor * self.first_loss:
                return f"loss {loss:.3g} > {self.factor:g} x first loss {self.first_loss:.3g}"
        if val is not None and not math.isfinite(val):
            return f"{METRIC} is {val}"
        return None

    def after_report(self, run_context, metrics, checkpoint):
        if not metrics:
            return
        report = dict(metrics[0])  # rank 0: the only rank with evaluation metrics
        self.reason = self.reason or self._divergence(report)
        if self.reason:
            value = report.get(METRIC, math.inf)
            report |= {DIVERGED: 1, "diverged_reason": self.reason,
                       METRIC: value if math.isfinite(value) else math.inf}
        elif METRIC not in report:
            return
        else:
            report[DIVERGED] = 0
        super().after_report(run_context, [report], checkpoint)


def stop_diverged(trial_id: str, result: dict) -> bool:
    return result.get(DIVERGED) == 1


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def sweep_name(config: Config, stage: str) -> str:
    return f"{config.run_name}-tune-{stage}"


def sweep_uri(config: Config, stage: str) -> str:
    return f"{config.storage_root.rstrip('/')}/{sweep_name(config, stage)}"


def trial_config(base: Config, stage: str, params: dict, trial_id: str) -> Config:
    """The base config with the trial's values, its own run name and storage under the sweep."""
    return apply_params(base, {**params, "run_name": f"{base.run_name}-trial-{trial_id}",
                               "storage_root": sweep_uri(base, stage)})


def share_upstream(base: Config, trial: Config, stage: str) -> None:
    """A trial reads its upstream stages' weights (e.g. CLIP for the prior) from its own run:
    copy the base run's."""
    for upstream in task_class(stage).requires:
        if stage_done(trial, upstream):
            continue
        source = resolve(portable_uri(base, upstream))
        target = resolve(portable_uri(trial, upstream))
        for name in PORTABLE_FILES:  # DONE last: it marks the copy complete
            target.join(name).write_bytes(source.join(name).read_bytes())


def train_trial(params: dict, *, base: dict, stage: str, parent_run_id: str, sweep_id: str,
                diverge_factor: float) -> None:
    """The Tune trainable: one Ray Train run of `stage` with this trial's values."""
    trial_id = tune.get_context().get_trial_id()
    base_config = Config.model_validate(base)
    config = trial_config(base_config, stage, params, trial_id)
    share_upstream(base_config, config, stage)
    run_stage(config, stage, parent_run_id=parent_run_id,
              callbacks=[SweepReportCallback(diverge_factor)],
              tags={SWEEP_TAG: sweep_id, TRIAL_TAG: trial_id})


# --- the sweep driver ---------------------------------------------------------------------

def default_space(stage: str) -> dict[str, Any]:
    return {f"{stage}.optim.lr": tune.loguniform(*LR_RANGE),
            f"{stage}.optim.warmup_fraction": tune.choice(list(WARMUP_CHOICES))}


def concurrency_bound(config: Config) -> int:
    """How many trials the cluster holds at once: Train workers plus Ray Data per trial."""
    scaling = config.scaling
    per_trial = scaling.num_workers * scaling.cpus_per_worker + DATA_CPUS_PER_TRIAL
    resources = ray.cluster_resources()
    bound = int(resources.get("CPU", 1) // per_trial)
    if scaling.use_gpu:
        bound = min(bound, int(resources.get("GPU", 0) // scaling.num_workers))
    return max(1, bound)


def evaluations(config: Config, stage: str) -> int:
    """Evaluations a full trial reports (ASHA's rungs): every `eval_every` steps and the last."""
    spec = config.stage(stage)
    return math.ceil(spec.steps / spec.evaluation_interval)


def _tune_storage(config: Config) -> dict:
    if is_s3_uri(config.storage_root):  # Ray's convention: path without scheme + filesystem
        location = resolve(config.storage_root)
        return {"storage_path": location.path, "storage_filesystem": location.filesystem}
    return {"storage_path": config.storage_root}


def _experiment_path(config: Config, stage: str) -> tuple[str, Any]:
    storage = _tune_storage(config)
    path = f"{storage['storage_path'].rstrip('/')}/{sweep_name(config, stage)}"
    return path, storage.get("storage_filesystem")


def _check_inputs(config: Config, stage: str, log) -> None:
    try:
        task = task_class(stage)
    except UnknownStage as exc:
        raise SweepError(str(exc)) from None
    if config.stage(stage).steps == 0:
        raise SweepError(f"{stage}.steps is 0 (weights taken untrained): a learning-rate sweep "
                         f"needs steps >= 1; pass --set {stage}.steps=N")
    ensure_dataset(config, log=log)  # built once here, not raced by the trials
    for upstream in task.requires:
        if not stage_done(config, upstream):
            raise SweepError(f"a {stage} sweep needs trained {upstream} weights at "
                             f"{portable_uri(config, upstream)}; run `unclip train {upstream}` "
                             f"with run_name={config.run_name} first")
    if task.dataset_kind == "embeddings" and not resolve(
            config.data.resolved_embeddings_uri).join("manifest.json").exists():
        raise SweepError(f"a {stage} sweep needs embeddings at "
                         f"{config.data.resolved_embeddings_uri}; run `unclip embed` first")


def _sweep_identity(config: Config, stage: str, resume: bool, log) -> tuple[str, bool]:
    """(sweep id, whether Tune should restore), refusing to silently mix two sweeps."""
    path, filesystem = _experiment_path(config, stage)
    restorable = tune.Tuner.can_restore(path, storage_filesystem=filesystem)
    meta = resolve(sweep_uri(config, stage)).join(SWEEP_FILE)
    if restorable and not resume:
        raise SweepError(f"a sweep already exists at {sweep_uri(config, stage)}; pass --resume "
                         "to continue it, or set another run_name")
    if resume and meta.exists():
        sweep_id = json.loads(meta.read_text())["sweep_id"]
        log(f"[tune] resuming sweep {sweep_id}" if restorable
            else f"[tune] sweep {sweep_id} has no Tune state yet; starting its trials")
        return sweep_id, restorable
    if resume:
        log("[tune] nothing to resume; starting a new sweep")
    sweep_id = f"{sweep_name(config, stage)}-{uuid.uuid4().hex[:8]}"
    meta.write_text(json.dumps({"sweep_id": sweep_id, "created_unix": time.time()}))
    return sweep_id, False


def run_lr_sweep(config: Config, *, stage: str, num_samples: int,
                 max_concurrent: int | None = None, resume: bool = False,
                 extra_space: dict[str, Any] | None = None, diverge_factor: float = 10.0,
                 grace_period: int = 1, reduction_factor: int = 2, log=print) -> SweepResult:
    """Sweep learning rate and warm-up (plus `extra_space`) for one stage."""
    connect(config)
    check_cluster_fits(config)
    _check_inputs(config, stage, log)
    space = {**default_space(stage), **(extra_space or {})}
    check_space(config, space)
    log(f"[tune] search space: {json.dumps({k: describe(v) for k, v in space.items()})}")
    concurrent = _concurrency(config, max_concurrent, log)
    sweep_id, restore = _sweep_identity(config, stage, resume, log)

    client = client_for(config.mlflow.tracking_uri)
    parent = find_or_create_run(config, run_key=f"tune/{sweep_id}",
                                run_name=sweep_name(config, stage),
                                tags={SWEEP_TAG: sweep_id, "unclip.sweep": "lr",
                                      "unclip.stage": stage})
    if not restore:
        log_config(client, parent, config)
        log_text(client, parent, json.dumps({k: describe(v) for k, v in space.items()}, indent=2),
                 "sweep/search_space.json")
        set_tags(client, parent, {"sweep.metric": METRIC, "sweep.num_samples": num_samples,
                                  "sweep.max_concurrent": concurrent})

    trainable = tune.with_resources(
        tune.with_parameters(train_trial, base=config.model_dump(mode="json"), stage=stage,
                             parent_run_id=parent, sweep_id=sweep_id,
                             diverge_factor=diverge_factor),
        # The trial only drives: its Train workers hold the CPUs, and a CPU fraction here
        # would starve Ray Data's 1-CPU tasks. Tune needs some resource: a little memory.
        {"CPU": 0, "memory": DRIVER_MEMORY})
    start = time.monotonic()
    tuner = _tuner(config, stage, trainable, restore=restore, space=space,
                   num_samples=num_samples, concurrent=concurrent,
                   asha={"grace_period": grace_period, "reduction_factor": reduction_factor})
    try:
        grid = tuner.fit()
    except Exception:
        client.set_terminated(parent, status="FAILED")
        raise
    rows = trial_rows(grid, config, stage)
    result = summarise(config, stage, sweep_id, parent, rows, log)
    log(f"[tune] {len(rows)} trials in {time.monotonic() - start:.0f}s: "
        f"{json.dumps(result.counts)}")
    return result


def _concurrency(config: Config, max_concurrent: int | None, log) -> int:
    """Trials at a time: as many as asked, at most what the cluster holds."""
    bound = concurrency_bound(config)
    if max_concurrent and max_concurrent > bound:
        log(f"[tune] --max-concurrent {max_concurrent} exceeds what the cluster holds; "
            f"running {bound} trials at a time")
    return min(max_concurrent or bound, bound)


def _tuner(config: Config, stage: str, trainable, *, restore: bool, space: dict,
           num_samples: int, concurrent: int, asha: dict) -> tune.Tuner:
    path, filesystem = _experiment_path(config, stage)
    if restore:
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True,
                                  storage_filesystem=filesystem)
    # one past the last evaluation: a trial that runs to the end must finish on its own
    # (export + MLflow close), not be stopped by ASHA on its final report
    max_t = evaluations(config, stage) + 1
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_t,
                              grace_period=min(asha["grace_period"], max_t - 1),
                              reduction_factor=asha["reduction_factor"])
    return tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(metric=METRIC, mode="min", num_samples=num_samples,
                                    max_concurrent_trials=concurrent,
                                    trial_dirname_creator=trial_dirname, scheduler=scheduler),
        run_config=tune.RunConfig(name=sweep_name(config, stage), stop=stop_diverged,
                                  verbose=1, **_tune_storage(config)))


def _short(key: str, stage: str) -> str:
    return key.removeprefix(f"{stage}.optim.").removeprefix(f"{stage}.")


def _status(result, metrics: dict, total_steps: int) -> str:
    # Divergence first: once flagged, the trial is being stopped, and an error raised on the
    # way out (the stop reaching a run that is still writing) is a consequence, not the cause.
    if metrics.get(DIVERGED) == 1:
        return "diverged"
    if result.error is not None:
        return "error"
    return "completed" if metrics.get("step") == total_steps else "stopped_early"


def _reason(result, metrics: dict) -> str:
    error = str(result.error).strip().splitlines()[0][:200] if result.error else ""
    diverged = metrics.get("diverged_reason") or ""
    if diverged and error:
        return f"{diverged} (then, while stopping: {error})"
    return diverged or error


def trial_rows(grid, config: Config, stage: str) -> list[dict]:
    """One row per trial: its values, last validation loss, how it ended."""
    total = config.stage(stage).steps
    keys = sorted({key for result in grid for key in (result.config or {})})
    rows = []
    for result in grid:
        metrics = dict(result.metrics or {})
        params = {key: (result.config or {}).get(key) for key in keys}
        rows.append({
            "trial_id": metrics.get("trial_id") or Path(result.path).name.removeprefix("trial_"),
            **{_short(k, stage): v for k, v in params.items()},
            METRIC: metrics.get(METRIC, math.nan),
            "loss": metrics.get("loss"),  # absent when no log step fell before the last report
            "step": metrics.get("step"),
            "evaluations": metrics.get("training_iteration", 0),
            "status": _status(result, metrics, total),
            "reason": _reason(result, metrics),
            "_params": params,
        })
    return sorted(rows, key=lambda row: row["trial_id"])


def best_row(rows: list[dict]) -> dict | None:
    """Lowest last validation loss; trials that ran to the end beat early-stopped ones."""
    def finite(row):
        return isinstance(row[METRIC], int | float) and math.isfinite(row[METRIC])

    for statuses in (("completed",), ("stopped_early",)):
        usable = [row for row in rows if row["status"] in statuses and finite(row)]
        if usable:
            return min(usable, key=lambda row: row[METRIC])
    return None


def best_config_path(config: Config, stage: str) -> Path:
    return Path("outputs").absolute() / config.run_name / f"best-{stage}.yaml"


def summarise(config: Config, stage: str, sweep_id: str, parent: str, rows: list[dict],
              log) -> SweepResult:
    """Tag the trial runs, log table + plot + best config to the parent, write the YAML."""
    client = client_for(config.mlflow.tracking_uri)
    trial_runs = {run.data.tags.get(TRIAL_TAG): run for run in client.search_runs(
        [client.get_run(parent).info.experiment_id],
        filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_id}'")}
    for row in rows:
        run = trial_runs.get(row["trial_id"])
        row["mlflow_run_id"] = run.info.run_id if run else ""
        if run is None:
            continue
        set_tags(client, run.info.run_id, {STATUS_TAG: row["status"],
                                           "unclip.trial_reason": row["reason"] or "-"})
        # The sweep knows why a trial ended; what the trial's own process managed to record
        # depends on how fast Tune's stop reached it (still RUNNING, or FAILED when the stop
        # surfaced as an error in its driver)
        client.set_terminated(run.info.run_id, status=TRIAL_RUN_STATUS[row["status"]])
    counts = {status: sum(row["status"] == status for row in rows)
              for status in ("completed", "stopped_early", "diverged", "error")}
    best = best_row(rows)
    path = None
    log_text(client, parent, trial_table_csv(rows), "sweep/trials.csv")
    log_text(client, parent, trial_table_markdown(rows), "sweep/trials.md")
    log_lr_plot(client, parent, rows, metric=METRIC, stage=stage)
    set_tags(client, parent, {f"sweep.{k}": v for k, v in counts.items()})
    if best is not None:
        best_config = apply_params(config, best["_params"])
        header = (f"# best of sweep {sweep_id}: trial {best['trial_id']}, "
                  f"{METRIC}={best[METRIC]:.4g} (MLflow run {best['mlflow_run_id']})\n")
        text = header + dump_yaml(best_config)
        path = best_config_path(config, stage)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        log_text(client, parent, text, f"sweep/best-{stage}.yaml")
        log_text(client, parent, json.dumps(best["_params"], indent=2), "sweep/best_params.json")
        log_metrics(client, parent, {f"best_{METRIC}": best[METRIC]}, step=0)
        set_tags(client, parent, {"sweep.best_trial": best["trial_id"],
                                  "sweep.best_run_id": best["mlflow_run_id"]})
        log(f"[tune] best trial {best['trial_id']} {METRIC}={best[METRIC]:.4g} "
            f"{json.dumps(best['_params'])}; config written to {path}")
    else:
        log("[tune] no trial produced a usable validation loss; no best config written")
    client.set_terminated(parent, status="FINISHED")
    return SweepResult(sweep_id, parent, sweep_uri(config, stage), rows, best, path, counts)

