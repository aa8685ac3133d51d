"""`unclip pipeline`: data -> CLIP -> embeddings -> prior + decoder -> eval -> registry.

Each stage deletes its completion marker before rewriting its outputs and writes it last,
in storage beside the outputs (`orchestration.common.layout`), so a rerun - on this node or another
- skips complete stages and resumes the interrupted one from its checkpoint (Ray Train
restores a run from its storage path and name). One MLflow parent run per pipeline run name,
with a child run per training stage; a rerun ends a parent its killed attempt left RUNNING.
`outputs/<run_name>/` in the working directory holds copies for people to open (grids,
metrics, the saved pipeline, the summary), never a marker.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray

from data_pipelines.shards import manifest_hash
from data_pipelines.storage import Location, StorageError, describe_error, resolve
from orchestration.common.data_check import ensure_dataset
from orchestration.common.layout import (
    DONE_FILE,
    adopted_from,
    pipeline_step_uri,
    portable_uri,
    stage_uri,
    trained_steps,
)
from orchestration.common.ray_runtime import check_cluster_fits, connect
from orchestration.common.threads import set_torch_threads
from orchestration.common.tracking import (
    client_for,
    find_or_create_run,
    log_config,
    log_metrics,
    log_png,
    log_text,
    set_tags,
)
from orchestration.config import Config
from orchestration.evaluate.evaluation import EvalReport, assemble_pipeline, evaluate_pipeline
from orchestration.evaluate.evaluator import ensure_evaluator, evaluator_uri
from orchestration.stages import STAGES, task_class
from orchestration.train.embed_job import clip_marker, run_embed
from orchestration.train.training_job import ended_status, run_stage


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


EVAL_FILES = ("metrics.json", "evaluation.json", "samples.png", "eval_real_vs_generated.png",
              "prompts.json")


def eval_marker(config: Config) -> str:
    """What an evaluation depends on: the weights and the evaluator that scored them."""
    return json.dumps([trained_marker(config), evaluator_uri(config)])
SAVED_PIPELINE = "pipeline"  # the saved pipeline's folder, in storage and in outputs/


def _marker_matches(done: Location, marker: str) -> bool:
    """`done` (a step's DONE.json in storage) exists and was written for these weights."""
    return done.exists() and json.loads(done.read_text()).get("marker") == marker


def _copy_tree(source: Location, target: Location) -> None:
    """Copy a folder between local disk and storage (either side local or S3)."""
    from pyarrow.fs import copy_files

    try:
        if not target.is_s3:  # local folders are not created for a source's top-level files
            target.filesystem.create_dir(target.path, recursive=True)
        copy_files(source.path, target.path, source_filesystem=source.filesystem,
                   destination_filesystem=target.filesystem)
    except OSError as exc:
        raise StorageError(describe_error(exc, target.uri)) from None


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
    run = PipelineRun(config, selected_stages(only, from_stage),
                      forced=set(only or []) | ({from_stage} if from_stage else set()), log=log)
    return run.run()


class PipelineRun:
    """One pass over the pipeline plan; each step skips itself when its output is complete
    (unless named with --only/--from)."""

    def __init__(self, config: Config, stages: list[str], *, forced: set[str], log):
        self.config, self.stages, self.forced, self.log = config, stages, forced, log
        self.out = outputs_dir(config)
        self.summary: dict = {"stages": {}}
        self.rows: dict[str, dict] = {}
        self.metrics: dict = {}

    def run(self) -> dict:
        start = time.monotonic()
        connect(self.config)
        check_cluster_fits(self.config)
        self.parent = find_or_create_run(self.config, run_key=f"{self.config.run_name}/pipeline",
                                         run_name=f"{self.config.run_name}-pipeline",
                                         tags={"unclip.stage": "pipeline"}, log=self.log)
        self.client = client_for(self.config.mlflow.tracking_uri)
        log_config(self.client, self.parent, self.config)
        self.summary["parent_run_id"] = self.parent
        self.summary["experiment_id"] = self.client.get_run(self.parent).info.experiment_id
        try:
            for group in pipeline_plan():
                self.run_group(group)
        except BaseException as exc:  # a stopped job ends KILLED, an error FAILED
            self.client.set_terminated(self.parent, status=ended_status(exc))
            raise
        self.client.set_terminated(self.parent, status="FINISHED")
        self.summary["seconds"] = round(time.monotonic() - start, 1)
        resolve(str(self.out / "pipeline_summary.json")).write_text(
            json.dumps(self.summary, indent=2))
        return self.summary

    def run_group(self, group: list[str]) -> None:
        wanted = [s for s in group if s in self.stages]
        steps = {"data": self.data, "embed": self.embed, "eval": self.evaluate,
                 "register": self.register}
        if group[0] in steps:
            if wanted:
                self.timed(group[0], steps[group[0]])
        elif len(wanted) > 1 and _room_for(self.config, len(wanted)):
            self.log(f"[pipeline] {' and '.join(wanted)} run concurrently")
            with ThreadPoolExecutor(len(wanted)) as pool:
                list(pool.map(lambda stage: self.timed(stage, self.train, stage), wanted))
        else:
            for stage in wanted:
                self.timed(stage, self.train, stage)

    def timed(self, step: str, fn, *args) -> None:
        """Run one step and add its row to the summary table (status, time, results)."""
        row = {"step": step, "status": "done", "metrics": {}, "output": "", "run_id": ""}
        self.rows[step] = row
        start = time.monotonic()
        fn(*args)
        row["seconds"] = round(time.monotonic() - start, 1)
        self.summary["table"] = [self.rows[s] for s in step_order() if s in self.rows]

    def skip(self, step: str, complete: bool, why: str = "complete") -> bool:
        if complete and step not in self.forced:
            self.log(f"[pipeline] {step}: {why}, skipping")
            self.rows[step]["status"] = "skipped: " + why
            return True
        return False

    def data(self) -> None:
        manifest = ensure_dataset(self.config, log=self.log)
        uri = self.config.data.uri
        set_tags(self.client, self.parent, {"dataset.uri": uri,
                                            "dataset.manifest_hash": manifest_hash(uri)})
        self.summary["stages"]["data"] = {k: v.num_samples for k, v in manifest.splits.items()}
        self.rows["data"].update(output=uri, metrics=self.summary["stages"]["data"])

    def train(self, stage: str) -> None:
        self.rows[stage]["output"] = portable_uri(self.config, stage)
        trained, wanted = trained_steps(self.config, stage), getattr(self.config, stage).steps
        if trained is not None and trained < wanted:  # until then, the shorter run's weights
            self.log(f"[pipeline] {stage}: trained {trained} of {wanted} steps; continuing "
                     "from its latest checkpoint")
        complete = trained is not None and trained >= wanted
        if wanted == 0:  # weights taken untrained: complete while taken from the same source
            complete = adopted_from(self.config, stage) == self.config.stage(stage).init_from
        if self.skip(stage, complete):
            self.summary["stages"][stage] = "skipped (complete)"
            return
        result = run_stage(self.config, stage, parent_run_id=self.parent, log=self.log)
        self.summary["stages"][stage] = result.run_id
        self.rows[stage].update(run_id=result.run_id, metrics={
            k: v for k, v in result.final_metrics.items() if k in SUMMARY_METRICS})

    def embed(self) -> None:
        if not self.skip("embed", _embed_done(self.config)):
            run_embed(self.config, log=self.log)
        self.summary["stages"]["embed"] = self.config.data.resolved_embeddings_uri
        self.rows["embed"]["output"] = self.config.data.resolved_embeddings_uri

    def evaluate(self) -> None:
        """Score the assembled pipeline; its metrics, grids and saved folder go to storage
        (<run>/pipeline/eval, DONE.json last) and, for people, to outputs/<run_name>/."""
        out, marker = self.out, eval_marker(self.config)
        stored = resolve(pipeline_step_uri(self.config, "eval"))
        self.summary["grid"] = str(out / "samples.png")
        self.rows["eval"].update(output=self.summary["grid"], run_id=self.parent)
        if self.skip("eval", _marker_matches(stored.join(DONE_FILE), marker),
                     "complete for these weights"):
            self.metrics = json.loads(stored.join("metrics.json").read_text())
            _refresh_local(stored, out)
            self.rows["eval"]["metrics"] = _key_metrics(self.metrics)
            return
        stored.join(DONE_FILE).delete()  # first: the outputs below are about to be replaced
        evaluator = ensure_evaluator(self.config, log=self.log)
        set_torch_threads()  # sampling in this process, beside Ray's (threads.py)
        pipeline = assemble_pipeline(self.config)
        report = evaluate_pipeline(self.config, pipeline, evaluator, out, log=self.log)
        self.metrics = report.metrics
        log_metrics(self.client, self.parent,
                    {f"eval/{k}": v for k, v in self.metrics.items()}, step=0)
        set_tags(self.client, self.parent, {"eval.evaluator": report.evaluator})
        log_text(self.client, self.parent, report.to_json(), "eval/evaluation.json")
        # kept per weights too: a later version of the same run name replaces the file above,
        # and the gate must find the champion's own report
        log_text(self.client, self.parent, report.to_json(), report_artifact(self.config))
        from PIL import Image

        for name in ("samples.png", "eval_real_vs_generated.png"):
            log_png(self.client, self.parent, Image.open(out / name), f"eval/{name}")
        fresh = out / f".{SAVED_PIPELINE}-{uuid.uuid4().hex[:8]}"
        try:
            pipeline.save(fresh)
            stored.join(SAVED_PIPELINE).delete()
            _copy_tree(resolve(str(fresh)), stored.join(SAVED_PIPELINE))
            for name in EVAL_FILES:
                stored.join(name).write_bytes((out / name).read_bytes())
            # the local copy is swapped in whole: outputs/ never shows a half-saved folder
            shutil.rmtree(out / SAVED_PIPELINE, ignore_errors=True)
            fresh.rename(out / SAVED_PIPELINE)
        finally:
            shutil.rmtree(fresh, ignore_errors=True)
        stored.join(DONE_FILE).write_text(json.dumps(
            {"marker": marker, "finished_unix": time.time()}))  # last: complete
        self.rows["eval"]["metrics"] = _key_metrics(self.metrics)

    def register(self) -> None:
        """Register the evaluated pipeline; <run>/pipeline/register/DONE.json (in storage)
        records the version. Registering first and recording second is safe: a rerun after a
        crash in between finds the version by its weights marker instead of adding one."""
        marker = trained_marker(self.config)
        record = resolve(pipeline_step_uri(self.config, "register")).join(DONE_FILE)
        if _marker_matches(record, marker) and "register" not in self.forced:
            registered = json.loads(record.read_text())
            self.log(f"[pipeline] register: version {registered['version']} already holds "
                     "these weights, skipping")
            self.summary["registry"] = {k: v for k, v in registered.items() if k != "marker"}
        else:
            record.delete()
            self.summary["registry"] = _register(self.config, self.parent, self.metrics,
                                                 self.log)
            record.write_text(json.dumps({**self.summary["registry"], "marker": marker}))
        registry = self.summary["registry"]
        self.rows["register"].update(output=f"models:/{registry['model']}/{registry['version']}",
                                     metrics={"champion": registry["champion"]})


SUMMARY_METRICS = ("step", "val_loss", "zero_shot_top1", "generated_vs_image")


def _key_metrics(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("fd_clip", "clip_score", "r_precision", "attr_colour_shape")
            if k in metrics}


def _room_for(config: Config, stages: int) -> bool:
    needed = stages * config.scaling.num_workers * config.scaling.cpus_per_worker
    return ray.cluster_resources().get("CPU", 0) >= needed + 2  # + room for Ray Data


def _refresh_local(stored: Location, out: Path) -> None:
    """Copy an evaluation found complete in storage into outputs/ where this node lacks it
    (the eval ran in an earlier job, maybe on another node)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in EVAL_FILES:
        if not (out / name).exists() and stored.join(name).exists():
            resolve(str(out / name)).write_bytes(stored.join(name).read_bytes())


def _register(config: Config, parent: str, metrics: dict, log) -> dict:
    from orchestration.registry.registry import (
        CANDIDATE,
        find_version,
        paired_gate,
        register_pipeline,
    )

    stored = resolve(pipeline_step_uri(config, "eval"))
    if not _marker_matches(stored.join(DONE_FILE), eval_marker(config)):
        raise StorageError(f"no evaluation of the current weights at {stored.uri}; run the "
                           "eval stage first (`unclip pipeline --only eval`)")
    if not metrics:
        metrics = json.loads(stored.join("metrics.json").read_text())
    client = client_for(config.mlflow.tracking_uri)
    components = {stage: client.search_runs(
        [client.get_run(parent).info.experiment_id],
        filter_string=f"tags.`unclip.run_key` = '{config.run_name}/{stage}'",
        max_results=1)[0].info.run_id for stage in STAGES}
    marker = weights_marker(config)
    version = find_version(client, config.mlflow.registered_model, marker)
    if version is not None:  # registered before a crash that lost the record
        log(f"[register] version {version} already holds these weights")
        _restore_candidate(client, config.mlflow.registered_model, version, CANDIDATE)
    else:
        with tempfile.TemporaryDirectory(prefix="unclip-pipeline-") as tmp:
            saved = stored.join(SAVED_PIPELINE)
            if saved.is_s3:  # register_pipeline stages a local folder
                _copy_tree(saved, resolve(tmp))
            version = register_pipeline(
                tmp if saved.is_s3 else saved.path, tracking_uri=config.mlflow.tracking_uri,
                model_name=config.mlflow.registered_model,
                metrics={f"eval/{k}": v for k, v in metrics.items()},
                component_runs=components, dataset_uri=config.data.given_uri,
                manifest_hash=manifest_hash(config.data.uri), parent_run_id=parent,
                weights_marker=marker)
    report = EvalReport.from_json(stored.join("evaluation.json").read_text())
    promoted, reason = paired_gate(
        client, config.mlflow.registered_model, version, metric=config.eval.gate_metric,
        candidate=report, reps=config.eval.bootstrap_reps,
        champion_report=lambda champion: champion_report(config, champion, report, log))
    set_tags(client, parent, {"gate.decision": "promoted" if promoted else "not promoted",
                              "gate.reason": reason})
    log(f"[register] {config.mlflow.registered_model} version {version}: candidate; "
        f"{'champion' if promoted else 'not promoted'} ({reason})")
    return {"model": config.mlflow.registered_model, "version": version, "champion": promoted,
            "reason": reason}


def weights_marker(config: Config) -> str:
    """Short hash of the three stages' completion records: which weights a version holds."""
    return hashlib.sha256(trained_marker(config).encode()).hexdigest()[:16]


def report_artifact(config: Config, marker: str | None = None) -> str:
    return f"eval/by_weights/{marker or weights_marker(config)}.json"


def champion_report(config: Config, version: int | str, candidate: EvalReport,
                    log) -> EvalReport:
    """The champion's evaluation on the candidate's captions, seeds and evaluator: the one
    stored for its weights when it matches, else a fresh one (same code, same evaluator)."""
    from orchestration.registry.registry import SOURCE_RUN_TAG, WEIGHTS_TAG, resolve_model_uri

    client = client_for(config.mlflow.tracking_uri)
    name = config.mlflow.registered_model
    tags = client.get_model_version(name, str(version)).tags
    source, weights = tags.get(SOURCE_RUN_TAG), tags.get(WEIGHTS_TAG)
    if source and weights:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = client.download_artifacts(
                    source, report_artifact(config, weights), tmp)
                stored = EvalReport.from_json(Path(path).read_text())
                if candidate.comparable_with(stored) is None:
                    return stored
            except Exception:  # noqa: BLE001 - an older version without a report: re-score it
                pass
    log(f"[register] scoring champion v{version} on the same captions, seeds and evaluator")
    from models.unclip_pipeline import UnCLIPPipeline

    with tempfile.TemporaryDirectory() as tmp:
        directory = resolve_model_uri(f"models:/{name}/{version}",
                                      tracking_uri=config.mlflow.tracking_uri,
                                      dst_dir=Path(tmp) / "model")
        pipeline = UnCLIPPipeline.load(directory).eval()
        return evaluate_pipeline(config, pipeline, ensure_evaluator(config, log=log),
                                 Path(tmp) / "eval", log=log)


def _restore_candidate(client, model_name: str, version: int, alias: str) -> None:
    """Give `version` the alias every new version gets, if a crash came between registering
    it and setting the alias: the alias is unset or on an older version. (On a newer one it
    was moved on since, and stays.)"""
    from mlflow.exceptions import MlflowException

    try:
        current = int(client.get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        current = None
    if current is None or current < version:
        client.set_registered_model_alias(model_name, alias, str(version))


def format_summary(summary: dict, tracking_uri: str) -> str:
    """The stages as a table: status, time, key results, where the outputs are, MLflow run."""
    def run_link(run_id: str) -> str:
        if run_id and tracking_uri.startswith(("http://", "https://")):
            return (f"{tracking_uri.rstrip('/')}/#/experiments/{summary['experiment_id']}"
                    f"/runs/{run_id}")
        return run_id

    def cell(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    header = ("step", "status", "time", "results", "output", "MLflow run")
    lines = [[row["step"], row["status"], f"{row.get('seconds', 0):.0f}s",
              " ".join(f"{k}={cell(v)}" for k, v in row["metrics"].items()),
              row["output"], run_link(row["run_id"])] for row in summary.get("table", [])]
    widths = [max(len(str(r[i])) for r in [header, *lines]) for i in range(len(header))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
                     for r in [header, *lines])
