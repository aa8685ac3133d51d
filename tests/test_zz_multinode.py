"""Two Ray nodes on this machine, one training worker on each, sharing data and checkpoints
through the S3 endpoint, the way a real cluster shares them; one node is lost mid-run. Runs
last: it replaces the session's single-node Ray instance with a two-node cluster."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
from mlflow.tracking import MlflowClient

from data_pipelines.storage import resolve
from orchestration.config import load_config
from orchestration.train.training_job import run_stage

pytestmark = pytest.mark.slow


def _expected_keys(config, steps: int) -> dict[int, list[str]]:
    """Each rank's keys for `steps` steps, read on the driver from the same plan: the order
    follows from the seed alone, whatever node a worker runs on."""
    from data_pipelines.resumable import Position
    from data_pipelines.streaming import bad_record_budget
    from orchestration.train.tasks.clip import ClipTask

    batch = config.clip.batch_size
    with bad_record_budget(0.01) as counter:
        stream = ClipTask(config).datasets(counter)["train"]
        expected = {}
        for rank in range(config.scaling.num_workers):
            keys, epoch = [], 0
            while len(keys) < steps * batch:
                rows = [str(k) for b in stream.dataset(rank, Position(epoch)).iter_batches(
                    batch_size=batch, batch_format="numpy", drop_last=True) for k in b["key"]]
                keys += rows
                epoch += 1
            expected[rank] = keys[:steps * batch]
    return expected


def _wait_for_step(log_dir, step: int, ranks: int, timeout: float = 300.0) -> None:
    """Until every rank has logged `step`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # complete lines only: a worker may be halfway through appending the last one
        reached = [path for path in log_dir.glob("rank*.jsonl")
                   if any(json.loads(line)["step"] >= step
                          for line in path.read_text().split("\n")[:-1])]
        if len(reached) == ranks:
            return
        time.sleep(0.2)
    raise TimeoutError(f"training never reached step {step} on all {ranks} ranks")


def _wait_for_registered_checkpoint(experiment_uri: str, step: int,
                                    timeout: float = 120.0) -> None:
    """Until Ray Train's controller has registered the checkpoint of `step`: a worker's
    report waits in a queue the controller polls every 2 s, and a restart resumes from the
    latest checkpoint the controller holds, not the latest one a worker uploaded. The
    controller writes its holdings to the run's storage (its snapshot file) on each."""
    snapshot = resolve(experiment_uri).join("checkpoint_manager_snapshot.json")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if snapshot.exists():
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
            if latest.get("metrics", {}).get("step") == step:
                return
        time.sleep(0.2)
    raise TimeoutError(f"the step {step} checkpoint was never registered at {snapshot.uri}")


def test_two_node_training_survives_losing_a_node(tmp_path, s3_bucket, ray_session):
    """One worker on each of two nodes, data and checkpoints on S3. The worker node is
    removed mid-epoch (both workers held at step 4, after step 3's checkpoint) and another
    joins: Ray Train restarts both workers from step 3, and every step still trains on
    exactly the samples the plan gives it."""
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    worker_node = cluster.add_node(num_cpus=2)  # 0.5 for the Train worker, the rest for data
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        config = load_config("tiny", [
            f"data.uri={s3_bucket}/shapes", f"storage_root={s3_bucket}/runs", "run_name=mn",
            f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            "data.shapes.train_size=120", "data.shapes.test_size=16",
            "data.shapes.samples_per_shard=60", "scaling.num_workers=2",
            "scaling.cpus_per_worker=0.5", "scaling.placement_strategy=STRICT_SPREAD",
            "scaling.max_failures=2", "clip.steps=10", "clip.batch_size=8",
            "clip.log_every=2", "clip.checkpoint_every=3"])
        log_dir = tmp_path / "samples"
        pool = ThreadPoolExecutor(1)
        try:
            training = pool.submit(run_stage, config, "clip", sample_log=str(log_dir),
                                   fail_at_step=4, fail_with="stall")
            _wait_for_step(log_dir, 4, ranks=2)
            _wait_for_registered_checkpoint(f"{s3_bucket}/runs/mn/clip", 3)
            cluster.remove_node(worker_node)  # its worker dies with it, mid-epoch
            cluster.add_node(num_cpus=2)  # resources return
            result = training.result(timeout=600)
        finally:
            pool.shutdown(wait=False)  # on a failure above, the cluster's shutdown ends it
        assert result.final_metrics["step"] == 10
        assert result.portable_uri == f"{s3_bucket}/runs/mn/clip/portable"
        kept = {}
        for path in sorted(log_dir.glob("rank*.jsonl")):
            lines = [json.loads(line) for line in path.read_text().splitlines()]
            steps = [entry["step"] for entry in lines]
            assert steps == [1, 2, 3, 4, 4, 5, 6, 7, 8, 9, 10]  # step 4 redone after the loss
            for entry in lines:
                kept.setdefault(path.stem, {})[entry["step"]] = entry["keys"]
        expected = _expected_keys(config, 10)  # 7 steps of epoch 0 (60 // 8), 3 of epoch 1
        for rank in (0, 1):
            steps = kept[f"rank{rank}"]
            assert sorted(steps) == list(range(1, 11))
            assert [k for s in range(1, 11) for k in steps[s]] == expected[rank]
        epoch0 = [k for rank in (0, 1) for s in range(1, 8) for k in kept[f"rank{rank}"][s]]
        assert len(set(epoch0)) == len(epoch0) == 112  # 2 x 7 batches of 8, none repeated
        history = MlflowClient(config.mlflow.tracking_uri).get_metric_history(result.run_id,
                                                                              "loss")
        assert [m.step for m in history] == [2, 4, 6, 8, 10]
    finally:
        ray.shutdown()
        cluster.shutdown()
