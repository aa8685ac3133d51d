"""The training loop in one process (world size 1, DeepSpeed over a gloo group of one, no
Ray cluster): cadences, resumption, and a stage added by one class in this file."""

from __future__ import annotations

import math

import pytest
import torch
from stage_fixtures import fast_config, image_columns, save_trained_clip
from torch import nn

from orchestration.loop_session import LocalSession, init_single_process_group
from orchestration.stages import register_task, task_class, unregister_task
from orchestration.tasks.base import EvalResult, Task, load_portable, to_tensor
from orchestration.train_loop import WorkerSpec, train_worker


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    config = fast_config(tmp_path_factory.mktemp("loopdata"))
    return {"train": image_columns(config, "train", 32), "test": image_columns(config, "test", 16)}


def run_loop(config, stage, data, root, **spec_fields) -> LocalSession:
    session = LocalSession(data, root)
    spec = WorkerSpec(config=config, task=task_class(stage), run_id=None,
                      train_samples=len(data["train"]["key"]), **spec_fields)
    init_single_process_group()
    train_worker(spec, session)
    return session


def test_loop_logs_evaluates_and_checkpoints_on_their_own_cadences(tmp_path, data):
    config = fast_config(tmp_path, "clip.steps=6", "clip.batch_size=8", "clip.log_every=2",
                         "clip.eval_every=3", "clip.checkpoint_every=6")
    session = run_loop(config, "clip", data, tmp_path / "ckpt")
    assert [r["step"] for r in session.reports] == [2, 3, 4, 6]
    assert [r["step"] for r in session.reports if "loss" in r] == [2, 4, 6]
    assert [r["step"] for r in session.reports if "val_loss" in r] == [3, 6]
    assert [p.name for p in session.checkpoints] == ["checkpoint_000006"]
    assert session.reports[-1]["epoch"] == pytest.approx(6 * 8 / 32)
    _, model = load_portable(str(session.checkpoints[-1] / "portable"))
    assert model.logit_scale.item() <= math.log(100.0)


def test_loop_resumes_after_a_failure_to_the_same_weights(tmp_path, data):
    overrides = ["clip.steps=6", "clip.batch_size=8", "clip.log_every=2",
                 "clip.checkpoint_every=2", "clip.optim.ema_decay=0.5"]
    config = fast_config(tmp_path, *overrides)
    straight = run_loop(config, "clip", data, tmp_path / "straight")
    with pytest.raises(RuntimeError, match="injected failure at step 3"):
        run_loop(config, "clip", data, tmp_path / "resumed", fail_at_step=3)
    resumed = run_loop(config, "clip", data, tmp_path / "resumed")  # from step 2's checkpoint
    assert [r["step"] for r in resumed.reports] == [4, 6]
    assert resumed.reports[-1]["lr"] == pytest.approx(straight.reports[-1]["lr"])
    _, a = load_portable(str(straight.checkpoints[-1] / "portable"))
    _, b = load_portable(str(resumed.checkpoints[-1] / "portable"))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-5), name


@pytest.mark.parametrize("stage", ["decoder"])
def test_loop_trains_a_stage_that_needs_clip(tmp_path, data, stage):
    config = fast_config(tmp_path, f"{stage}.steps=2", f"{stage}.batch_size=4",
                         f"{stage}.log_every=1", f"{stage}.checkpoint_every=2")
    save_trained_clip(config)
    session = run_loop(config, stage, data, tmp_path / "ckpt")
    assert [r["step"] for r in session.reports] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in session.reports)


class MeanColourTask(Task):
    """A stage added by one class: predict an image's mean colour with a few parameters."""

    name = "mean_colour"

    def build_model(self) -> nn.Module:
        return self.model_from_config({"hidden": int(self.stage.overrides.get("hidden", 4))})

    def model_config(self, model: nn.Module) -> dict:
        return {"hidden": model[0].out_features}

    @classmethod
    def model_from_config(cls, config: dict) -> nn.Module:
        return nn.Sequential(nn.Linear(3, config["hidden"]), nn.Tanh(),
                             nn.Linear(config["hidden"], 3))

    def to_batch(self, raw: dict, device) -> dict:
        images = to_tensor(raw["image"], device)
        return {"pixels": images.mean(dim=(2, 3)), "target": images.mean(dim=(2, 3)) * 0.5}

    def compute_loss(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        return {"loss": nn.functional.mse_loss(model(batch["pixels"]), batch["target"])}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: list[dict]) -> EvalResult:
        losses = [float(self.compute_loss(model, b)["loss"]) for b in batches]
        return EvalResult({"val_loss": sum(losses) / len(losses)})


def test_a_new_stage_is_one_class_and_a_config_section(tmp_path, data):
    register_task(MeanColourTask)
    try:
        config = fast_config(tmp_path, "extra_stages.mean_colour.preset=mlp",
                             "extra_stages.mean_colour.steps=12",
                             "extra_stages.mean_colour.batch_size=8",
                             "extra_stages.mean_colour.log_every=4",
                             "extra_stages.mean_colour.checkpoint_every=12",
                             "extra_stages.mean_colour.optim.lr=0.02",
                             "extra_stages.mean_colour.optim.ema_decay=0.0")
        session = run_loop(config, "mean_colour", data, tmp_path / "ckpt")
        assert [r["step"] for r in session.reports] == [4, 8, 12]
        losses = [r["loss"] for r in session.reports]
        assert losses[-1] < losses[0]
        name, model = load_portable(str(session.checkpoints[-1] / "portable"))
        assert name == "mean_colour" and model[0].out_features == 4
    finally:
        unregister_task("mean_colour")
