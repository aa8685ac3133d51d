"""Every stage's task in one process, no Ray: build -> batch -> loss -> backward -> hooks ->
evaluate -> portable round trip. The loop's own tests are in test_train_loop.py."""

from __future__ import annotations

import math

import pytest
import torch
from stage_fixtures import embedding_columns, fast_config, image_columns, save_trained_clip

from orchestration.stages import STAGES, task_class
from orchestration.train.tasks.base import load_portable, save_portable

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def stage_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tasks")
    config = fast_config(tmp)
    save_trained_clip(config)
    images = image_columns(config, "train", 8)
    return config, {"images": images, "embeddings": embedding_columns(config, images)}


@pytest.mark.parametrize("stage", STAGES)
def test_task_trains_evaluates_and_round_trips(stage, stage_setup, tmp_path):
    config, columns = stage_setup
    task = task_class(stage)(config)
    task.setup(device=CPU)
    torch.manual_seed(0)
    model = task.build_model()
    batch = task.to_batch(columns[task.dataset_kind], CPU)
    terms = task.compute_loss(model, batch)
    assert "loss" in terms and math.isfinite(terms["loss"].detach().item())
    terms["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    task.after_step(model, zero_stage=0)

    result = task.evaluate(model.eval(), [batch])
    assert math.isfinite(result.metrics["val_loss"])
    assert all(image.size[0] > 0 for image in result.images.values())

    save_portable(str(tmp_path / stage), stage, model, task.model_config(model))
    name, loaded = load_portable(str(tmp_path / stage))
    assert name == stage
    for (key, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


def test_task_metrics_per_stage(stage_setup):
    config, columns = stage_setup
    expected = {"clip": {"val_loss", "image_text_cosine", "random_pair_cosine",
                         "zero_shot_top1", "zero_shot_top5"},
                "prior": {"val_loss", "generated_vs_text", "generated_vs_image",
                          "text_vs_image", "generated_vs_random_text"},
                "decoder": {"val_loss"}}
    for stage in STAGES:
        task = task_class(stage)(config)
        task.setup(device=CPU)
        model = task.build_model().eval()
        result = task.evaluate(model, [task.to_batch(columns[task.dataset_kind], CPU)])
        assert set(result.metrics) == expected[stage], stage
    assert set(result.images) == {"samples"}  # the decoder's real-vs-generated grid


def test_clip_hook_clamps_logit_scale(stage_setup):
    config, _ = stage_setup
    task = task_class("clip")(config)
    task.setup(device=CPU)
    model = task.build_model()
    with torch.no_grad():
        model.logit_scale.fill_(9.0)
    task.after_step(model, zero_stage=0)
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))


def test_stage_dependencies_come_from_the_tasks():
    from orchestration.pipeline import pipeline_plan, step_order, training_waves

    assert [task_class(s).requires for s in STAGES] == [(), ("clip",), ("clip",)]
    assert training_waves() == [["clip"], ["prior", "decoder"]]
    assert pipeline_plan() == [["data"], ["clip"], ["embed"], ["prior", "decoder"], ["eval"],
                               ["register"]]
    assert step_order() == ["data", "clip", "embed", "prior", "decoder", "eval", "register"]


def test_unknown_stage_is_one_line():
    from orchestration.stages import UnknownStage

    with pytest.raises(UnknownStage, match="unknown stage 'upsampler'; choose one of clip, "
                                           "prior, decoder"):
        task_class("upsampler")
