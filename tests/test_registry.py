"""The model registry with real MLflow: SQLite in tmp, a real `mlflow server`, `mlflow models
serve`. The pipeline is random and tiny (16x16, 3 sampling steps) so every call is fast."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import torch
from loopback import free_port
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image

from models.clip_model import build_clip
from models.decoder import DecoderConfig, UnCLIPDecoder
from models.prior import PriorConfig, UnCLIPPrior
from models.unclip_pipeline import UnCLIPPipeline
from orchestration.registry.registry import (
    CANDIDATE,
    CHAMPION,
    RegistryError,
    find_version,
    list_versions,
    paired_gate,
    promote,
    register_pipeline,
    resolve_model_uri,
)

MODEL = "unclip-test"
FD = "eval/fd_clip"
IMAGE_SIZE = 16
LINEAGE = {"component_runs": {"clip": "run-clip", "prior": "run-prior", "decoder": "run-dec"},
           "dataset_uri": "s3://bucket/shapes", "manifest_hash": "sha256:abc123"}
FAST = {"steps": 3, "seed": 7}


def report(scores, evaluator="shapes-evaluator@0123456789abcdef", seed=0):
    from orchestration.evaluate.evaluation import EvalReport

    return EvalReport(metrics={}, per_caption={"clip_score": list(scores)}, captions_sha="c",
                      seed=seed, evaluator=evaluator)


def gate(client, name, version, scores, champion_scores=None, **kwargs):
    """The paired gate with `scores` for the candidate and `champion_scores` for whichever
    version is champion."""
    return paired_gate(client, name, version, metric="clip_score", candidate=report(scores),
                       champion_report=lambda champion: champion_scores, **kwargs)


def save_tiny_pipeline(directory: Path) -> Path:
    """A random pipeline small enough to register, load and sample in about a second."""
    torch.manual_seed(0)
    clip = build_clip("shapes-tiny", context_length=16, text_layers=1, embed_dim=32)
    prior = UnCLIPPrior(config=PriorConfig(clip_embed_dim=32, text_width=64, context_length=16,
                                           width=32, layers=1, heads=2, num_timesteps=20))
    decoder = UnCLIPDecoder(config=DecoderConfig(
        image_size=IMAGE_SIZE, clip_embed_dim=32, base_channels=16, channel_mults=(1, 2),
        num_res_blocks=1, attention_resolutions=(8,), head_channels=16, num_timesteps=20))
    for param in decoder.parameters():  # an untrained decoder draws flat images; vary them
        torch.nn.init.normal_(param, std=0.05)
    pipeline = UnCLIPPipeline(clip=clip, prior=prior, decoder=decoder, context_length=16,
                              sampling={"prior_steps": 3, "steps": 3, "num_candidates": 1})
    pipeline.save(directory)
    return directory


def decode_png(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=2).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} not up after {timeout}s")


def start_process(args: list[str], log: Path, **env) -> subprocess.Popen:
    # Own session, so teardown can stop the server and the workers it forks, and only those.
    return subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, **env}, start_new_session=True)


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("pipeline") / "pipeline")


@pytest.fixture(scope="module")
def module_registry(tmp_path_factory, pipeline_dir):
    """SQLite MLflow with MODEL v1 registered from an (active) eval run and gated."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    experiment_id = mlflow.create_experiment("unclip-test", artifact_location=str(root / "art"))
    with mlflow.start_run(experiment_id=experiment_id, run_name="eval") as run:
        version = register_pipeline(pipeline_dir, tracking_uri=uri, model_name=MODEL,
                                    metrics={FD: 10.0, "eval/kid": 0.5},
                                    parent_run_id=run.info.run_id,
                                    sampling={"decoder_guidance": 2.5}, **LINEAGE)
    client = MlflowClient(uri, registry_uri=uri)
    first = gate(client, MODEL, version, [0.5] * 8)
    return SimpleNamespace(uri=uri, root=root, client=client, version=version,
                           run_id=run.info.run_id, experiment_id=experiment_id, gate=first)


