"""Job submission and cluster configs.

The slow test runs a real Ray head as a separate process on loopback (token auth on), submits
an `unclip` command through the CLI and follows it to success. `ray_head` and
`ray_head_process` are reusable: `from test_submission import ray_head`.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
import yaml
from loopback import free_ports
from typer.testing import CliRunner

from orchestration.config import ConfigError, load_config
from orchestration.jobs.cli import register
from orchestration.jobs.submission import (
    PASSTHROUGH_ENV,
    REPO_ROOT,
    SubmissionError,
    auth_token,
    entrypoint_for,
    job_status,
    list_jobs,
    prepare_args,
    runtime_env_for,
    stop_job,
    submit,
    wait_for_job,
)

CLOSED_ADDRESS = "http://127.0.0.1:9"  # the discard port: nothing listens there


@dataclass
class RayHead:
    address: str  # dashboard / Jobs API URL
    gcs_address: str
    token: str
    temp_dir: str


def _ray_env(token: str) -> dict[str, str]:
    """The head's environment: token auth on, and none of the submitter's storage/MLflow
    settings, so a job can only see those if submission passed them."""
    hidden = set(PASSTHROUGH_ENV) | {"RAY_ADDRESS", "RAY_API_SERVER_ADDRESS",
                                     "RAY_AUTH_TOKEN_PATH"}
    env = {k: v for k, v in os.environ.items() if k not in hidden}
    venv_bin = str(Path(sys.executable).parent)  # the job's `python` is this venv's
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
               PATH=venv_bin + os.pathsep + env.get("PATH", ""))
    return env


def _processes_under(temp_dir: str) -> list[int]:
    """Pids whose command line names our head's temp dir (its workers and agents)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if temp_dir.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
    return pids


def _stop(proc: subprocess.Popen, temp_dir: str) -> None:
    # Never `ray stop`: it would also stop every other Ray instance on this machine.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)  # graceful first, so the GCS and raylet release their ports
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    deadline = time.monotonic() + 15  # workers notice their raylet is gone and exit
    while _processes_under(temp_dir) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in _processes_under(temp_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def ray_head_process(num_cpus: int = 2, start_timeout: float = 180.0):
    """A Ray head (GCS, raylet, dashboard + Jobs API) as its own process group on loopback.

    Every port is chosen free and the temp dir is private, so it coexists with other Ray
    instances on the machine (a pytest session's, a user's running job's).
    """
    token = secrets.token_hex(32)
    # Short path: Ray's unix sockets live under it and AF_UNIX paths stop at 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    worker_base = random.randrange(20000, 32000, 200)
    flags = ("--ray-client-server-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
             "--node-manager-port", "--object-manager-port")
    # Distinct by construction: two separately picked free ports can coincide.
    gcs_port, dashboard_port, *component_ports = free_ports(2 + len(flags))
    ports = dict(zip(flags, component_ports, strict=True))
    command = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
        "--include-dashboard=true", f"--num-cpus={num_cpus}", "--num-gpus=0",
        f"--temp-dir={temp_dir}", "--object-store-memory=300000000", "--disable-usage-stats",
        f"--min-worker-port={worker_base}", f"--max-worker-port={worker_base + 199}",
        *(f"{flag}={port}" for flag, port in ports.items()),
    ]
    log_path = Path(temp_dir) / "ray-start.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, env=_ray_env(token), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(f"http://127.0.0.1:{dashboard_port}", f"127.0.0.1:{gcs_port}", token,
                   temp_dir)
    try:
        _wait_until_ready(head, proc, log_path, start_timeout)
        yield head
    finally:
        _stop(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_until_ready(head: RayHead, proc: subprocess.Popen, log_path: Path,
                      timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_TOKEN", head.token)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited {proc.returncode}:\n"
                                   f"{log_path.read_text()[-3000:]}")
            with contextlib.suppress(SubmissionError):
                list_jobs(head.address)
                return
            time.sleep(1)
    raise RuntimeError(f"Ray head not serving jobs after {timeout:.0f}s:\n"
                       f"{log_path.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def ray_head():
    """A separate Ray head with token auth; submit with RAY_AUTH_TOKEN=ray_head.token."""
    with ray_head_process() as head:
        yield head


# ---------------------------------------------------------------- fast: configs and arguments


def test_cluster_yaml_is_a_valid_launcher_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO_ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))  # Ray's own schema + defaults

    assert raw["provider"]["type"] == "aws"
    images = [raw["docker"][key] for key in ("head_image", "worker_image")]
    assert all(image.startswith("rayproject/ray:2.60") for image in images)
    assert "gpu" in raw["docker"]["worker_image"] or "-cu" in raw["docker"]["worker_image"]
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))
    gpu_types = [t for name, t in types.items() if name != raw["head_node_type"]]
    assert gpu_types and all(t["node_config"]["InstanceType"].startswith(("g5", "p4", "p5"))
                             and t["min_workers"] == 0 and t["max_workers"] > 0
                             for t in gpu_types)
    setup = " ".join(raw["setup_commands"])
    assert "pip install --no-cache-dir -e ~/unclip-ray" in setup and "torch==2.14.1" in setup
    assert raw["file_mounts"]["~/unclip-ray"] == "."
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "RAY_AUTH_MODE=token ray start" in raw[key][-1]
    text = (REPO_ROOT / "cluster.yaml").read_text()
    assert "MLFLOW_TRACKING_URI=" in text
    for secret in ("AWS_SECRET_ACCESS_KEY=", "MLFLOW_TRACKING_PASSWORD=", "aws_secret"):
        assert secret not in text


