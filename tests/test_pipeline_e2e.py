"""The whole DAG on real components; killed mid-stage, rerun, finished without redoing work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestration.config import load_config
from orchestration.pipeline import run_pipeline
from orchestration.registry import list_versions

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def pipeline_overrides(tmp_path: Path) -> list[str]:
    out = [f"data.uri={tmp_path}/shapes", f"storage_root={tmp_path}/runs", "run_name=e2e",
           f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
           "mlflow.registered_model=e2e-model",
           "data.shapes.train_size=160", "data.shapes.test_size=32",
           "data.shapes.samples_per_shard=80", "scaling.cpus_per_worker=1",
           "decoder.overrides={num_timesteps: 20}", "prior.overrides={num_timesteps: 20}",
           "sampling.decoder_steps=4", "sampling.prior_steps=4", "eval.num_captions=8"]
    for stage, steps in (("clip", 8), ("prior", 8), ("decoder", 16)):
        out += [f"{stage}.steps={steps}", f"{stage}.batch_size=8", f"{stage}.log_every=2",
                f"{stage}.checkpoint_every=4", f"{stage}.keep_checkpoints=1"]
    return out


def _wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"pipeline exited early with {proc.returncode}")
        time.sleep(1)
    raise AssertionError("timed out waiting for the pipeline")


def test_kill_mid_stage_then_rerun_completes_without_redoing(tmp_path, ray_session,
                                                           monkeypatch):
    import ray

    overrides = pipeline_overrides(tmp_path)
    address = ray.get_runtime_context().gcs_address
    args = [sys.executable, "-m", "orchestration.cli", "pipeline", "--config", "tiny",
            "--set", f"ray.address={address}"]
    for item in overrides:
        args += ["--set", item]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    decoder_dir = tmp_path / "runs/e2e/decoder"
    try:
        _wait_for(lambda: any(decoder_dir.glob("checkpoint_*/train_state.json")), 900, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    clip_done = (tmp_path / "runs/e2e/clip/portable/DONE.json").read_text()
    prior_done = (tmp_path / "runs/e2e/prior/portable/DONE.json").read_text()
    assert not (decoder_dir / "portable/DONE.json").exists()

    monkeypatch.chdir(tmp_path)
    config = load_config("tiny", overrides)
    summary = run_pipeline(config)
    assert summary["stages"]["clip"] == "skipped (complete)"
    assert summary["stages"]["prior"] == "skipped (complete)"
    assert (tmp_path / "runs/e2e/clip/portable/DONE.json").read_text() == clip_done
    assert (tmp_path / "runs/e2e/prior/portable/DONE.json").read_text() == prior_done
    # the decoder resumed from its checkpoint, in the same MLflow run
    client = MlflowClient(config.mlflow.tracking_uri)
    history = client.get_metric_history(summary["stages"]["decoder"], "loss")
    assert {m.step for m in history} >= {2, 4, 16}
    assert json.loads((decoder_dir / "portable/DONE.json").read_text())["step"] == 16

    registry = summary["registry"]
    assert registry["version"] == 1 and registry["champion"]
    versions = list_versions("e2e-model", tracking_uri=config.mlflow.tracking_uri)
    assert set(versions[0]["aliases"]) == {"candidate", "champion"}
    assert "eval/fd_clip" in versions[0]["metrics"]
    parent = client.get_run(summary["parent_run_id"])
    assert "eval/fd_clip" in parent.data.metrics and "eval/precision" in parent.data.metrics
    grid = Path(summary["grid"])
    assert grid.exists() and grid.read_bytes()[:4] == b"\x89PNG"
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'")
    assert {r.data.tags["unclip.stage"] for r in children} == {"clip", "prior", "decoder"}

    again = run_pipeline(config)  # idempotent: nothing retrained, nothing re-registered
    assert all(v == "skipped (complete)" for k, v in again["stages"].items()
               if k in ("clip", "prior", "decoder"))
    assert again["registry"]["version"] == 1
    assert len(list_versions("e2e-model", tracking_uri=config.mlflow.tracking_uri)) == 1