@pytest.fixture
def registry(module_registry):
    # MLflow's tracking URI is process-global; other tests point it elsewhere.
    mlflow.set_tracking_uri(module_registry.uri)
    mlflow.set_registry_uri(module_registry.uri)
    return module_registry


def test_registered_version_has_candidate_alias_lineage_and_metrics(registry):
    assert registry.version == 1
    mv = registry.client.get_model_version(MODEL, "1")
    assert set(mv.aliases) == {CANDIDATE, CHAMPION}
    assert mv.tags["lineage.clip_run_id"] == "run-clip"
    assert mv.tags["lineage.decoder_run_id"] == "run-dec"
    assert mv.tags["lineage.dataset_uri"] == "s3://bucket/shapes"
    assert mv.tags["lineage.manifest_hash"] == "sha256:abc123"
    assert mv.tags["lineage.source_run_id"] == registry.run_id
    assert float(mv.tags[f"metric.{FD}"]) == 10.0
    assert registry.gate == (True, "v1 is the first champion")
    # Pinned runtime requirements and the copied `models` package travel with the model.
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/1"))
    requirements = (model_dir / "requirements.txt").read_text()
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements
    assert "open_clip_torch==" in requirements and "safetensors==" in requirements
    assert (model_dir / "code" / "models" / "unclip_pipeline.py").is_file()
    # The sampling override is baked into the pipeline config and the signature defaults.
    config = json.loads((model_dir / "artifacts/pipeline/config.json").read_text())
    assert config["sampling"]["decoder_guidance"] == 2.5
    params = mlflow.models.get_model_info(f"models:/{MODEL}/1").signature.params
    assert {p.name: p.default for p in params.params}["decoder_guidance"] == 2.5


def test_weights_are_found_again_instead_of_registered_twice(registry, pipeline_dir):
    """The pipeline asks `find_version` before registering, so a crash between registering
    and recording it locally does not make a second version of the same weights."""
    name = "unclip-once"
    assert find_version(registry.client, name, "weights-a") is None  # no such model yet
    version = register_pipeline(pipeline_dir, tracking_uri=registry.uri, model_name=name,
                                metrics={FD: 3.0}, weights_marker="weights-a", **LINEAGE)
    assert registry.client.get_model_version(name, str(version)).tags[
        "lineage.weights_marker"] == "weights-a"
    assert find_version(registry.client, name, "weights-a") == version == 1
    assert find_version(registry.client, name, "weights-b") is None


