"""`has_credentials`: the one check for secrets embedded in a URI (any scheme)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from data_pipelines.storage import has_credentials

WITH_CREDENTIALS = [
    # user:password@ in the authority
    "s3://AKIAEXAMPLE:secret@bucket/prefix",
    "https://user:pass@mlflow.example.com",
    "http://user:@host:5000",
    "http://:pw@host",
    "postgresql://mlflow:hunter2@db:5432/mlflow",
    "postgresql+psycopg2://u:p@db/mlflow",
    "databricks://profile:token@workspace",
    "ray://user:pw@head:10001",
    "HTTPS://User:Pw@Host",
    # a bare token / user before @
    "https://ghp_TOKEN@github.com/org/repo",
    "https://TOKEN@host",
    "postgresql://mlflow@db/mlflow",
    # secrets in the query string or fragment, any case
    "https://host/api?token=abc",
    "http://127.0.0.1:5000?access_token=abc",
    "https://bucket.s3.amazonaws.com/key?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIA%2F20240101&X-Amz-Signature=deadbeef",
    "https://host/x?x-amz-signature=deadbeef",
    "https://host/x?X-Amz-Credential=AKIA",
    "https://host/x?X-Amz-Security-Token=abc",
    "postgresql://db/mlflow?password=hunter2",
    "postgresql://db/mlflow?user=mlflow&PASSWORD=hunter2",
    "s3://bucket/key?secret=abc",
    "https://acct.blob.core.windows.net/c/blob?sv=2022-11-02&sig=abc%3D",
    "https://host/x?Signature=abc",
    "https://host/x?api_key=abc",
    "https://host/x?apikey=abc",
    "https://host/x?API-KEY=abc",
    "https://host/x?client_secret=abc",
    "https://host/cb#access_token=abc&state=1",
    "models:/name@champion?token=abc",
    "sqlite:///abs/mlflow.db?password=x",
    "https://host/x?%74oken=abc",  # percent-encoded parameter name
]

WITHOUT_CREDENTIALS = [
    "",
    "s3://bucket/key",
    "s3://bucket/prefix/with@sign/in/path",
    "s3://bucket",
    "sqlite:///abs/mlflow.db",
    "sqlite:///mlflow.db",
    "http://127.0.0.1:5000",
    "https://mlflow.example.com/path?experiment=3&run=abc",
    "https://host/x?token=",  # present but empty: nothing secret in the URI
    "https://host/x?tokens=3&signed=1&keyword=a",
    "https://host/x#section",
    "models:/name@champion",
    "models:/name/3",
    "models:/unclip-shapes@candidate",
    "ray://host:10001",
    "ray://head-node.cluster.local:10001",
    "databricks",
    "databricks://profile",
    "file:///data/x@y",
    "postgresql://db:5432/mlflow",
    "/abs/local/path",
    "relative/path@v2",
    "user@host:path",  # scp-like, no scheme: not a URI
    "runs:/0123abcd/unclip-pipeline",
]


@pytest.mark.parametrize("uri", WITH_CREDENTIALS)
def test_detects_credentials(uri):
    assert has_credentials(uri) is True


@pytest.mark.parametrize("uri", WITHOUT_CREDENTIALS)
def test_plain_uris_are_not_credentials(uri):
    assert has_credentials(uri) is False


@pytest.mark.parametrize("uri", ["http://[::1", "https://host/x?%zz=%", "s3://?&&=&=="])
def test_malformed_uris_do_not_raise(uri):
    assert has_credentials(uri) is False


def test_registry_uses_the_shared_check():
    from orchestration.registry import registry

    assert registry.has_credentials is has_credentials


def test_importing_storage_stays_light():
    code = ("import sys, data_pipelines.storage, data_pipelines.settings; "
            "print(sorted(m for m in ('pyarrow', 'boto3', 'torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