def test_cluster_gpu_config_validates_and_its_models_build():
    import torch

    from models.clip_model import build_clip
    from models.presets import build_decoder_preset, build_prior_preset

    config = load_config("cluster-gpu")
    assert config.scaling.num_workers >= 8 and config.scaling.use_gpu
    assert config.deepspeed.precision == "bf16" and config.deepspeed.zero_stage in (2, 3)
    assert config.storage_root.startswith("s3://") and config.data.uri.startswith("s3://")
    assert config.mlflow.tracking_uri.startswith("http")
    size = config.data.preprocess.image_size
    with torch.device("meta"):  # full-size architectures, no memory
        clip = build_clip(config.clip.preset, context_length=config.data.preprocess.context_length,
                          **config.clip.overrides)
        embed_dim = clip.unclip_model_cfg["embed_dim"]
        width = clip.unclip_model_cfg["text_cfg"]["width"]
        build_prior_preset(config.prior.preset, clip_embed_dim=embed_dim, text_width=width,
                           context_length=config.data.preprocess.context_length,
                           **config.prior.overrides)
        decoder = build_decoder_preset(config.decoder.preset, clip_embed_dim=embed_dim,
                                       image_size=size, **config.decoder.overrides)
    assert clip.unclip_model_cfg["vision_cfg"]["image_size"] == size == 64
    assert decoder.config["image_size"] == 64


def test_bad_config_fails_before_submission_with_one_line(capsys):
    # CLOSED_ADDRESS would raise a connection SubmissionError if submission were attempted.
    with pytest.raises(ConfigError) as err:
        submit(CLOSED_ADDRESS, ["train", "clip", "--set", "clip.steps=-1"],
               config_path="configs/tiny.yaml")
    assert "clip.steps" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="not found"):
        submit(CLOSED_ADDRESS, ["pipeline"], config_path="configs/no-such.yaml")
    assert "submitted" not in capsys.readouterr().err


def test_unreachable_cluster_is_one_line_error():
    with pytest.raises(SubmissionError, match="cannot reach a Ray dashboard") as err:
        list_jobs(CLOSED_ADDRESS)
    assert "\n" not in str(err.value)