def test_paired_promotion_gate_and_explicit_promote(registry, pipeline_dir):
    name, client = "unclip-gate", registry.client
    rng = np.random.default_rng(0)
    difficulty = rng.normal(scale=0.2, size=64)  # per-caption: shared by every model

    def register(metrics, **kwargs):
        return register_pipeline(pipeline_dir, tracking_uri=registry.uri, model_name=name,
                                 metrics=metrics, **LINEAGE, **kwargs)

    # An eval run that already finished: reopened for logging and left FINISHED.
    finished = client.create_run(registry.experiment_id)
    client.set_terminated(finished.info.run_id)
    first = register({FD: 10.0}, parent_run_id=finished.info.run_id)
    assert client.get_run(finished.info.run_id).info.status == "FINISHED"
    champion_scores = report(0.5 + difficulty)
    assert gate(client, name, first, champion_scores.per_caption["clip_score"]) == (
        True, "v1 is the first champion")

    # better on average, but within the noise: not promoted
    noisy = 0.5 + difficulty + 0.002 + rng.normal(scale=0.05, size=64)
    worse = register({FD: 12.0}, experiment="unclip-test")  # a new run in the experiment
    promoted, reason = gate(client, name, worse, noisy, champion_scores)
    assert not promoted and reason.startswith(f"v{worse} clip_score +0.")
    assert "vs champion v1 (95% paired bootstrap interval [-0." in reason
    assert reason.endswith("over 64 captions, evaluator shapes-evaluator@0123456789abcdef): "
                           "not better beyond the uncertainty")
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == str(first)
    assert str(client.get_model_version_by_alias(name, CANDIDATE).version) == str(worse)
    tags = client.get_model_version(name, str(worse)).tags
    assert tags["gate.decision"] == "not promoted" and tags["gate.metric"] == "clip_score"
    assert float(tags["gate.low"]) < 0 < float(tags["gate.high"])
    assert tags["gate.champion_version"] == "1" and tags["gate.reason"] == reason

    # numbers made by another evaluator are never compared
    other = report(0.9 + difficulty, evaluator="other@ffff")
    promoted, reason = gate(client, name, worse, 0.6 + difficulty, other)
    assert not promoted and reason == (
        "cannot compare with champion v1 (different evaluators (shapes-evaluator@0123456789"
        "abcdef vs other@ffff)); compare by hand and promote explicitly")

    unmeasured = register({})
    promoted, reason = paired_gate(client, name, unmeasured, metric="r_precision",
                                   candidate=report([0.5] * 64),
                                   champion_report=lambda v: champion_scores)
    assert not promoted and "has no per-caption r_precision" in reason

    # a small gain on every caption is beyond the uncertainty: promoted
    better = register({FD: 4.0})
    promoted, reason = gate(client, name, better,
                            0.5 + difficulty + 0.02 + rng.normal(scale=0.01, size=64),
                            champion_scores)
    assert promoted and reason.endswith("better beyond the uncertainty")
    assert client.get_model_version(name, str(better)).tags["gate.decision"] == "promoted"
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == str(better)

    promote(name, worse, tracking_uri=registry.uri)  # explicit: ignores the metrics
    champion = client.get_model_version_by_alias(name, CHAMPION)
    assert str(champion.version) == str(worse) and champion.tags["promotion"] == "explicit"
    with pytest.raises(RegistryError) as missing:
        promote(name, 99, tracking_uri=registry.uri)
    assert str(missing.value) == (f"model '{name}' has no version 99 (it has: 1, 2, 3, 4); see "
                                  f"`unclip models list {name}`")
    with pytest.raises(RegistryError, match=r"^no registered model 'nope'; registered: .*"
                                            r"unclip-gate.* \(register one with `unclip "
                                            r"pipeline --only register`\)$"):
        promote("nope", 1, tracking_uri=registry.uri)

    rows = list_versions(name, tracking_uri=registry.uri)
    assert [r["version"] for r in rows] == [1, 2, 3, 4]
    assert rows[1]["aliases"] == [CHAMPION] and rows[3]["aliases"] == [CANDIDATE]
    assert rows[0]["metrics"] == {FD: 10.0} and rows[2]["metrics"] == {}
    assert rows[0]["created"].endswith("+00:00")
    with pytest.raises(RegistryError, match="no registered model 'nope'"):
        list_versions("nope", tracking_uri=registry.uri)


def test_resolve_model_uri_forms(registry, pipeline_dir, tmp_path):
    expected = json.loads((pipeline_dir / "config.json").read_text())["decoder"]
    for uri in (f"models:/{MODEL}@champion", f"models:/{MODEL}/1",
                f"runs:/{registry.run_id}/unclip-pipeline"):
        directory = resolve_model_uri(uri, tracking_uri=registry.uri, dst_dir=tmp_path / "dl")
        assert json.loads((directory / "config.json").read_text())["decoder"] == expected
    assert resolve_model_uri(str(pipeline_dir)) == pipeline_dir
    logged = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/1",
                                                      dst_path=str(tmp_path / "logged")))
    assert resolve_model_uri(str(logged)) == logged / "artifacts" / "pipeline"
    UnCLIPPipeline.load(resolve_model_uri(str(logged)))
    with pytest.raises(RegistryError, match="no such model directory"):
        resolve_model_uri(str(tmp_path / "missing"))
    with pytest.raises(RegistryError, match="neither a saved pipeline"):
        resolve_model_uri(str(tmp_path))
    with pytest.raises(RegistryError) as unset:
        resolve_model_uri(f"models:/{MODEL}@nope", tracking_uri=registry.uri)
    assert str(unset.value) == (
        f"models:/{MODEL}@nope: alias 'nope' is not set on model '{MODEL}' (set: candidate, "
        f"champion); use one of those, models:/{MODEL}/VERSION, or set it with `unclip models "
        f"promote {MODEL} VERSION` (champion)")
    with pytest.raises(RegistryError, match=rf"^model '{MODEL}' has no version 7 \(it has: 1\)"):
        resolve_model_uri(f"models:/{MODEL}/7", tracking_uri=registry.uri)


