"""Half-written outputs are never taken for complete ones, and a killed run is picked up.

Every completion marker (a stage's portable/DONE.json, the embeddings' manifest.json, the
pipeline's eval and register DONE.json) is deleted before its output is rewritten, written
last, and kept in storage beside the output, so a rerun on another node sees it. A parent
MLflow run left RUNNING by a killed driver is ended KILLED by the rerun, and a crash between
registering and recording the registration does not register the weights twice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from stage_fixtures import FAST_OVERRIDES, save_trained_clip

from data_pipelines.storage import resolve
from orchestration import pipeline as pipeline_module
from orchestration.common.layout import DONE_FILE, pipeline_step_uri, portable_uri, stage_done
from orchestration.common.tracking import INTERRUPTED_TAG, INTERRUPTIONS_TAG, client_for
from orchestration.config import load_config
from orchestration.pipeline import PipelineRun, eval_marker, trained_marker
from orchestration.registry.registry import list_versions

REPO = Path(__file__).resolve().parents[1]
MODEL = "half-written-model"


def overrides(tmp_path: Path, data_uri: str, storage_root: str, *extra: str) -> list[str]:
    """The fast test config as --set items (the same list loads it in-process)."""
    return [f"data.uri={data_uri}", f"storage_root={storage_root}", "run_name=hw",
            f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            f"mlflow.registered_model={MODEL}", "data.shapes.train_size=48",
            "data.shapes.test_size=16", "data.shapes.samples_per_shard=16",
            "eval.num_captions=4", "eval.grid_prompts=[a red circle]",
            # the untrained CLIP of the run itself: enough to exercise the bookkeeping
            f"eval.evaluator.uri={storage_root}/hw/clip/portable", *FAST_OVERRIDES, *extra]


def build_dataset(config) -> None:
    from data_pipelines.shapes import build_shapes

    build_shapes(config.data.uri, config.data.shapes, fmt=config.data.format, use_ray=False)


def mark_done(config, stage: str) -> None:
    """As a finished stage leaves it: DONE.json records the configured steps."""
    step = getattr(config, stage).steps
    resolve(portable_uri(config, stage)).join(DONE_FILE).write_text(
        json.dumps({"step": step, "finished_unix": float(step)}))


def save_components(config) -> None:
    """Untrained portable weights of all three stages, each marked complete."""
    import torch

    from orchestration.stages import task_class
    from orchestration.train.tasks.base import save_portable

    save_trained_clip(config)
    for stage in ("prior", "decoder"):
        torch.manual_seed(0)
        task = task_class(stage)(config)
        model = task.build_model()
        save_portable(portable_uri(config, stage), stage, model, task.model_config(model))
    for stage in ("clip", "prior", "decoder"):
        mark_done(config, stage)


def finished_stage_runs(config) -> None:
    """The three stages' MLflow runs, as training leaves them (the registry links them)."""
    from orchestration.common.tracking import find_or_create_run

    client = client_for(config.mlflow.tracking_uri)
    for stage in ("clip", "prior", "decoder"):
        client.set_terminated(find_or_create_run(
            config, run_key=f"{config.run_name}/{stage}", run_name=stage))