def test_args_entrypoint_and_runtime_env(monkeypatch, tmp_path):
    args, _ = prepare_args(["unclip", "pipeline", "--set", "eval.grid_prompts=[a red circle]"],
                           config_path=str(REPO_ROOT / "configs" / "tiny.yaml"))
    assert args == ["pipeline", "--set", "eval.grid_prompts=[a red circle]",
                    "--config", "configs/tiny.yaml"]
    assert entrypoint_for(args) == ("python -m orchestration.cli pipeline "
                                    "--set 'eval.grid_prompts=[a red circle]' "
                                    "--config configs/tiny.yaml")
    # A --config the command names wins; a shipped name resolves to the shipped file.
    args, warnings = prepare_args(["train", "clip", "--config", "tiny"], config_path="other")
    assert args == ["train", "clip", "--config", "configs/tiny.yaml"]
    assert any("storage_root=runs" in w for w in warnings)
    # sweeps are ordinary commands: their config is checked before submitting too
    args, _ = prepare_args(["tune", "lr", "--stage", "clip", "--samples", "4",
                            "--set", "clip.steps=100"], config_path="configs/tiny.yaml")
    assert entrypoint_for(args) == ("python -m orchestration.cli tune lr --stage clip "
                                    "--samples 4 --set clip.steps=100 --config configs/tiny.yaml")
    with pytest.raises(ConfigError, match="clip.steps"):
        prepare_args(["tune", "lr", "--set", "clip.steps=-1"], config_path="configs/tiny.yaml")
    outside = tmp_path / "mine.yaml"
    outside.write_text("run_name: mine\n")
    with pytest.raises(SubmissionError, match="outside the working dir"):
        prepare_args(["pipeline"], config_path=str(outside))
    with pytest.raises(SubmissionError, match="nothing to run"):
        prepare_args([])

    for name in PASSTHROUGH_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cret")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "")  # set but empty: not passed
    env = runtime_env_for()  # by default only settings travel, never credentials
    assert env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    assert runtime_env_for(env_passthrough=PASSTHROUGH_ENV)["env_vars"] == {
        "AWS_SECRET_ACCESS_KEY": "s3cret", "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    assert env["working_dir"] == str(REPO_ROOT)
    assert {".venv", ".git", "/data", "mlruns", "mlflow.db"} <= set(env["excludes"])


def test_auth_token_lookup(monkeypatch, tmp_path):
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert auth_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert auth_token() == "from-home"
    token_file = tmp_path / "token"
    token_file.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    assert auth_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert auth_token() == "from-env"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert auth_token() is None
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(SubmissionError, match="RAY_AUTH_TOKEN_PATH"):
        auth_token()


# ------------------------------------------------------------- slow: a real separate cluster


def _cli() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """unclip (submission commands only)"""

    register(app)
    return app


@pytest.mark.slow
def test_submit_follow_and_inspect_a_job_on_a_separate_cluster(ray_head, s3_bucket,
                                                               monkeypatch):
    import boto3

    sentinel = f"sentinel-{uuid.uuid4().hex}"
    for name in PASSTHROUGH_ENV:
        if name not in ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_REGION"):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", sentinel)  # moto accepts any secret
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head.token)
    cli, runner, address = _cli(), CliRunner(), ray_head.address
    out_uri = f"{s3_bucket}/shapes"

    # By default credentials stay here: the job record on the cluster never holds them.
    held = runner.invoke(cli, ["submit", "--address", address, "--", "presets"])
    assert held.exit_code == 0, held.output
    held_id = held.stdout.strip().splitlines()[-1]
    assert "not passing AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY: the cluster uses its own " \
           "credentials (--forward-secrets passes them)" in held.output
    record = job_status(address, held_id)
    assert sentinel not in repr(record) and sentinel not in str(record.runtime_env)
    assert sentinel not in str([job.runtime_env for job in list_jobs(address)])
    stop_job(address, held_id)

    start = time.monotonic()
    result = runner.invoke(cli, [
        "submit", "--address", address, "--config", "configs/tiny.yaml", "--forward-secrets",
        "--", "data", "shapes", "--out", out_uri, "--set", "data.shapes.train_size=50",
        "--set", "data.shapes.test_size=10", "--set", "data.shapes.samples_per_shard=25"])
    assert result.exit_code == 0, result.output
    job_id = result.stdout.strip().splitlines()[-1]
    assert job_id.startswith("raysubmit_")
    assert "passing AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL_S3, AWS_REGION, " \
           "AWS_SECRET_ACCESS_KEY to the job" in result.output
    assert "warning: --forward-secrets stores these values in the Ray cluster's job " \
           "table" in result.output

    status = wait_for_job(address, job_id, timeout_s=420)
    follow = runner.invoke(cli, ["jobs", "logs", job_id, "--follow", "--address", address])
    assert str(status) == "SUCCEEDED", follow.output
    print(f"job {job_id} finished in {time.monotonic() - start:.0f}s")
    wrote = [line for line in follow.stdout.splitlines() if line.startswith("wrote 60 samples")]
    assert wrote and "train=50" in wrote[0] and f"to {out_uri} " in wrote[0], follow.stdout

    status_out = runner.invoke(cli, ["jobs", "status", job_id, "--address", address])
    assert status_out.exit_code == 0 and f"{job_id}: SUCCEEDED" in status_out.stdout
    listed = runner.invoke(cli, ["jobs", "list", "--address", address])
    assert job_id in listed.stdout

    # The job wrote through the passed-through S3 settings, yet never showed the secret.
    bucket = s3_bucket.removeprefix("s3://")
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]]
    assert "shapes/manifest.json" in keys
    for output in (result.output, follow.output, status_out.output, listed.output):
        assert sentinel not in output

    # A wrong token is refused with a one-line hint, not a stack of HTTP details.
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    with pytest.raises(SubmissionError, match="rejected the Ray auth token") as err:
        list_jobs(address)
    assert "\n" not in str(err.value)