def test_serving_a_missing_alias_fails_before_serve_starts(registry, monkeypatch):
    from orchestration.serve import serving

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a model that does not exist")

    monkeypatch.setattr(serving, "connect", no_ray)
    with pytest.raises(RegistryError, match=rf"^models:/{MODEL}@staging: alias 'staging' is "
                                            "not set"):
        serving.run_server(f"models:/{MODEL}@staging", tracking_uri=registry.uri,
                           blocking=False)
    with pytest.raises(RegistryError, match="^no registered model 'nope'"):
        serving.run_server("models:/nope@champion", tracking_uri=registry.uri, blocking=False)


def test_pyfunc_generates_pngs_deterministically(registry):
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    prompts = pd.DataFrame({"prompt": ["a red circle", "a blue square"]})
    out = model.predict(prompts, params={"num_images": 2, **FAST})
    assert list(out.columns) == ["prompt", "image_index", "png_base64"]
    assert out["prompt"].tolist() == ["a red circle"] * 2 + ["a blue square"] * 2
    assert out["image_index"].tolist() == [0, 1, 0, 1]
    for text in out["png_base64"]:
        image = decode_png(text)
        assert image.format == "PNG" and image.size == (IMAGE_SIZE, IMAGE_SIZE)
    again = model.predict(prompts, params={"num_images": 2, **FAST})
    assert again["png_base64"].tolist() == out["png_base64"].tolist()
    other = model.predict(prompts, params={"num_images": 2, **FAST, "seed": 8})
    assert other["png_base64"].tolist() != out["png_base64"].tolist()
    # A dict of prompts works too; options outside the limits name the field and the limit.
    assert len(model.predict({"prompt": ["a", "b", "c"]}, params=FAST)) == 3
    with pytest.raises(Exception, match="num_images: must be between 1 and 8"):
        model.predict(prompts, params={"num_images": 9})
    with pytest.raises(Exception, match="sampler: must be one of ddpm, ddim"):
        model.predict(prompts, params={"sampler": "euler"})
    with pytest.raises(MlflowException, match=r"^prompt: between 1 and 32 prompts per call "
                                              r"\(got 33\)$") as too_many:
        model.predict(pd.DataFrame({"prompt": ["a red circle"] * 33}), params=FAST)
    assert too_many.value.error_code == "INVALID_PARAMETER_VALUE"  # what serving answers 400


