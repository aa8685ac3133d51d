"""The reference evaluator and the scores made with it: shapes caption variants, per-caption
scores with intervals, loading an evaluator and the identity that goes with its numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipelines.shapes import (
    ZERO_SHOT_PROBES,
    attribute_classes,
    attribute_variants,
    caption_objects,
    held_out_pair_in,
    zero_shot_prompt,
)
from data_pipelines.storage import StorageError
from orchestration.config import load_config
from orchestration.evaluate.evaluation import (
    CaptionScorer,
    EvalReport,
    format_report,
    score_images,
    zero_shot_metrics,
)
from orchestration.evaluate.evaluator import evaluator_training_config, load_evaluator


def test_attribute_variants_change_one_object_attribute_at_a_time():
    caption = "a small red circle and a large blue square"
    colour = attribute_variants(caption, "colour")
    assert [options[0] for options in colour] == [caption, caption]
    assert len(colour[0]) == 8 and len(set(colour[0])) == 8  # 8 colours, the true one first
    assert "a small green circle and a large blue square" in colour[0]
    assert "a small red circle and a large green square" in colour[1]
    both = attribute_variants("a medium white pentagon", "colour_shape")
    assert len(both) == 1 and len(both[0]) == 48 and both[0][0] == "a medium white pentagon"
    assert attribute_variants("a photo of a dog", "shape") == []
    assert caption_objects("a photo of a dog") is None
    with pytest.raises(ValueError, match="unknown attribute 'size'"):
        attribute_variants(caption, "size")
    assert held_out_pair_in("a large yellow circle", [("yellow", "circle")])
    assert not held_out_pair_in("a large yellow square", [("yellow", "circle")])


def test_zero_shot_prompts_and_attribute_classes_of_one_object_captions():
    assert [zero_shot_prompt("a small red circle", probe) for probe in ZERO_SHOT_PROBES] == [
        "a small circle that is red", "a small circle", "red"]
    assert zero_shot_prompt("a small red circle and a large blue square", "rephrased") is None
    assert zero_shot_prompt("a small red circle at the top left", "shape_only") is None
    assert zero_shot_prompt("a photo of a dog", "colour_only") is None
    shapes, own = attribute_classes("a small red circle", "shape")
    assert own == 3 and len(shapes) == 6
    assert shapes[0] == [f"a small {c} rectangle" for c in
                         ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")]
    colours, own = attribute_classes("a small red circle", "colour")
    assert own == 0 and len(colours) == 8 and len(colours[1]) == 18  # 3 sizes x 6 shapes
    assert colours[1][:2] == ["a small green rectangle", "a small green square"]


class _OneHotEvaluator:
    """Features that say only a caption's colour: which colour ensemble an image is nearest."""
    identity = "one-hot"

    def text_features(self, captions):
        from data_pipelines.settings import COLOURS

        return np.stack([np.eye(8)[COLOURS.index(caption_objects(c)[0]["colour"])]
                         for c in captions])


def test_ensemble_hits_pick_the_nearest_colour_class():
    scorer = CaptionScorer(_OneHotEvaluator())
    images = np.eye(8)[[0, 1, 1]]  # red, green, green
    hits = scorer.ensemble_hits(images, ["a small red circle", "a large green square",
                                         "a large blue square"], "colour")
    assert hits.tolist() == [1.0, 1.0, 0.0]


def save_random_evaluator(directory, *, seed: int = 0):
    """A portable (untrained) tiny CLIP as `unclip train clip` writes it."""
    from orchestration.train.tasks.base import save_portable
    from orchestration.train.tasks.clip import ClipTask

    config = load_config("tiny", [])
    torch.manual_seed(seed)
    task = ClipTask(config)
    model = task.build_model()
    save_portable(str(directory), "clip", model, task.model_config(model))
    return directory


def test_scores_carry_intervals_and_one_value_per_caption(tmp_path):
    config = load_config("tiny", ["eval.bootstrap_reps=200"])
    evaluator = load_evaluator(str(save_random_evaluator(tmp_path / "ev")))
    rng = np.random.default_rng(0)
    captions = ["a small red circle", "a large blue square", "a medium green triangle",
                "a small yellow circle and a large black ellipse"] * 3
    real = torch.from_numpy(rng.uniform(-1, 1, (12, 3, 32, 32)).astype(np.float32))
    fake = torch.from_numpy(rng.uniform(-1, 1, (24, 3, 32, 32)).astype(np.float32))
    metrics, per_caption = score_images(
        CaptionScorer(evaluator), real_feats=evaluator.image_features(real),
        real_captions=captions, fake_feats=evaluator.image_features(fake), captions=captions,
        images_per_caption=2, config=config)
    for name in ("fd_clip", "kid_clip", "clip_score", "r_precision", "attr_colour",
                 "attr_shape", "attr_colour_shape", "attr_colour_shape_held_out",
                 "attr_colour_shape_seen"):
        assert metrics[f"{name}_lo"] <= metrics[name] <= metrics[f"{name}_hi"], name
    assert 0.0 <= metrics["r_precision_real"] <= 1.0
    assert sorted(per_caption) == ["attr_colour", "attr_colour_shape", "attr_shape",
                                   "clip_score", "r_precision"]
    assert all(len(values) == 12 for values in per_caption.values())
    assert metrics["clip_score"] == pytest.approx(np.mean(per_caption["clip_score"]))
    # captions outside the shapes grammar get no attribute scores, the rest still works
    plain = ["a photo of a dog", "a cat on a mat"] * 6
    metrics, per_caption = score_images(
        CaptionScorer(evaluator), real_feats=evaluator.image_features(real),
        real_captions=plain, fake_feats=evaluator.image_features(fake[:12]), captions=plain,
        images_per_caption=1, config=config)
    assert "attr_colour" not in metrics and sorted(per_caption) == ["clip_score", "r_precision"]


