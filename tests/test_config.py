"""Config validation and CLI errors: one clear line naming the key and the fix."""

from __future__ import annotations

import pytest

from data_pipelines.storage import StorageError, resolve
from orchestration.config import ConfigError, flatten, load_config


def test_shipped_tiny_config_loads_with_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config("tiny")
    assert config.data.uri == str(tmp_path / "data/shapes-tiny")
    assert config.mlflow.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert config.data.build_shapes_if_missing
    assert load_config("configs/tiny.yaml").run_name == "tiny"


def test_overrides_are_typed():
    config = load_config("tiny", ["clip.steps=7", "deepspeed.zero_stage=2",
                                  "data.preprocess.crop_scale=[0.5, 0.9]", "ray.address=null"])
    assert config.clip.steps == 7 and config.deepspeed.zero_stage == 2
    assert config.data.preprocess.crop_scale == (0.5, 0.9)


@pytest.mark.parametrize(("overrides", "expected"), [
    (["clip.lrr=1"], "unknown key 'clip.lrr'"),
    (["clip.optim.lr=fast"], "clip.optim.lr: Input should be a valid number"),
    (["clip.optim.lr=-1"], "clip.optim.lr: Input should be greater than 0 (got -1)"),
    (["deepspeed.zero_stage=5"], "deepspeed.zero_stage"),
    (["deepspeed.precision=fp16"], "deepspeed.precision: Input should be 'auto', 'fp32' or 'bf16'"),
    (["deepspeed.offload_params=true"], "needs zero_stage 3"),
    (["data.shapes.include_position=true"], "data.preprocess.hflip"),
    (["mlflow.tracking_uri=http://alice:hunter2@mlflow:5000"], "credentials in the URI"),
    (["storage_root=s3://KEY:s3cr3tvalue@bucket/x"], "storage_root: credentials in the URI"),
    (["data.shapes.held_out=[[pink, hexagon]]"], "unknown pair (pink, hexagon)"),
    (["clip"], "expected key=value"),
    (["clip.steps.x=1"], "'steps' is a value"),
])
def test_bad_config_is_one_clear_line(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config("tiny", overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    assert "hunter2" not in message and "s3cr3tvalue" not in message


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("clip: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found: nope.yaml .*tiny"):
        load_config("nope.yaml")


def test_flatten_fits_mlflow_limits():
    flat = flatten(load_config("tiny"))
    assert flat["clip.optim.lr"] == "0.001"
    assert all(len(v) <= 500 for v in flat.values())


@pytest.mark.parametrize(("uri", "expected"), [
    ("gs://bucket/x", "unsupported URI scheme 'gs://'"),
    ("s3://", "no bucket"),
    ("", "empty storage URI"),
])
def test_bad_uris(uri, expected):
    with pytest.raises(StorageError, match=expected):
        resolve(uri)


def test_cli_reports_errors_in_one_line(run_cli, tmp_path, s3_endpoint):
    code, _, err = run_cli("data", "shapes", "--out", str(tmp_path / "x"), "--set", "clip.lrr=1")
    assert code == 2 and err.strip() == (
        "error: config error in " + str(load_config_path()) +
        ": unknown key 'clip.lrr'; remove it or check the spelling "
        "(see configs/tiny.yaml for every key)")
    code, _, err = run_cli("data", "inspect", str(tmp_path / "missing"))
    assert code == 2 and "no dataset at" in err and "unclip data shapes" in err
    code, _, err = run_cli("data", "inspect", "s3://no-such-bucket-here/data")
    assert code == 2 and err.count("\n") == 1 and "testing-secret" not in err
    assert "no dataset at s3://no-such-bucket-here/data" in err or "storage error" in err


def load_config_path():
    from orchestration.config import resolve_config_path

    return resolve_config_path(None)
