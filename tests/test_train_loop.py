"""The training loop in one process (world size 1, DeepSpeed over a gloo group of one, no
Ray cluster): cadences, resumption, and a stage added by one class in this file."""

from __future__ import annotations

import contextlib
import json
import math

import numpy as np
import pytest
import torch
from stage_fixtures import fast_config, image_columns, save_trained_clip
from torch import nn

from data_pipelines.resumable import DataLayoutChanged
from orchestration.stages import register_task, task_class, unregister_task
from orchestration.train.loop_session import LocalSession, init_single_process_group
from orchestration.train.tasks.base import EvalResult, Task, load_portable, to_tensor
from orchestration.train.train_loop import WorkerSpec, train_worker


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


def _steps_and_keys(log_dir) -> dict[int, list[str]]:
    """The sample log, as the run kept it: a step redone after a resume replaces the lost
    attempt's (both are in the file, in order)."""
    kept = {}
    for line in (log_dir / "rank0.jsonl").read_text().splitlines():
        entry = json.loads(line)
        kept[entry["step"]] = entry["keys"]
    return kept


def test_a_resumed_decoder_matches_an_uninterrupted_one_sample_for_sample(tmp_path, data):
    """Positions in the checkpoint and per-step seeds: after a crash at step 5 (checkpoint at
    4), steps 5-8 read the same samples and draw the same timesteps and noise."""
    config = fast_config(tmp_path, "decoder.steps=8", "decoder.batch_size=6",
                         "decoder.log_every=2", "decoder.checkpoint_every=4",
                         "decoder.optim.ema_decay=0.5")
    save_trained_clip(config)
    straight = run_loop(config, "decoder", data, tmp_path / "a", sample_log=str(tmp_path / "la"))
    with pytest.raises(RuntimeError, match="injected failure at step 5"):
        run_loop(config, "decoder", data, tmp_path / "b", fail_at_step=5,
                 sample_log=str(tmp_path / "lb"))
    resumed = run_loop(config, "decoder", data, tmp_path / "b", sample_log=str(tmp_path / "lb"))
    a, b = _steps_and_keys(tmp_path / "la"), _steps_and_keys(tmp_path / "lb")
    assert list(b) == list(range(1, 9)) and a == b
    # 32 samples, batches of 6: epoch 0 is steps 1-5 (30 distinct samples), epoch 1 from 6 on
    epoch0 = [key for step in range(1, 6) for key in a[step]]
    assert len(epoch0) == len(set(epoch0)) == 30
    assert [r["step"] for r in resumed.reports] == [6, 8]
    assert resumed.reports[-1]["loss"] == pytest.approx(straight.reports[-1]["loss"], rel=1e-5)
    _, wa = load_portable(str(straight.checkpoints[-1] / "portable"))
    _, wb = load_portable(str(resumed.checkpoints[-1] / "portable"))
    for (name, pa), pb in zip(wa.state_dict().items(), wb.state_dict().values(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-5), name


def test_resume_refuses_a_changed_data_layout_and_carries_a_new_batch_size(tmp_path, data):
    config = fast_config(tmp_path, "clip.steps=2", "clip.batch_size=8",
                         "clip.checkpoint_every=2")
    run_loop(config, "clip", data, tmp_path / "ckpt")
    fewer_rows = {"train": {k: v[:24] for k, v in data["train"].items()}, "test": data["test"]}
    longer = fast_config(tmp_path, "clip.steps=4", "clip.batch_size=8", "clip.checkpoint_every=2")
    with pytest.raises(DataLayoutChanged, match=r"data layout changed since its last "
                       r"checkpoint \(rows 32 -> 24\).*set a new run_name"):
        run_loop(longer, "clip", fewer_rows, tmp_path / "ckpt")
    smaller_batch = fast_config(tmp_path, "clip.steps=4", "clip.batch_size=4",
                                "clip.checkpoint_every=2", "clip.log_every=1")
    session = run_loop(smaller_batch, "clip", data, tmp_path / "ckpt",
                       sample_log=str(tmp_path / "log"))
    assert [r["step"] for r in session.reports] == [3, 4]
    # steps 1-2 took rows 0-15 of epoch 0's permutation; the batches of 4 go on from row 16
    order = np.random.default_rng([0, 0]).permutation(32)
    logged = _steps_and_keys(tmp_path / "log")
    assert logged[3] + logged[4] == [f"train-{i}" for i in order[16:24]]


def gathered_for_update(params, zero_stage: int):
    """Full `params` inside the block; under ZeRO-3 in-place changes are written back to the
    partitions on exit."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_clip_temperature_clamp_holds_at_every_zero_stage(tmp_path, data, zero_stage):
    """The logit scale is pushed past log(100) through the engine's own parameters; after
    one optimizer step the clamp has written log(100) back, partitioned or not."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    from orchestration.train.train_loop import TrainLoop

    config = fast_config(tmp_path, "clip.steps=1", "clip.batch_size=8", "clip.log_every=1",
                         f"deepspeed.zero_stage={zero_stage}")
    spec = WorkerSpec(config=config, task=task_class("clip"), run_id=None,
                      train_samples=len(data["train"]["key"]))
    init_single_process_group()
    loop = TrainLoop(spec, LocalSession(data, tmp_path / "ckpt"))
    model = loop.engine.module.model
    with gathered_for_update([model.logit_scale], zero_stage), torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    if zero_stage:  # ... and in ZeRO's fp32 master copy, which the next step copies back
        safe_set_full_fp32_param(model.logit_scale, torch.tensor(math.log(1000.0)))
    loop.run()
    with gathered_for_update([model.logit_scale], zero_stage):
        assert model.logit_scale.item() == pytest.approx(math.log(100.0))
    if zero_stage:
        master = safe_get_full_fp32_param(model.logit_scale)
        assert master.item() == pytest.approx(math.log(100.0))
    _, exported = load_portable(str(loop.session.checkpoints[-1] / "portable"))
    assert exported.logit_scale.item() <= math.log(100.0) + 1e-6  # the EMA saw it clamped


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


@pytest.mark.parametrize("stage", ["clip", "decoder"])  # the prior: test_training's S3 run
def test_zero3_builds_partitioned_with_the_zero0_initial_weights_and_trains(
        tmp_path, data, stage):
    """Under ZeRO-3 every stage's model is built partitioned (zero.Init), and the library
    inits that run on already-built children still hold: the first weights equal ZeRO-0's,
    including the zeroed residual outputs of the decoder."""
    from orchestration.train.train_loop import TrainLoop

    initial = {}
    for zero_stage in (0, 3):
        config = fast_config(tmp_path, f"{stage}.steps=1", f"{stage}.batch_size=4",
                             f"{stage}.log_every=1", f"deepspeed.zero_stage={zero_stage}")
        if stage == "decoder":
            save_trained_clip(config)
        spec = WorkerSpec(config=config, task=task_class(stage), run_id=None,
                          train_samples=len(data["train"]["key"]))
        init_single_process_group()
        loop = TrainLoop(spec, LocalSession(data, tmp_path / f"ckpt{zero_stage}"))
        if zero_stage == 3:
            assert all(hasattr(p, "ds_tensor") for p in loop.engine.module.parameters())
        initial[zero_stage] = loop.ema_model().state_dict()
    loop.run()  # ZeRO-3 steps
    assert [k for k, v in initial[0].items() if not torch.equal(v, initial[3][k])] == []
    assert math.isfinite(loop.session.reports[-1]["loss"])


def test_loop_logs_model_flops_and_mfu_against_the_configured_peak(tmp_path, data):
    """The first step's FLOPs (the decoder's forward and backward, not the frozen CLIP that
    embeds its images) are counted as it runs; every log window then reports achieved
    TFLOP/s and MFU against `scaling.peak_tflops`."""
    from models.flops import meta_training_step_flops

    config = fast_config(tmp_path, "decoder.steps=2", "decoder.batch_size=4",
                         "decoder.log_every=1", "scaling.peak_tflops=0.5")
    save_trained_clip(config)
    session = run_loop(config, "decoder", data, tmp_path / "ckpt")
    task = task_class("decoder")(config)
    task.setup(device=torch.device("cpu"), rank=0, world_size=1)
    batch = task.to_batch({k: v[:4] for k, v in data["train"].items()}, torch.device("cpu"))
    expected = meta_training_step_flops(
        task.build_model, lambda m, b: task.compute_loss(m, b)["loss"], batch)
    for report in session.reports:
        flops = report["tflops_per_s"] * 1e12 * report["step_time_s"]
        assert flops == pytest.approx(expected, rel=1e-6)
        assert report["mfu"] == pytest.approx(report["tflops_per_s"] / 0.5)


def test_batches_within_a_deadline_or_one_stalled_line():
    """A stream that stops producing fails after the stall timeout with the caller's
    message; a normal one passes through in order; an error in it reaches the loop; an
    epoch closed early stops the fetching thread."""
    import threading
    import time

    from orchestration.train.loop_session import DataStalled, within_deadline

    def stream(count, hang=False, fail=False):
        yield from range(count)
        if fail:
            raise ValueError("broken shard")
        while hang:
            time.sleep(0.05)

    assert list(within_deadline(stream(5), 5.0, str)) == [0, 1, 2, 3, 4]
    hung = within_deadline(stream(2, hang=True), 0.3, lambda s: f"no batch for {s:g} s")
    assert [next(hung), next(hung)] == [0, 1]
    with pytest.raises(DataStalled, match=r"^no batch for 0.3 s$"):
        next(hung)
    with pytest.raises(ValueError, match="broken shard"):
        list(within_deadline(stream(3, fail=True), 5.0, str))
    def fetchers() -> int:
        return sum(t.name == "batch-fetcher" for t in threading.enumerate())

    early = within_deadline(stream(1000), 5.0, str)
    assert next(early) == 0
    running = fetchers()
    early.close()  # the other ranks ended the epoch
    deadline = time.monotonic() + 5
    while fetchers() == running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fetchers() == running - 1
