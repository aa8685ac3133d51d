"""Real Ray Train + DeepSpeed + S3 endpoint + MLflow: every stage trains, checkpoints, resumes."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from orchestration.common.layout import portable_uri, stage_done, trained_steps
from orchestration.config import load_config
from orchestration.train.embed_job import run_embed
from orchestration.train.tasks.base import load_portable
from orchestration.train.training_job import StageError, run_stage

pytestmark = pytest.mark.slow


def tiny_overrides(tmp_path, data_uri: str, storage_root: str, run_name: str) -> list[str]:
    common = ["steps=8", "batch_size=8", "log_every=2", "checkpoint_every=4",
              "keep_checkpoints=1"]
    out = [f"data.uri={data_uri}", f"storage_root={storage_root}", f"run_name={run_name}",
           f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
           "data.shapes.train_size=160", "data.shapes.test_size=32",
           "data.shapes.samples_per_shard=80", "scaling.num_workers=2",
           "scaling.cpus_per_worker=0.5", "decoder.overrides={num_timesteps: 20}",
           "prior.overrides={num_timesteps: 20}", "sampling.decoder_steps=4",
           "sampling.prior_steps=4", "eval.num_captions=8"]
    for stage in ("clip", "prior", "decoder"):
        out += [f"{stage}.{item}" for item in common]
    return out


def _history(tracking_uri: str, run_id: str, key: str) -> list[float]:
    metrics = MlflowClient(tracking_uri).get_metric_history(run_id, key)
    return [m.value for m in sorted(metrics, key=lambda m: m.step)]


@pytest.mark.usefixtures("ray_session")
def test_all_stages_on_s3_with_zero_2_and_3(tmp_path, s3_bucket):
    overrides = tiny_overrides(tmp_path, f"{s3_bucket}/shapes", f"{s3_bucket}/runs", "s3run")
    config = load_config("tiny", overrides + ["deepspeed.zero_stage=2",
                                              "clip.optim.lr=2e-3"])
    clip = run_stage(config, "clip")
    tracking = config.mlflow.tracking_uri
    losses = _history(tracking, clip.run_id, "loss")
    assert len(losses) == 4 and losses[-1] < losses[0]
    run = MlflowClient(tracking).get_run(clip.run_id)
    for key in ("samples_per_s", "data_wait_fraction", "lr", "epoch", "val/zero_shot_top1",
                "val/image_text_cosine", "grad_norm"):
        assert key in run.data.metrics, key
    assert run.data.params["deepspeed.zero_stage"] == "2"
    assert run.data.tags["dataset.uri"] == f"{s3_bucket}/shapes"
    assert len(run.data.tags["dataset.manifest_hash"]) == 16
    artifacts = {a.path for a in MlflowClient(tracking).list_artifacts(clip.run_id)}
    assert {"config", "dataset", "plots"} <= artifacts
    assert stage_done(config, "clip") and clip.portable_uri.startswith("s3://")
    # the Ray Train checkpoints live on S3 too
    import boto3

    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(
        Bucket=s3_bucket[5:], Prefix="runs/s3run/clip/")["Contents"]]
    assert any("checkpoint_" in k and k.endswith("mp_rank_00_model_states.pt") for k in keys)
    shards = optimizer_shards(keys)  # ZeRO-2: each rank saved only its own, once
    assert shards and all(files == RANK_SHARDS for files in shards)

    manifest = run_embed(config)
    splits = manifest["splits"]
    assert {name: (info["num_samples"], sum(info["shard_samples"]), len(info["shard_samples"]))
            for name, info in splits.items()} == {
        "train": (160, 160, len(splits["train"]["shards"])),
        "test": (32, 32, len(splits["test"]["shards"]))}  # rows counted per embedding shard

    zero3 = config.model_copy(update={"deepspeed": config.deepspeed.model_copy(
        update={"zero_stage": 3})})
    prior = run_stage(zero3, "prior")
    prior_losses = _history(tracking, prior.run_id, "loss")
    assert prior_losses[-1] < prior_losses[0]
    assert "val/generated_vs_image" in MlflowClient(tracking).get_run(prior.run_id).data.metrics

    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(
        Bucket=s3_bucket[5:], Prefix="runs/s3run/prior/")["Contents"]]
    shards = optimizer_shards(keys)  # ZeRO-3 likewise
    assert shards and all(files == RANK_SHARDS for files in shards)

    decoder = run_stage(zero3, "decoder")
    decoder_losses = _history(tracking, decoder.run_id, "loss")
    assert decoder_losses[-1] < decoder_losses[0]
    samples = [a.path for a in MlflowClient(tracking).list_artifacts(decoder.run_id, "samples")]
    assert samples and all(p.endswith(".png") for p in samples)
    component, module = load_portable(portable_uri(config, "decoder"))
    assert component == "decoder" and sum(p.numel() for p in module.parameters()) > 0


RANK_SHARDS = [f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in (0, 1)]


def optimizer_shards(keys: list[str]) -> list[list[str]]:
    """Per kept checkpoint, the optimizer-state files in it (sorted)."""
    by_checkpoint: dict[str, list[str]] = {}
    for key in keys:
        parts = key.split("/")
        checkpoint = next((p for p in parts if p.startswith("checkpoint_")), None)
        if checkpoint and parts[-1].endswith("optim_states.pt"):
            by_checkpoint.setdefault(checkpoint, []).append(parts[-1])
    return [sorted(files) for _, files in sorted(by_checkpoint.items())]


@pytest.mark.usefixtures("ray_session")
def test_resume_after_injected_failure_matches_uninterrupted_run(tmp_path):
    data = str(tmp_path / "shapes")
    base = tiny_overrides(tmp_path, data, str(tmp_path / "runs"), "x") + [
        "scaling.num_workers=1", "scaling.max_failures=1", "clip.optim.ema_decay=0.5"]
    straight = load_config("tiny", base + ["run_name=straight"])
    resumed = load_config("tiny", base + ["run_name=resumed"])
    a = run_stage(straight, "clip")
    b = run_stage(resumed, "clip", fail_at_step=6)  # crashes once; Ray restarts from step 4
    tracking = straight.mlflow.tracking_uri
    client = MlflowClient(tracking)
    steps = [m.step for m in client.get_metric_history(b.run_id, "loss")]
    assert steps == [2, 4, 6, 8]  # step 6, logged before the crash, is not logged again
    assert b.final_metrics["step"] == a.final_metrics["step"] == 8
    assert b.final_metrics["lr"] == pytest.approx(a.final_metrics["lr"])
    done = json.loads((tmp_path / "runs/resumed/clip/portable/DONE.json").read_text())
    assert done["step"] == 8
    _, weights_a = load_portable(portable_uri(straight, "clip"))
    _, weights_b = load_portable(portable_uri(resumed, "clip"))
    for (name, pa), pb in zip(weights_a.state_dict().items(), weights_b.state_dict().values(),
                              strict=True):
        assert torch.allclose(pa, pb, atol=1e-4), name
    # rerunning a finished stage resumes at the end: same MLflow run, nothing retrained
    again = run_stage(resumed, "clip")
    assert again.run_id == b.run_id and again.final_metrics["step"] == 8
    # fine-tuning starts from the trained weights: its first loss is the trained run's level
    finetune = load_config("tiny", base + ["run_name=finetune", "clip.steps=2",
                                           f"clip.init_from={portable_uri(straight, 'clip')}"])
    tuned = run_stage(finetune, "clip")
    first_fresh = _history(tracking, a.run_id, "loss")[0]
    first_tuned = _history(tracking, tuned.run_id, "loss")[0]
    assert first_tuned < first_fresh
    # steps 0: the weights are taken untrained, marked complete, with where they came from
    source = portable_uri(straight, "clip")
    taken = load_config("tiny", base + ["run_name=taken", "clip.steps=0",
                                        f"clip.init_from={source}"])
    adopted = run_stage(taken, "clip")
    _, weights_taken = load_portable(portable_uri(taken, "clip"))
    for (name, pa), pb in zip(weights_a.state_dict().items(),
                              weights_taken.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    done = json.loads((tmp_path / "runs/taken/clip/portable/DONE.json").read_text())
    assert (done["step"], done["adopted_from"]) == (0, source)
    run = client.get_run(adopted.run_id)
    assert (run.info.status, run.data.tags["stage.adopted_from"]) == ("FINISHED", source)
    assert _history(tracking, adopted.run_id, "loss") == []  # nothing trained


def kept_sample_log(log_dir) -> dict[tuple[int, int], list[str]]:
    """(rank, step) -> the keys that step trained on; a step redone after a restart replaces
    what the lost attempt logged for it (later lines win)."""
    kept = {}
    for path in sorted(log_dir.glob("rank*.jsonl")):
        rank = int(path.stem[len("rank"):])
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            kept[(rank, entry["step"])] = entry["keys"]
    return kept


@pytest.mark.usefixtures("ray_session")
def test_a_worker_killed_mid_epoch_costs_no_sample_and_repeats_none(tmp_path):
    """Two workers, 4 shards of 40: an epoch is 10 steps of 8 a worker. Rank 1's process is
    SIGKILLed at step 7; Ray Train restarts both from step 4's checkpoint in the same run."""
    base = tiny_overrides(tmp_path, str(tmp_path / "shapes"), str(tmp_path / "runs"), "x") + [
        "data.shapes.samples_per_shard=40", "scaling.max_failures=1", "clip.steps=12"]
    straight = run_stage(load_config("tiny", base + ["run_name=straight"]), "clip",
                         sample_log=str(tmp_path / "log-straight"))
    killed = run_stage(load_config("tiny", base + ["run_name=killed"]), "clip",
                       fail_at_step=7, fail_with="sigkill", sample_log=str(tmp_path / "log"))
    assert killed.final_metrics["step"] == 12
    raw = (tmp_path / "log/rank1.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in raw][:8] == [1, 2, 3, 4, 5, 6, 7, 5]
    a, b = kept_sample_log(tmp_path / "log-straight"), kept_sample_log(tmp_path / "log")
    assert sorted(b) == [(rank, step) for rank in (0, 1) for step in range(1, 13)]
    assert b == a  # the same samples at the same steps as the uninterrupted run
    epoch0 = [key for (_, step), keys in b.items() if step <= 10 for key in keys]
    assert len(epoch0) == len(set(epoch0)) == 160  # every train sample exactly once
    client = MlflowClient(load_config("tiny", base).mlflow.tracking_uri)
    steps = [m.step for m in client.get_metric_history(killed.run_id, "loss")]
    assert steps == [2, 4, 6, 8, 10, 12]  # nothing logged twice, nothing out of order
    assert killed.final_metrics["loss"] == pytest.approx(straight.final_metrics["loss"],
                                                         rel=1e-4)
    # resuming with another worker count would put the saved positions on the wrong ranks:
    # refused before any worker starts
    with pytest.raises(StageError, match=r"cannot resume clip of run 'killed': the data "
                       r"layout changed .*\(world_size 2 -> 1\).*set a new run_name"):
        run_stage(load_config("tiny", base + ["run_name=killed", "scaling.num_workers=1"]),
                  "clip")
    # so would another shuffle window (other windows, other permutations) ...
    with pytest.raises(StageError, match=r"cannot resume clip of run 'killed': the data "
                       r"layout changed .*\(window_shards 8 -> 2\).*set a new run_name"):
        run_stage(load_config("tiny", base + ["run_name=killed", "clip.steps=14",
                                              "data.shuffle_window_shards=2"]), "clip")
    # ... and a dataset whose manifest changed under the run (rebuilt, re-indexed)
    manifest = tmp_path / "shapes" / "manifest.json"
    original = manifest.read_text()
    manifest.write_text(original.replace('"source": "', '"source": "rebuilt ', 1))
    with pytest.raises(StageError, match=r"cannot resume clip of run 'killed': the data "
                       r"layout changed since its last checkpoint \(data '[0-9a-f]{16}' -> "
                       r"'[0-9a-f]{16}'\)"):
        run_stage(load_config("tiny", base + ["run_name=killed", "clip.steps=14"]), "clip")
    manifest.write_text(original)


def _clip_loss_worker(rank: int, world: int, port: int, features, out) -> None:
    import torch.distributed as dist

    from models.clip_model import ClipContrastiveLoss

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    images, texts, scale = (torch.tensor(f) for f in features)
    rows = images.shape[0] // world
    mine = slice(rank * rows, (rank + 1) * rows)
    img, txt = images[mine].clone().requires_grad_(), texts[mine].clone().requires_grad_()
    loss = ClipContrastiveLoss(rank=rank, world_size=world)(
        image_features=img, text_features=txt, logit_scale=scale)
    loss.backward()
    out.put((rank, float(loss), img.grad.numpy(), txt.grad.numpy()))
    dist.destroy_process_group()


def test_clip_loss_two_workers_equals_one_worker_with_double_batch():
    import socket

    import torch.multiprocessing as mp

    from models.clip_model import ClipContrastiveLoss

    rng = np.random.default_rng(0)
    images = rng.normal(size=(16, 8)).astype(np.float32)
    texts = (images + 0.5 * rng.normal(size=(16, 8))).astype(np.float32)
    scale = np.array([np.log(1 / 0.07)], dtype=np.float32)
    img = torch.tensor(images, requires_grad=True)
    txt = torch.tensor(texts, requires_grad=True)
    full = ClipContrastiveLoss()(image_features=img, text_features=txt,
                                 logit_scale=torch.tensor(scale))
    full.backward()

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_clip_loss_worker, args=(r, 2, port, (images, texts, scale),
                                                         queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    mean_loss = np.mean([r[1] for r in results])
    assert mean_loss == pytest.approx(float(full), rel=1e-5)
    # DDP averages gradients over ranks: each rank's local grad * world / world == full grad
    grad_img = np.concatenate([r[2] for r in results]) / 2
    assert np.allclose(grad_img, img.grad.numpy(), atol=1e-6)


def starved_run(tmp_path, run_name: str, held_cpus_but: float, *overrides: str):
    """A built dataset, then every CPU but `held_cpus_but` held by other work (a placement
    group) while the clip stage runs: returns the config and the StageError it ended in."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from orchestration.common.data_check import ensure_dataset

    data, runs = str(tmp_path / "data"), str(tmp_path / "runs")
    config = load_config(None, tiny_overrides(tmp_path, data, runs, run_name) + [
        "data.build_shapes_if_missing=true", "clip.steps=2", *overrides])
    ensure_dataset(config)  # its Ray tasks need a CPU too
    held = placement_group([{"CPU": ray.cluster_resources()["CPU"] - held_cpus_but}])
    ray.get(held.ready(), timeout=60)
    try:
        with pytest.raises(StageError) as failed:
            run_stage(config, "clip")
    finally:
        remove_placement_group(held)
    return config, str(failed.value)


@pytest.mark.usefixtures("ray_session")
def test_resources_that_never_come_fail_in_one_line_and_a_rerun_continues(tmp_path):
    """Every CPU is held elsewhere (as after losing a node): the stage waits
    scaling.resource_wait_s, then fails naming what it waited for, its MLflow run ends FAILED
    and holds nothing; once the CPUs are free the same command trains."""
    config, message = starved_run(tmp_path, "starved", 0.0, "scaling.resource_wait_s=3")
    assert message.startswith("clip: waited 3 s for 2 worker(s) of 0.5 CPU (PACK); the "
                              "cluster has 0 CPU and 0 GPU free on 1 node(s). Add nodes or "
                              "free resources"), message
    assert "\n" not in message
    runs_of_stage = MlflowClient(config.mlflow.tracking_uri).search_runs(
        [MlflowClient(config.mlflow.tracking_uri).get_experiment_by_name(
            config.mlflow.experiment).experiment_id])
    assert [r.info.status for r in runs_of_stage] == ["FAILED"]
    run_stage(config, "clip")
    assert trained_steps(config, "clip") == 2


@pytest.mark.usefixtures("ray_session")
def test_data_tasks_that_cannot_run_fail_in_one_line_instead_of_hanging(tmp_path):
    """The Train workers are placed but the CPUs their Ray Data tasks need are held by
    other work (as by a sweep's other trials): the run fails after data.stall_timeout_s in
    one line naming the CPUs, instead of waiting for ever."""
    _, message = starved_run(tmp_path, "stalled", 1.0, "data.stall_timeout_s=10")
    assert re.fullmatch(
        r"clip: worker [01] got no training batch for 10 s: its Ray Data read and decode "
        r"tasks \(0.5 and 1 CPU each\) cannot run while the cluster has 0 of 2 CPU free "
        r"\(the 2 Train workers hold 0.5 CPU each\)\. Free CPUs \(other work, a sweep's "
        r"other trials\), lower scaling.cpus_per_worker or add nodes; "
        r"data.stall_timeout_s sets the wait", message), message