def _leaked(secrets_by_name: dict[str, str], data: str | bytes) -> list[str]:
    """Names of the secrets whose values occur in `data`."""
    raw = data.encode() if isinstance(data, str) else data
    return [name for name, value in secrets_by_name.items() if value.encode() in raw]


@pytest.mark.slow
def test_job_secrets_stay_out_of_logs_mlflow_artifacts_and_job_record(ray_head, tmp_path,
                                                                     monkeypatch):
    """A training job whose environment holds every kind of secret (forwarded, so the job's
    processes really have them) writes none of them to its logs, the MLflow store (params,
    tags, metric keys, every artifact file), its checkpoints or its job record outside the
    runtime_env env_vars that --forward-secrets puts there, with a warning."""
    import io

    from mlflow.tracking import MlflowClient

    from orchestration.jobs.submission import SECRET_ENV, job_logs

    marker = uuid.uuid4().hex
    fakes = {name: f"fake-{name.lower().replace('_', '-')}-{marker}" for name in SECRET_ENV}
    for name in PASSTHROUGH_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in fakes.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head.token)
    secrets_by_name = {**fakes, "RAY_AUTH_TOKEN": ray_head.token}

    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    # The experiment tiny.yaml names, with its artifacts here (MLflow's default would be
    # ./mlruns inside the job's temporary working_dir copy).
    MlflowClient(tracking_uri).create_experiment("unclip-tiny",
                                                 artifact_location=str(tmp_path / "artifacts"))
    overrides = [f"data.uri={tmp_path}/data", "data.shapes.train_size=64",
                 "data.shapes.test_size=16", "data.shapes.samples_per_shard=32",
                 f"storage_root={tmp_path}/runs", f"mlflow.tracking_uri={tracking_uri}",
                 "run_name=secrets", "clip.steps=2", "clip.batch_size=8", "clip.log_every=1",
                 "clip.checkpoint_every=2", "scaling.torch_threads=1"]
    start = time.monotonic()
    result = CliRunner().invoke(_cli(), [
        "submit", "--address", ray_head.address, "--config", "configs/tiny.yaml",
        "--forward-secrets", "--", "train", "clip",
        *[arg for item in overrides for arg in ("--set", item)]])
    assert result.exit_code == 0, result.output
    job_id = result.stdout.strip().splitlines()[-1]
    status = wait_for_job(ray_head.address, job_id, timeout_s=600)
    logs = job_logs(ray_head.address, job_id, out=io.StringIO())
    assert str(status) == "SUCCEEDED", logs[-3000:]
    print(f"training job {job_id} finished in {time.monotonic() - start:.0f}s")
    assert logs.strip()
    assert _leaked(secrets_by_name, result.output) == []
    assert _leaked(secrets_by_name, logs) == []

    # The MLflow store: every param (key and value), tag, metric key and run name ...
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("unclip-tiny").experiment_id])
    assert runs and runs[0].data.metrics and runs[0].data.params
    for run in runs:
        fields = [run.info.run_name, *run.data.params, *run.data.params.values(),
                  *run.data.tags, *run.data.tags.values(), *run.data.metrics]
        assert _leaked(secrets_by_name, "\n".join(map(str, fields))) == [], run.info.run_id
    # ... the database file itself, every artifact file and everything under storage_root.
    files = [tmp_path / "mlflow.db", *(p for folder in ("artifacts", "runs")
                                        for p in (tmp_path / folder).rglob("*") if p.is_file())]
    assert any(p.name == "resolved.yaml" for p in files)  # the logged config artifact
    assert any("checkpoint" in str(p) for p in files)
    for path in files:
        assert _leaked(secrets_by_name, path.read_bytes()) == [], path

    # The job record holds the forwarded values only in runtime_env.env_vars (what
    # --forward-secrets is documented to do); nowhere else: entrypoint, metadata, message.
    record = job_status(ray_head.address, job_id)
    assert record.runtime_env["env_vars"].keys() >= set(fakes)
    rest = record.model_dump() if hasattr(record, "model_dump") else record.dict()
    rest["runtime_env"] = {k: v for k, v in rest["runtime_env"].items() if k != "env_vars"}
    assert _leaked(secrets_by_name, repr(rest)) == []
    assert _leaked({"RAY_AUTH_TOKEN": ray_head.token}, repr(record)) == []
