"""`unclip release`: a model as a small folder of fp16 weights that loads like any pipeline and
re-checks its own numbers with `unclip eval --model <folder>`; the decoder-only ablations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_evaluation import save_random_evaluator
from test_tuning import save_small_pipeline

from data_pipelines.shapes import build_shapes
from data_pipelines.shards import manifest_hash
from data_pipelines.storage import StorageError
from models.unclip_pipeline import COMPONENTS, UnCLIPPipeline
from orchestration.config import load_config
from orchestration.evaluate.evaluation import held_out_rows
from orchestration.evaluate.evaluator import load_evaluator
from orchestration.release import half_parameters

SETTINGS = ["data.uri=data/shapes", "storage_root=runs", "mlflow.tracking_uri=sqlite:///mlflow.db",
            "data.shapes.train_size=256", "data.shapes.test_size=32",
            "data.shapes.samples_per_shard=128", "eval.num_captions=32",
            "eval.bootstrap_reps=100", "scaling.torch_threads=1"]


def _sets(*overrides: str) -> list[str]:
    return [arg for item in [*SETTINGS, *overrides] for arg in ("--set", item)]


def test_half_parameters_keep_buffers_at_their_precision():
    from models.prior import PriorConfig, UnCLIPPrior

    prior = UnCLIPPrior(config=PriorConfig(clip_embed_dim=8, width=16, layers=1, heads=2,
                                           num_timesteps=10))
    prior.set_normalisation(torch.randn(32, 8) * 1e-3 + 1.0)  # fp16 would round these
    state, halved = prior.state_dict(), half_parameters(prior)
    params = dict(prior.named_parameters())
    assert list(halved) == list(state)
    assert [name for name in state if name not in params] == ["emb_mean", "emb_std"]
    for name, value in halved.items():
        if name in params:
            assert value.dtype == torch.float16 and torch.equal(value, state[name].half())
        else:
            assert value.dtype == torch.float32 and torch.equal(value, state[name])


@pytest.mark.usefixtures("ray_session")
def test_a_release_is_fp16_loads_as_a_pipeline_and_re_checks_its_numbers(tmp_path, monkeypatch,
                                                                         run_cli):
    monkeypatch.chdir(tmp_path)  # the release's dataset recipe is relative: data/shapes
    config = load_config("tiny", SETTINGS)
    build_shapes(config.data.uri, config.data.shapes, fmt="webdataset", use_ray=False)
    save_small_pipeline(tmp_path / "model")
    save_random_evaluator(tmp_path / "ev")

    code, out, err = run_cli("release", "--model", "model", "--out", "release/shapes",
                             "-c", "tiny", *_sets(f"eval.evaluator.uri={tmp_path / 'ev'}"))
    assert code == 0, err
    release = tmp_path / "release" / "shapes"
    assert not (tmp_path / "release" / "shapes.partial").exists()
    for name in COMPONENTS:
        source = load_file(str(tmp_path / "model" / f"{name}.safetensors"))
        written = load_file(str(release / f"{name}.safetensors"))
        assert sorted(written) == sorted(source)
        assert any(v.dtype == torch.float16 for v in written.values())
        for key, value in written.items():
            expected = source[key].half() if value.dtype == torch.float16 else source[key]
            assert torch.equal(value, expected), key
    pipeline = UnCLIPPipeline.load(release)  # fp16 files load into the fp32 models
    assert {p.dtype for p in pipeline.parameters()} == {torch.float32}

    facts = json.loads((release / "release.json").read_text())
    assert facts["eval"]["metrics"] == json.loads((release / "eval" / "metrics.json").read_text())
    assert facts["evaluator"]["identity"] == load_evaluator(str(release / "evaluator")).identity
    assert facts["evaluator"]["trained_as"] == load_evaluator(str(tmp_path / "ev")).identity
    assert facts["dataset"]["manifest_hash"] == manifest_hash(config.data.uri)
    assert facts["source"] == {"model_uri": "model"}
    recipe = yaml.safe_load((release / "eval.yaml").read_text())
    assert recipe["data"]["uri"] == "data/shapes" and recipe["eval"]["evaluator"] == {
        "uri": "evaluator"}

    # no -c: the release's own recipe and evaluator, and the same numbers as released
    code, out, err = run_cli("eval", "--model", "release/shapes", "--out", "recheck")
    assert code == 0, err
    table = out[out.index("metric "):].splitlines()[1:]
    assert "note:" not in out
    assert len(table) >= 10
    for row in table:
        name, now, released = row.split()
        assert now == released, name

    # re-released with another evaluator: the same weights, rescored, the lineage kept
    save_random_evaluator(tmp_path / "ev2", seed=1)
    weights = {name: load_file(str(release / f"{name}.safetensors")) for name in COMPONENTS}
    code, out, err = run_cli("release", "--model", "release/shapes", "--out", "release/shapes",
                             "--overwrite", "-c", "tiny",
                             *_sets(f"eval.evaluator.uri={tmp_path / 'ev2'}"))
    assert code == 0, err
    for name in COMPONENTS:
        rewritten = load_file(str(release / f"{name}.safetensors"))
        assert all(torch.equal(rewritten[k], weights[name][k]) for k in weights[name]), name
    again = json.loads((release / "release.json").read_text())
    assert again["evaluator"]["trained_as"] == load_evaluator(str(tmp_path / "ev2")).identity
    assert again["evaluator"]["identity"] != facts["evaluator"]["identity"]
    earlier = again["source"].pop("re_released_from")
    assert again["source"] == facts["source"]
    assert earlier["evaluator"] == facts["evaluator"]["identity"]
    assert earlier["metrics"]["attr_colour"] == facts["eval"]["metrics"]["attr_colour"]


@pytest.mark.usefixtures("ray_session")
def test_ablations_condition_the_decoder_on_the_true_image_or_the_text(tmp_path, monkeypatch,
                                                                       run_cli):
    """`unclip eval --conditioning`: which embedding reaches the decoder (the pipeline method
    itself is checked in tests/models/test_pipeline.py)."""
    monkeypatch.chdir(tmp_path)
    config = load_config("tiny", SETTINGS)
    build_shapes(config.data.uri, config.data.shapes, fmt="webdataset", use_ray=False)
    save_small_pipeline(tmp_path / "model")
    save_random_evaluator(tmp_path / "ev")
    calls = []
    real = UnCLIPPipeline.generate_without_prior

    def spy(self, prompts, *, image_emb=None, **kwargs):
        expected = None
        if image_emb is not None:
            rows = held_out_rows(config, config.eval.num_captions)
            expected = self.clip.encode_image(torch.from_numpy(np.array(rows["image"])),
                                              normalize=True)
        calls.append((list(prompts), image_emb, expected))
        return real(self, prompts, image_emb=image_emb, **kwargs)

    monkeypatch.setattr(UnCLIPPipeline, "generate_without_prior", spy)
    for conditioning in ("image", "text"):
        code, out, err = run_cli("eval", "--model", "model", "--conditioning", conditioning,
                                 "-c", "tiny", *_sets(f"eval.evaluator.uri={tmp_path / 'ev'}"))
        assert code == 0, err
        assert {"image": "decoder-only reconstruction from the true image's CLIP embedding",
                "text": "no prior: the CLIP text embedding fed straight to the decoder"
                }[conditioning] in err
        assert (tmp_path / "outputs" / f"eval-model-{conditioning}" / "metrics.json").is_file()
    captions = [str(c) for c in held_out_rows(config, 32)["caption"]]
    (image_prompts, image_emb, expected), (text_prompts, text_emb, _) = calls
    assert image_prompts == text_prompts == captions
    assert torch.equal(image_emb, expected) and text_emb is None
    code, _, err = run_cli("eval", "--model", "model", "--conditioning", "clip")
    assert code != 0 and "--conditioning 'clip': use prior, image or text" in err


def test_a_release_without_its_evaluator_is_one_line_before_any_work(tmp_path, monkeypatch,
                                                                     run_cli):
    monkeypatch.chdir(tmp_path)
    config = load_config("tiny", SETTINGS)
    build_shapes(config.data.uri, config.data.shapes, fmt="webdataset", use_ray=False)
    save_small_pipeline(tmp_path / "model")
    code, _, err = run_cli("release", "--model", "model", "--out", "release/shapes", "-c", "tiny",
                           *_sets())
    assert code != 0
    assert err.strip().splitlines()[-1].endswith(
        "a release ships the evaluator its numbers were made with; run `unclip eval` with this "
        "config first (it trains the dataset's evaluator once) or set eval.evaluator.uri")
    assert not (tmp_path / "release").exists()


def test_a_release_folder_as_init_from_gives_its_component(tmp_path, monkeypatch):
    """A saved pipeline (or a release: the same layout) as a stage's init_from: that component
    is exported as portable weights equal to the pipeline's, which a `steps: 0` stage takes
    as they are."""
    from orchestration.train.tasks.base import load_portable
    from orchestration.train.training_job import resolve_init_from

    monkeypatch.chdir(tmp_path)
    save_small_pipeline(tmp_path / "model")
    config = load_config("tiny", SETTINGS + ["decoder.steps=0", "decoder.init_from=model"])
    portable = resolve_init_from("model", config, "decoder")
    assert portable == f"{tmp_path}/runs/tiny/decoder/init"
    component, decoder = load_portable(portable)
    expected = UnCLIPPipeline.load(tmp_path / "model").decoder.state_dict()
    assert component == "decoder"
    assert decoder.state_dict().keys() == expected.keys()
    assert all(torch.equal(decoder.state_dict()[k], v) for k, v in expected.items())
    # its exported portable weights are themselves a valid init_from, taken as they are
    assert resolve_init_from(portable, config, "decoder") == portable
    with pytest.raises(StorageError, match="decoder.init_from: no weights at nowhere; use "):
        resolve_init_from("nowhere", config, "decoder")
