"""The whole DAG as a Ray job on a separate Ray head, tracked by a real `mlflow server`:
submitted, stopped mid-stage, resubmitted, finished without redoing the finished stages; then
resubmitted asking for more decoder steps, which continues the decoder from its checkpoint."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_registry import mlflow_server  # noqa: F401,F811  (fixture: a real mlflow server)
from test_submission import ray_head_process

from orchestration.jobs.submission import job_logs, job_status, stop_job, submit, wait_for_job
from orchestration.registry.registry import list_versions

pytestmark = pytest.mark.slow


def pipeline_overrides(tmp_path: Path, tracking_uri: str) -> list[str]:
    out = [f"data.uri={tmp_path}/shapes", f"storage_root={tmp_path}/runs", "run_name=e2e",
           f"mlflow.tracking_uri={tracking_uri}", "mlflow.registered_model=e2e-model",
           "data.shapes.train_size=160", "data.shapes.test_size=32",
           "data.shapes.samples_per_shard=80", "decoder.overrides={num_timesteps: 20}",
           "prior.overrides={num_timesteps: 20}", "sampling.decoder_steps=4",
           "sampling.prior_steps=4", "eval.num_captions=8",
           # a short reference evaluator: this test is about the bookkeeping, not its scores
           "eval.evaluator.clip.steps=16", "eval.evaluator.clip.batch_size=8",
           "eval.evaluator.clip.checkpoint_every=16"]
    for stage, steps in (("clip", 8), ("prior", 8), ("decoder", 16)):
        out += [f"{stage}.steps={steps}", f"{stage}.batch_size=8", f"{stage}.log_every=2",
                f"{stage}.checkpoint_every=4", f"{stage}.keep_checkpoints=1"]
    return out


def _logs(address: str, job_id: str) -> str:
    buffer = io.StringIO()
    job_logs(address, job_id, out=buffer)
    return buffer.getvalue()


def test_submitted_pipeline_stopped_mid_stage_then_resubmitted(tmp_path, mlflow_server,  # noqa: F811
                                                               monkeypatch):
    args = ["pipeline"]
    for item in pipeline_overrides(tmp_path, mlflow_server):
        args += ["--set", item]
    decoder_dir = tmp_path / "runs/e2e/decoder"
    with ray_head_process() as head:
        monkeypatch.setenv("RAY_AUTH_TOKEN", head.token)
        first = submit(head.address, args, config_path="configs/tiny.yaml")
        deadline = time.monotonic() + 900
        while not any(decoder_dir.glob("checkpoint_*/train_state.json")):
            finished = job_status(head.address, first).status.is_terminal()
            assert not finished and time.monotonic() < deadline, \
                _logs(head.address, first)[-3000:]
            time.sleep(2)
        stop_job(head.address, first)
        assert str(wait_for_job(head.address, first, timeout_s=120)) == "STOPPED"
        assert not (decoder_dir / "portable/DONE.json").exists()
        clip_done = (tmp_path / "runs/e2e/clip/portable/DONE.json").read_text()
        prior_done = (tmp_path / "runs/e2e/prior/portable/DONE.json").read_text()

        second = submit(head.address, args, config_path="configs/tiny.yaml")
        status = wait_for_job(head.address, second, timeout_s=900)
        logs = _logs(head.address, second)
        assert str(status) == "SUCCEEDED", logs[-3000:]
        assert "clip: complete, skipping" in logs and "prior: complete, skipping" in logs
        assert (tmp_path / "runs/e2e/clip/portable/DONE.json").read_text() == clip_done
        assert (tmp_path / "runs/e2e/prior/portable/DONE.json").read_text() == prior_done
        assert json.loads((decoder_dir / "portable/DONE.json").read_text())["step"] == 16
        versions = list_versions("e2e-model", tracking_uri=mlflow_server)
        assert len(versions) == 1 and set(versions[0]["aliases"]) == {"candidate", "champion"}

        # more decoder steps: the complete decoder continues from its 16-step checkpoint
        longer = submit(head.address, args + ["--set", "decoder.steps=24"],
                        config_path="configs/tiny.yaml")
        status = wait_for_job(head.address, longer, timeout_s=900)
        logs = _logs(head.address, longer)
        assert str(status) == "SUCCEEDED", logs[-3000:]
    assert "decoder: trained 16 of 24 steps; continuing from its latest checkpoint" in logs
    assert "prior: complete, skipping" in logs
    assert json.loads((decoder_dir / "portable/DONE.json").read_text())["step"] == 24
    versions = list_versions("e2e-model", tracking_uri=mlflow_server)
    assert [v["version"] for v in versions] == [1, 2] and "candidate" in versions[1]["aliases"]

    client = MlflowClient(mlflow_server)
    assert "eval/fd_clip" in versions[0]["metrics"]
    runs = client.search_runs([client.get_experiment_by_name("unclip-tiny").experiment_id])
    by_stage = {r.data.tags.get("unclip.stage"): r for r in runs}
    parent = by_stage["pipeline"]
    assert {"eval/fd_clip", "eval/precision", "eval/clip_score"} <= set(parent.data.metrics)
    for stage in ("clip", "prior", "decoder"):
        assert by_stage[stage].data.tags["mlflow.parentRunId"] == parent.info.run_id
    # the decoder resumed and continued in its own MLflow run: every logged step once
    steps = [m.step for m in client.get_metric_history(by_stage["decoder"].info.run_id, "loss")]
    assert sorted(set(steps)) == list(range(2, 25, 2))
    assert "eval/samples.png" in {a.path for a in client.list_artifacts(parent.info.run_id,
                                                                        "eval")}