def test_evaluator_identity_follows_the_weights_and_reports_refuse_other_evaluators(tmp_path):
    first = load_evaluator(str(save_random_evaluator(tmp_path / "a" / "portable", seed=0)))
    again = load_evaluator(str(tmp_path / "a" / "portable"))
    other = load_evaluator(str(save_random_evaluator(tmp_path / "b", seed=1)))
    assert first.identity == again.identity and first.identity.startswith("a@")
    assert other.identity.startswith("b@") and other.identity.split("@")[1] != \
        first.identity.split("@")[1]
    report = EvalReport(metrics={"clip_score": 0.5, "clip_score_lo": 0.4, "clip_score_hi": 0.6},
                        per_caption={"clip_score": [0.5, 0.5]}, captions_sha="c", seed=0,
                        evaluator=first.identity)
    assert report.comparable_with(EvalReport.from_json(report.to_json())) is None
    moved = EvalReport(**{**report.__dict__, "evaluator": other.identity})
    assert report.comparable_with(moved) == (
        f"different evaluators ({first.identity} vs {other.identity})")
    reseeded = EvalReport(**{**report.__dict__, "seed": 1})
    assert report.comparable_with(reseeded) == "different captions or seeds"
    assert format_report(report).splitlines()[1].split() == ["clip_score", "0.5", "[0.4,",
                                                             "0.6]"]


def test_a_missing_evaluator_is_one_line_naming_the_fix(tmp_path):
    with pytest.raises(StorageError) as missing:
        load_evaluator(str(tmp_path / "nothing"))
    assert str(missing.value) == (
        f"eval.evaluator: no portable CLIP weights at {tmp_path / 'nothing'} (expected "
        "weights.safetensors + config.json, as `unclip train clip` writes under "
        "<run>/clip/portable); set eval.evaluator.uri=auto to train one for this dataset")