def test_cli_pieces_list_promote_and_generate(registry, pipeline_dir, tmp_path):
    import typer
    from typer.testing import CliRunner

    from orchestration.serve.models_cli import generate, models_app

    app = typer.Typer()
    app.add_typer(models_app, name="models")
    app.command("generate")(generate)
    runner, tracking = CliRunner(), ["--tracking-uri", registry.uri]
    listed = runner.invoke(app, ["models", "list", MODEL, *tracking])
    assert listed.exit_code == 0, listed.output
    assert "candidate,champion" in listed.output and f"{FD}=10" in listed.output
    promoted = runner.invoke(app, ["models", "promote", MODEL, "1", *tracking])
    assert promoted.exit_code == 0 and f"models:/{MODEL}@champion" in promoted.output
    out = tmp_path / "grid.png"
    for model in (f"models:/{MODEL}@champion", str(pipeline_dir)):
        result = runner.invoke(app, ["generate", "--model", model, "--prompt", "a red circle",
                                     "--prompt", "a blue square", "--n", "2", "--steps", "2",
                                     "--out", str(out), *tracking])
        assert result.exit_code == 0, result.output
        assert Image.open(out).size == (2 * IMAGE_SIZE, 2 * IMAGE_SIZE)
    bad = runner.invoke(app, ["generate", "--model", str(pipeline_dir), "--prompt", "a",
                              "--n", "9"])
    assert isinstance(bad.exception, RegistryError)
    assert "--n: must be between 1 and 8 (got 9)" == str(bad.exception)


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    proc = start_process(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
         f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "art"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        tmp_path / "server.log", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", proc, timeout=90)
        yield url
    finally:
        stop_process(proc)


def test_register_and_load_through_mlflow_server(mlflow_server, pipeline_dir, tmp_path):
    version = register_pipeline(pipeline_dir, tracking_uri=mlflow_server, model_name=MODEL,
                                metrics={FD: 3.0}, experiment="remote", **LINEAGE)
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    assert gate(client, MODEL, version, [0.5] * 8)[0]
    assert list_versions(MODEL, tracking_uri=mlflow_server)[0]["aliases"] == [CANDIDATE,
                                                                               CHAMPION]
    directory = resolve_model_uri(f"models:/{MODEL}@champion", tracking_uri=mlflow_server,
                                  dst_dir=tmp_path / "dl")
    images = UnCLIPPipeline.load(directory).generate(["a red circle"], steps=2)
    assert images.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
    out = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion").predict(
        pd.DataFrame({"prompt": ["a green triangle"]}), params=FAST)
    assert decode_png(out["png_base64"][0]).size == (IMAGE_SIZE, IMAGE_SIZE)


# Installed in the serving processes through sitecustomize: importing the training code fails,
# and `models` must come from the copy inside the model (its code/ directory).
BLOCK_TRAINING_CODE = """
import importlib.abc, importlib.machinery, sys

class TrainingCodeBlocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"orchestration", "data_pipelines", "tuning"}:
            raise ImportError("training code imported by the served model: " + name)
        if name == "models":
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or "/code/models/" not in (spec.origin or ""):
                raise ImportError("models not loaded from the model's code/ copy")
            return spec
        return None

sys.meta_path.insert(0, TrainingCodeBlocker())
"""


@pytest.mark.slow
def test_mlflow_models_serve_answers_invocations(registry, tmp_path):
    """`mlflow models serve` of the champion, in processes that cannot import the training
    code: the registered model carries everything it needs."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCK_TRAINING_CODE)
    port = free_port()
    proc = start_process(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        tmp_path / "serve.log", MLFLOW_TRACKING_URI=registry.uri,
        PYTHONPATH=str(tmp_path / "site"),
        # It execs `uvicorn` by name: the venv's bin must be on PATH, as when activated.
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, timeout=120)
        body = {"dataframe_records": [{"prompt": "a red circle"}],
                "params": {"num_images": 2, **FAST}}
        response = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=60)
        assert response.status_code == 200, response.text
        rows = response.json()["predictions"]
        assert [row["image_index"] for row in rows] == [0, 1]
        assert decode_png(rows[0]["png_base64"]).size == (IMAGE_SIZE, IMAGE_SIZE)
        # A bad request gets the field-named reason Ray Serve gives, as MLflow's own 400 JSON
        # error (MLflow prefixes "Failed to predict data ..."), not its "unexpected error".
        bad_requests = [
            ({**body, "params": {"steps": 5000}}, "steps: must be between 1 and 1000 (got 5000)"),
            ({**body, "params": {"steps": 21}}, "steps: at most 20 for this model, whose decoder "
                                                "has 20 timesteps (got 21)"),
            ({"dataframe_records": [{"prompt": ""}]}, "prompt: must be a non-empty string"),
            ({"dataframe_records": [{"prompt": "x" * 201}]},
             "prompt: at most 200 characters (got 201)"),
        ]
        for request, reason in bad_requests:
            bad = requests.post(f"http://127.0.0.1:{port}/invocations", json=request,
                                timeout=60)
            assert bad.status_code == 400, bad.text
            error = bad.json()
            assert error["error_code"] == "INVALID_PARAMETER_VALUE"
            assert error["message"].endswith(f"Error: {reason}"), error["message"]
            assert "unexpected error" not in bad.text and "Traceback" not in bad.text
    finally:
        stop_process(proc)
