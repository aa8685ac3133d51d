"""Shared fixtures: one real S3 endpoint (moto server) and one Ray instance per test run.

The S3 environment is set before Ray starts, so Ray workers inherit the endpoint override
exactly the way they would inherit a real cluster's AWS settings.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
from loopback import TEST_KEY_ID, TEST_SECRET, free_port, wait_for_port


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real HTTP S3 endpoint on loopback (moto's server mode) in its own process."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_for_port(port)
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": TEST_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": TEST_SECRET,
        "AWS_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A fresh bucket on the test endpoint; returns its s3:// URI."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    """One local Ray instance for the whole run (started after the S3 env is in place)."""
    import ray

    # "local": always a fresh instance, never a stale cluster recorded in /tmp/ray
    # with the dashboard, as in `connect`: Train's placement-group cleaner needs the state API
    from orchestration.common.ray_runtime import configure_ray_data, init_local

    init_local(num_cpus=2, log_to_driver=False)
    configure_ray_data()
    yield ray
    ray.shutdown()


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """Run the `unclip` CLI in-process; returns (exit_code, stdout, stderr)."""
    from orchestration.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["unclip", *args])
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def faulty_s3_endpoint(s3_endpoint, monkeypatch):
    """The test S3 endpoint behind a fault-injecting proxy (`s3_fault_proxy.S3FaultProxy`:
    10% of requests get 500 InternalError / 503 SlowDown / a dropped connection, 10% are
    delayed; seeded). AWS_ENDPOINT_URL_S3 points at the proxy for the test, so storage built
    in this process goes through it; yields the proxy (`.url`, `.counts()`, `.injected()`).

    Ray workers of `ray_session` keep the direct endpoint in their environment: only
    filesystem objects made here and shipped to them (Ray Data reads and writes) go through
    the proxy."""
    from s3_fault_proxy import S3FaultProxy

    with S3FaultProxy(s3_endpoint, fault_rate=0.1, latency_rate=0.1, seed=42) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
        yield proxy
