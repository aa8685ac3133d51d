"""Config validation and CLI errors: one clear line naming the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_pipelines.storage import StorageError, resolve
from orchestration.config import ConfigError, EvaluatorConfig, flatten, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_shipped_tiny_config_loads_with_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config("tiny")
    assert config.data.uri == str(tmp_path / "data/shapes-tiny")
    assert config.data.given_uri == "data/shapes-tiny"  # what registry and release record
    assert config.model_copy(deep=True).data.given_uri == "data/shapes-tiny"
    assert load_config("tiny", ["data.uri=s3://b/x"]).data.given_uri == "s3://b/x"
    assert config.mlflow.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert config.data.build_shapes_if_missing
    assert load_config("configs/tiny.yaml").run_name == "tiny"


@pytest.mark.parametrize("path", sorted(str(p) for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_validates(path):
    # every model section is checked by its task too (presets, overrides, cadences)
    config = load_config(path)
    assert config.run_name == Path(path).stem


def test_overrides_are_typed():
    config = load_config("tiny", ["clip.steps=7", "deepspeed.zero_stage=2",
                                  "data.preprocess.crop_scale=[0.5, 0.9]", "ray.address=null"])
    assert config.clip.steps == 7 and config.deepspeed.zero_stage == 2
    assert config.data.preprocess.crop_scale == (0.5, 0.9)


def test_override_inside_a_section_the_file_leaves_out_keeps_its_defaults(tmp_path):
    # the release's eval.yaml names only the evaluator's uri: one --set on its CLIP section
    # changes that key, the preset, batch and learning rate stay the schema's
    path = tmp_path / "short.yaml"
    path.write_text("run_name: short\ndata: {uri: data/shapes}\neval: {evaluator: {uri: x}}\n")
    default = EvaluatorConfig().clip
    config = load_config(path, ["eval.evaluator.clip.steps=6000",
                                "eval.evaluator.clip.optim.weight_decay=0.2"], check_models=False)
    clip = config.eval.evaluator.clip
    assert (clip.steps, clip.optim.weight_decay) == (6000, 0.2)
    assert (clip.preset, clip.batch_size, clip.optim.lr) == (default.preset, default.batch_size,
                                                              default.optim.lr)
    assert config.eval.evaluator.uri.endswith("x")


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
    (["scaling.num_workers=0"], "scaling.num_workers: Input should be greater than or equal to 1 "
                                "(got 0); fix it in the file or with --set scaling.num_workers"),
    (["clip.steps=ten"], "clip.steps: Input should be a valid integer"),
    (["decoder.steps=0"], "decoder: steps is 0 without init_from; set steps >= 1"),
    (["clip.batch_size=1"], "clip.batch_size: CLIP's contrastive loss needs at least 2 "
                            "image-text pairs per step over all workers"),
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


def _fields(model_cls, prefix=""):
    """(dotted key, field name) of every field of a pydantic config, sections included."""
    from pydantic import BaseModel

    for name, info in model_cls.model_fields.items():
        yield f"{prefix}{name}", name
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _fields(annotation, f"{prefix}{name}.")


def test_every_config_field_is_read_somewhere():
    """A key nobody reads is a promise the code does not keep (e.g. an `eval_every` that never
    decided when to evaluate). Every field must be read as an attribute outside its own
    definition line."""
    import re
    from pathlib import Path

    from orchestration.config import Config

    root = Path(__file__).resolve().parent.parent
    source = "\n".join(p.read_text() for package in ("orchestration", "tuning", "data_pipelines",
                                                     "models")
                       for p in (root / package).rglob("*.py"))
    unread = [key for key, name in _fields(Config)
              if not re.search(rf"\.{name}\b(?!\s*\()", source)]
    assert unread == []


def test_stage_sections_are_checked_by_their_tasks():
    cases = {
        "clip.preset=nope": "clip: unknown clip preset 'nope'",
        "prior.preset=nope": "prior: unknown prior preset 'nope'",
        "decoder.preset=nope": "decoder: unknown decoder preset 'nope'; known: [",
        "prior.overrides={bogus: 1}": "prior: unknown prior override key 'bogus'; valid keys:",
        "decoder.overrides={bogus: 1}": "decoder: unknown decoder override key 'bogus'",
        "clip.overrides={bogus: 1}": "clip: unknown CLIP override 'bogus'",
        "sampling.decoder_steps=101": "decoder: sampling.decoder_steps 101 exceeds the "
                                      "decoder's 100 timesteps; set sampling.decoder_steps <= 100",
        "sampling.prior_steps=101": "prior: sampling.prior_steps 101 exceeds the prior's 100 "
                                    "timesteps",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError) as err:
            load_config("tiny", [override])
        assert message in str(err.value), override
        assert "\n" not in str(err.value)


def test_checkpoints_follow_evaluations():
    config = load_config("tiny", ["clip.checkpoint_every=40"])
    assert config.clip.eval_every is None and config.clip.evaluation_interval == 40
    assert load_config("tiny", ["clip.eval_every=20", "clip.checkpoint_every=40"]
                       ).clip.evaluation_interval == 20
    with pytest.raises(ConfigError, match=r"clip: checkpoint_every \(30\) must be a multiple "
                                          r"of eval_every \(20\)"):
        load_config("tiny", ["clip.eval_every=20", "clip.checkpoint_every=30"])
