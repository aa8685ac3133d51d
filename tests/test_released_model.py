"""The shapes model shipped in release/shapes (benchmarks/QUALITY.md): small, fp16, carrying
its own numbers and evaluator, and drawing the colours its captions ask for."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from data_pipelines.settings import COLOURS, SHAPES
from models.unclip_pipeline import COMPONENTS, UnCLIPPipeline
from orchestration.evaluate.evaluation import CaptionScorer
from orchestration.evaluate.evaluator import load_evaluator
from orchestration.release import read_release

RELEASE = Path(__file__).resolve().parents[1] / "release" / "shapes"
# One caption per colour, shapes in turn: every colour and shape of the dataset is asked for.
CAPTIONS = [f"a large {colour} {SHAPES[i % len(SHAPES)]}" for i, colour in enumerate(COLOURS)]


def test_the_release_is_small_fp16_weights_with_its_metrics_and_evaluator():
    files = [f for f in RELEASE.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 50 * 2**20
    for name in COMPONENTS:
        tensors = load_file(str(RELEASE / f"{name}.safetensors"))
        floats = [t for t in tensors.values() if t.is_floating_point()]
        assert sum(t.dtype == torch.float16 for t in floats) > len(floats) / 2, name
    facts = read_release(RELEASE)
    metrics = facts["eval"]["metrics"]
    for name in ("attr_colour", "attr_shape", "attr_colour_shape", "r_precision"):
        assert metrics[f"{name}_lo"] <= metrics[name] <= metrics[f"{name}_hi"], name
    assert facts["evaluator"]["identity"] == load_evaluator(str(RELEASE / "evaluator")).identity
    recipe = yaml.safe_load((RELEASE / "eval.yaml").read_text())
    assert recipe["data"]["uri"] == "data/shapes"  # relative: rebuilt where `unclip eval` runs
    assert recipe["data"]["shapes"]["train_size"] == 20000
    assert recipe["eval"]["evaluator"] == {"uri": "evaluator"}


@torch.no_grad()
def test_the_release_draws_the_colour_of_its_caption():
    pipeline = UnCLIPPipeline.load(RELEASE)
    images = pipeline.generate(CAPTIONS, num_images_per_prompt=2, seed=0, steps=25)
    evaluator = load_evaluator(str(RELEASE / "evaluator"))
    feats = evaluator.image_features(images.permute(0, 3, 1, 2).float() / 127.5 - 1)
    scorer = CaptionScorer(evaluator)
    asked = [caption for caption in CAPTIONS for _ in range(2)]
    colour = scorer.ensemble_hits(feats, asked, "colour")
    # chance is 1/8; shapes are not asserted on 16 images: this model draws circles, squares,
    # rectangles and triangles, but pentagons and ellipses only roughly (shape accuracy 0.68
    # [0.59, 0.75] on 100 captions in benchmarks/QUALITY.md, chance 1/6)
    assert colour.mean() >= 0.75, colour.tolist()


def absolute_paths(value, where: str = "") -> list[str]:
    """Every string in a JSON/YAML tree that names a path of the machine that built it."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in absolute_paths(v, f"{where}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in absolute_paths(v, f"{where}[{i}]")]
    if isinstance(value, str) and (value.startswith(("/", "~", "file:/", "sqlite:////"))
                                   or "/tmp/" in value or "/home/" in value):
        return [f"{where}: {value}"]
    return []


def test_released_metadata_names_no_path_of_the_building_machine():
    import json

    for name in ("release.json", "config.json", "eval/evaluation.json", "eval/metrics.json",
                 "evaluator/config.json"):
        assert absolute_paths(json.loads((RELEASE / name).read_text())) == [], name
    assert absolute_paths(yaml.safe_load((RELEASE / "eval.yaml").read_text())) == []
    assert read_release(RELEASE)["source"]["tags"]["lineage.dataset_uri"] == "data/shapes"