def parent_run(config):
    client = MlflowClient(config.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(config.mlflow.experiment).experiment_id
    runs = client.search_runs([experiment], filter_string="tags.`unclip.stage` = 'pipeline'")
    assert len(runs) == 1
    return runs[0]


@pytest.fixture(scope="module")
def shapes_uri(tmp_path_factory) -> str:
    """A small rendered dataset, shared read-only by the pipeline-step tests."""
    root = tmp_path_factory.mktemp("shapes-data")
    config = load_config("tiny", overrides(root, str(root / "shapes"), str(root / "runs")))
    build_dataset(config)
    return config.data.uri


def test_interrupted_export_leaves_the_stage_incomplete(tmp_path):
    """A portable export that fails half-way (its checkpoint lacks the weights) leaves no
    DONE.json: the earlier one was deleted before the first file was replaced."""
    from ray.train import Checkpoint

    from orchestration.train.training_job import export_final

    config = load_config("tiny", overrides(tmp_path, str(tmp_path / "shapes"),
                                           str(tmp_path / "runs")))
    portable = tmp_path / "ckpt" / "portable"
    portable.mkdir(parents=True)
    (portable / "config.json").write_text('{"component": "clip"}')
    (portable / "weights.safetensors").write_bytes(b"old weights")
    export_final(config, "clip", Checkpoint.from_directory(str(tmp_path / "ckpt")), {"step": 4})
    assert stage_done(config, "clip")
    first = trained_marker(config)

    (portable / "config.json").write_text('{"component": "clip", "new": true}')
    (portable / "weights.safetensors").unlink()  # the copy of the weights will fail
    with pytest.raises(FileNotFoundError):
        export_final(config, "clip", Checkpoint.from_directory(str(tmp_path / "ckpt")),
                     {"step": 8})
    assert not stage_done(config, "clip")  # config.json is new, the weights are the old ones
    assert trained_marker(config) != first


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_crashed_embedding_run_leaves_no_manifest_and_the_prior_refuses(tmp_path, run_cli):
    """An embedding rerun that fails after writing the train split's shards (the test
    split's shards are corrupt: a real read failure) leaves no manifest - the old one went
    before the first new shard - and no stale shard; the prior refuses in one line."""
    from orchestration.pipeline import _embed_done
    from orchestration.train.embed_job import run_embed

    items = overrides(tmp_path, str(tmp_path / "shapes"), str(tmp_path / "runs"))
    config = load_config("tiny", items)
    build_dataset(config)
    save_trained_clip(config)
    mark_done(config, "clip")
    embeddings = Path(config.data.resolved_embeddings_uri)
    first = run_embed(config, log=lambda line: None)
    assert first["splits"]["train"]["num_samples"] == 48 and _embed_done(config)
    stale = embeddings / "train" / "stale-from-an-earlier-run.parquet"
    stale.write_bytes((embeddings / "train" / first["splits"]["train"]["shards"][0])
                      .read_bytes())

    for shard in (tmp_path / "shapes" / "test").iterdir():  # unreadable, though present
        shard.write_bytes(b"not a tar archive\n" * 64)
    with pytest.raises(Exception):  # noqa: B017  (what Ray Data raises for a corrupt shard)
        run_embed(config, log=lambda line: None)
    assert not (embeddings / "manifest.json").exists()
    assert not stale.exists()
    assert list((embeddings / "train").glob("*.parquet"))  # written before the failure
    assert not _embed_done(config)  # the pipeline embeds again

    args = ["train", "prior", "--config", "tiny"]
    for item in items:
        args += ["--set", item]
    code, _, err = run_cli(*args)
    assert code == 2
    assert err.strip().splitlines() == [
        f"error: no embeddings at {embeddings}; run `unclip embed` first"]


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("where", ["local", "s3"])
def test_pipeline_markers_in_storage_survive_a_crash_and_a_new_node(
        where, tmp_path, shapes_uri, request, monkeypatch):
    """eval and register keep their outputs and DONE markers in storage. The first attempt
    evaluates, registers and is killed before recording the registration; a rerun from an
    empty working directory (another node) skips eval, finds the version by its weights
    marker instead of registering again (restoring the `candidate` alias a crash a moment
    earlier would have lost), and records it; a third run skips both."""
    root = (f"{request.getfixturevalue('s3_bucket')}/runs" if where == "s3"
            else str(tmp_path / "runs"))
    config = load_config("tiny", overrides(tmp_path, shapes_uri, root))
    save_components(config)
    finished_stage_runs(config)
    eval_dir = resolve(pipeline_step_uri(config, "eval"))
    record = resolve(pipeline_step_uri(config, "register")).join(DONE_FILE)
    real_register = pipeline_module._register

    def register_then_die(*args, **kwargs):
        real_register(*args, **kwargs)
        raise SystemExit(143)  # stopped after registering, before the record is written

    node_a, node_b = tmp_path / "node-a", tmp_path / "node-b"
    node_a.mkdir()
    node_b.mkdir()
    monkeypatch.chdir(node_a)
    monkeypatch.setattr(pipeline_module, "_register", register_then_die)
    with pytest.raises(SystemExit):
        PipelineRun(config, ["eval", "register"], forced=set(), log=lambda line: None).run()
    monkeypatch.setattr(pipeline_module, "_register", real_register)
    assert json.loads(eval_dir.join(DONE_FILE).read_text())["marker"] == eval_marker(config)
    assert eval_dir.join("pipeline", "config.json").exists()
    assert eval_dir.join("metrics.json").exists()
    assert not record.exists()
    assert len(list_versions(MODEL, tracking_uri=config.mlflow.tracking_uri)) == 1
    assert parent_run(config).info.status == "KILLED"
    # as if killed a moment earlier, between creating the version and aliasing it
    client_for(config.mlflow.tracking_uri).delete_registered_model_alias(MODEL, "candidate")
    local = node_a / "outputs" / "hw"
    assert (local / "samples.png").exists() and (local / "pipeline" / "config.json").exists()
    assert not list(local.glob("*done*")) and not list(local.glob("registered*"))

    monkeypatch.chdir(node_b)
    lines: list[str] = []
    PipelineRun(config, ["eval", "register"], forced=set(), log=lines.append).run()
    assert "[pipeline] eval: complete for these weights, skipping" in lines
    assert "[register] version 1 already holds these weights" in lines
    versions = list_versions(MODEL, tracking_uri=config.mlflow.tracking_uri)
    assert [(v["version"], "candidate" in v["aliases"]) for v in versions] == [(1, True)]
    assert json.loads(record.read_text())["version"] == 1
    assert (node_b / "outputs/hw/samples.png").exists()  # copied from storage for people
    assert parent_run(config).info.status == "FINISHED"

    lines.clear()
    summary = PipelineRun(config, ["eval", "register"], forced=set(), log=lines.append).run()
    assert ("[pipeline] register: version 1 already holds these weights, skipping"
            in lines)
    assert summary["registry"]["version"] == 1
    assert len(list_versions(MODEL, tracking_uri=config.mlflow.tracking_uri)) == 1


@pytest.mark.usefixtures("ray_session")
def test_parent_run_left_running_by_a_killed_driver_is_ended_on_rerun(tmp_path, shapes_uri,
                                                                     monkeypatch):
    """SIGKILL leaves the pipeline's parent run RUNNING (nothing runs in the dying process);
    the rerun ends it KILLED with a tag saying so, then resumes it and finishes it."""
    items = overrides(tmp_path, shapes_uri, str(tmp_path / "runs"))
    script = textwrap.dedent(f"""
        import os, signal
        from orchestration.config import load_config
        from orchestration.common.tracking import find_or_create_run
        config = load_config("tiny", {items!r})
        find_or_create_run(config, run_key="hw/pipeline", run_name="hw-pipeline",
                           tags={{"unclip.stage": "pipeline"}})
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    killed = subprocess.run([sys.executable, "-c", script], cwd=REPO, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert killed.returncode == -9
    config = load_config("tiny", items)
    stale = parent_run(config)
    assert stale.info.status == "RUNNING" and INTERRUPTED_TAG not in stale.data.tags

    monkeypatch.chdir(tmp_path)  # outputs/hw/pipeline_summary.json lands here
    lines: list[str] = []
    PipelineRun(config, ["data"], forced=set(), log=lines.append).run()
    run = parent_run(config)
    assert run.info.run_id == stale.info.run_id and run.info.status == "FINISHED"
    assert "ended KILLED" in run.data.tags[INTERRUPTED_TAG]
    assert run.data.tags[INTERRUPTIONS_TAG] == "1"
    assert any("was left RUNNING by an attempt that was killed" in line for line in lines)


@pytest.mark.usefixtures("ray_session")
def test_gate_compares_a_continued_run_with_the_champions_own_report(tmp_path, shapes_uri,
                                                                     monkeypatch):
    """A second version from the same run name (a stage continued with more steps) shares the
    parent MLflow run, whose eval/evaluation.json it replaces; the gate still scores the
    champion by the report made for the champion's weights, not the candidate's."""
    import torch

    from orchestration.evaluate.evaluation import EvalReport
    from orchestration.stages import task_class
    from orchestration.train.tasks.base import save_portable

    config = load_config("tiny", overrides(tmp_path, shapes_uri, str(tmp_path / "runs")))
    save_components(config)
    finished_stage_runs(config)
    monkeypatch.chdir(tmp_path)
    PipelineRun(config, ["eval", "register"], forced=set(), log=lambda line: None).run()
    first = EvalReport.from_json(
        resolve(pipeline_step_uri(config, "eval")).join("evaluation.json").read_text())

    torch.manual_seed(1)  # the decoder trained further: other weights, a new DONE.json
    task = task_class("decoder")(config)
    model = task.build_model()
    with torch.no_grad():  # its output layer starts at zero: move every weight
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    save_portable(portable_uri(config, "decoder"), "decoder", model, task.model_config(model))
    resolve(portable_uri(config, "decoder")).join(DONE_FILE).write_text(
        json.dumps({"step": config.decoder.steps, "finished_unix": 2.0}))
    used = []
    real = pipeline_module.champion_report
    monkeypatch.setattr(pipeline_module, "champion_report",
                        lambda *args: used.append(real(*args)) or used[-1])
    lines: list[str] = []
    summary = PipelineRun(config, ["eval", "register"], forced=set(), log=lines.append).run()
    second = EvalReport.from_json(
        resolve(pipeline_step_uri(config, "eval")).join("evaluation.json").read_text())

    assert summary["registry"]["version"] == 2
    assert second.per_caption != first.per_caption  # other weights, other scores
    assert [report.per_caption for report in used] == [first.per_caption]
    assert not any("scoring champion" in line for line in lines)  # found, not re-scored