def test_the_default_evaluator_is_trained_once_per_dataset(tmp_path):
    from data_pipelines.shapes import build_shapes
    from data_pipelines.shards import manifest_hash

    config = load_config("tiny", [f"data.uri={tmp_path}/shapes", "data.shapes.train_size=8",
                                  "data.shapes.test_size=4", "data.shapes.samples_per_shard=4"])
    build_shapes(config.data.uri, config.data.shapes, fmt="webdataset", use_ray=False)
    training = evaluator_training_config(config)
    name = training.run_name
    assert name.startswith(f"evaluator-{manifest_hash(config.data.uri)[:12]}-")
    assert training.clip == config.eval.evaluator.clip != config.clip
    assert (training.seed, config.seed) == (1, 0)  # its own seed: a judge, not a copy
    assert training.mlflow.experiment == "unclip-tiny-evaluator"
    assert training.data == config.data and training.storage_root == config.storage_root

    def run_name(*changes):
        changed = load_config("tiny", [f"data.uri={tmp_path}/shapes", *changes])
        return evaluator_training_config(changed).run_name

    # more steps or another learning rate continue the same evaluator ...
    assert run_name("eval.evaluator.clip.steps=9999", "eval.evaluator.clip.optim.lr=0.1") == name
    # ... another network or seed is another evaluator, never a resume of an incompatible one
    assert run_name("eval.evaluator.clip.overrides={vision_width: 32}") != name
    assert run_name("eval.evaluator.seed=7") != name
    assert run_name("seed=7") == name  # the pipeline's seed is not the evaluator's


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_ci_sized_evaluation_separates_a_perfect_model_from_an_untrained_one(tmp_path):
    """The tiny config's evaluation, CI-sized: the default evaluator is trained once for the
    dataset (and found again, not retrained), and its metrics, with intervals, tell the test
    images themselves (what a perfect model would draw) from an untrained pipeline's."""
    from test_tuning import save_small_pipeline

    from data_pipelines.shapes import build_shapes
    from models.unclip_pipeline import UnCLIPPipeline
    from orchestration.evaluate.evaluation import held_out_rows
    from orchestration.evaluate.evaluator import ensure_evaluator

    config = load_config("tiny", [
        f"data.uri={tmp_path}/shapes", f"storage_root={tmp_path}/runs",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "data.shapes.train_size=640",
        "data.shapes.test_size=64", "data.shapes.samples_per_shard=320", "eval.num_captions=64",
        "eval.bootstrap_reps=300", "eval.evaluator.clip.steps=240",
        "eval.evaluator.clip.batch_size=64", "eval.evaluator.clip.checkpoint_every=240",
        "scaling.torch_threads=1"])
    build_shapes(config.data.uri, config.data.shapes, fmt="webdataset", use_ray=False)
    lines: list[str] = []
    evaluator = ensure_evaluator(config, log=lines.append)
    assert any("training this dataset's reference evaluator" in line for line in lines)
    lines.clear()
    assert ensure_evaluator(config, log=lines.append).identity == evaluator.identity
    assert not any("training" in line for line in lines)  # cached: found, not retrained
    from mlflow.tracking import MlflowClient

    registered = MlflowClient(config.mlflow.tracking_uri).get_model_version_by_alias(
        f"{config.mlflow.registered_model}-evaluator", "current")
    assert int(registered.version) == 1

    rows = held_out_rows(config, 64)
    captions = [str(c) for c in rows["caption"]]
    real = torch.from_numpy(np.array(rows["image"]))
    save_small_pipeline(tmp_path / "untrained")
    untrained = UnCLIPPipeline.load(tmp_path / "untrained").generate(captions, seed=0)
    scorer = CaptionScorer(evaluator)
    real_feats = evaluator.image_features(real)

    def score(images):
        return score_images(scorer, real_feats=real_feats, real_captions=captions,
                            fake_feats=evaluator.image_features(images), captions=captions,
                            images_per_caption=1, config=config)[0]

    perfect = score(real.flip(0))  # other test images of the same distribution, own captions
    perfect_own = score(real)
    noise = score(untrained.permute(0, 3, 1, 2).float() / 127.5 - 1.0)
    for metrics in (perfect, perfect_own, noise):
        for name in ("fd_clip", "kid_clip", "clip_score", "r_precision", "attr_colour"):
            assert metrics[f"{name}_lo"] <= metrics[name] <= metrics[f"{name}_hi"], name
    # distribution metrics: the held-out images (in another order) are close, noise is far
    assert perfect["fd_clip_hi"] < noise["fd_clip_lo"]
    assert perfect["kid_clip"] < noise["kid_clip"]
    # alignment: the true images match their captions beyond the untrained model's interval
    assert perfect_own["r_precision_lo"] > noise["r_precision_hi"]
    assert perfect_own["attr_colour_lo"] > noise["attr_colour_hi"]
    assert perfect_own["r_precision"] == pytest.approx(perfect["r_precision_real"])
    # zero-shot captions: the untrained pipeline's images against the real images' ceiling
    zero_shot = zero_shot_metrics(config, UnCLIPPipeline.load(tmp_path / "untrained"), scorer,
                                  captions, real_feats)
    assert sorted(zero_shot) == sorted(
        f"zero_shot_{probe}{suffix}" for probe in ZERO_SHOT_PROBES
        for suffix in ("", "_lo", "_hi", "_real"))
    assert zero_shot["zero_shot_colour_only_real"] > zero_shot["zero_shot_colour_only_hi"]


def test_compare_two_evaluations_caption_by_caption(tmp_path, run_cli):
    """`unclip compare`: the gate's paired test for any two reports, read from the folders
    that `unclip eval` (evaluation.json) and `unclip release` (eval/evaluation.json) write."""
    from orchestration.evaluate.evaluation import EvalReport

    def write(folder, evaluator: str, **scores) -> None:
        folder.mkdir(parents=True)
        report = EvalReport(metrics={}, per_caption=scores, captions_sha="abc", seed=0,
                            evaluator=evaluator)
        (folder / "evaluation.json").write_text(report.to_json())

    better = [1.0] * 10 + [0.0] * 10  # the candidate gets ten more captions right
    write(tmp_path / "new", "evaluator@1", attr_shape=better, attr_colour=[0.0] * 20,
          clip_score=[0.5] * 20)
    write(tmp_path / "old" / "eval", "evaluator@1", attr_shape=[0.0] * 20,
          attr_colour=[1.0] * 20, clip_score=[0.5] * 20)
    code, out, err = run_cli("compare", str(tmp_path / "new"), str(tmp_path / "old"))
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert out.splitlines()[0] == "paired over 20 captions, evaluator evaluator@1"
    assert list(rows) == ["attr_shape", "attr_colour", "clip_score"]
    assert rows["attr_shape"][1:4] == ["0.5000", "0.0000", "+0.5000"]
    assert rows["attr_shape"][-1] == "better"
    assert rows["attr_colour"][1:6] == ["0.0000", "1.0000", "-1.0000", "[-1.0000,", "-1.0000]"]
    assert rows["attr_colour"][-1] == "worse"
    assert " ".join(rows["clip_score"][-3:]) == "within the uncertainty"
    write(tmp_path / "other", "evaluator@2", attr_shape=better)
    code, _, err = run_cli("compare", str(tmp_path / "new"), str(tmp_path / "other"))
    assert code == 2
    assert err.strip() == ("error: cannot compare caption by caption: different evaluators "
                           "(evaluator@1 vs evaluator@2); evaluate both with the same config "
                           "(captions, seed) and evaluator")
