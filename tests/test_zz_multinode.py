"""Two Ray nodes on this machine, one training worker on each, sharing data and checkpoints
through the S3 endpoint, the way a real cluster shares them; one node is lost mid-run. Runs
last: it replaces the session's single-node Ray instance with a two-node cluster."""

from __future__ import annotations

import json
import random
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


@pytest.fixture(scope="module")
def two_nodes(ray_session):
    """A head and a worker node (2 CPUs each) in place of the session's Ray instance; the
    tests replace the worker node as they remove it (`nodes["worker"]`)."""
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    nodes = {"worker": cluster.add_node(num_cpus=2)}  # 0.5 for the Train worker, the rest data
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        yield cluster, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()


def _config(tmp_path, bucket: str, run_name: str, steps: int = 10):
    return load_config("tiny", [
        f"data.uri={bucket}/shapes", f"storage_root={bucket}/runs", f"run_name={run_name}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        "data.shapes.train_size=120", "data.shapes.test_size=16",
        "data.shapes.samples_per_shard=60", "scaling.num_workers=2",
        "scaling.cpus_per_worker=0.5", "scaling.placement_strategy=STRICT_SPREAD",
        "scaling.max_failures=2", f"clip.steps={steps}", "clip.batch_size=8",
        "clip.log_every=2", "clip.checkpoint_every=3"])


def _logged(log_dir) -> dict[str, list[dict]]:
    return {path.stem: [json.loads(line) for line in path.read_text().splitlines()]
            for path in sorted(log_dir.glob("rank*.jsonl"))}


def _kept(log_dir) -> dict[tuple[str, int], list[str]]:
    """(rank, step) -> the keys of the step's last run: a step redone after a restart
    replaces the one lost with the node."""
    return {(rank, entry["step"]): entry["keys"]
            for rank, lines in _logged(log_dir).items() for entry in lines}


def _run_losing_the_worker_node(cluster, nodes, config, log_dir, *, at_step: int,
                                graceful: bool, **faults):
    """Train while the worker node is removed once every rank has logged `at_step`
    (gracefully, or with its raylet and workers SIGKILLed); a new node joins at once."""
    pool = ThreadPoolExecutor(1)
    try:
        training = pool.submit(run_stage, config, "clip", sample_log=str(log_dir), **faults)
        _wait_for_step(log_dir, at_step, ranks=2)
        if graceful:
            _wait_for_registered_checkpoint(f"{config.storage_root}/{config.run_name}/clip", 3)
        assert not training.done(), "training ended before the node was lost"
        cluster.remove_node(nodes["worker"], allow_graceful=graceful)
        nodes["worker"] = cluster.add_node(num_cpus=2)  # resources return
        return training.result(timeout=600)
    finally:
        pool.shutdown(wait=False)  # on a failure above, the cluster's shutdown ends it


def test_two_node_training_survives_losing_a_node(tmp_path, s3_bucket, two_nodes):
    """One worker on each of two nodes, data and checkpoints on S3. The worker node is
    removed mid-epoch (both workers held at step 4, after step 3's checkpoint) and another
    joins: Ray Train restarts both workers from step 3, and every step still trains on
    exactly the samples the plan gives it."""
    cluster, nodes = two_nodes
    config = _config(tmp_path, s3_bucket, "mn")
    log_dir = tmp_path / "samples"
    result = _run_losing_the_worker_node(cluster, nodes, config, log_dir, at_step=4,
                                         graceful=True, fail_at_step=4, fail_with="stall")
    assert result.final_metrics["step"] == 10
    assert result.portable_uri == f"{s3_bucket}/runs/mn/clip/portable"
    for lines in _logged(log_dir).values():  # step 4 redone after the loss
        assert [entry["step"] for entry in lines] == [1, 2, 3, 4, 4, 5, 6, 7, 8, 9, 10]
    kept = _kept(log_dir)
    expected = _expected_keys(config, 10)  # 7 steps of epoch 0 (60 // 8), 3 of epoch 1
    for rank in (0, 1):
        assert [k for s in range(1, 11) for k in kept[(f"rank{rank}", s)]] == expected[rank]
    epoch0 = [k for rank in (0, 1) for s in range(1, 8) for k in kept[(f"rank{rank}", s)]]
    assert len(set(epoch0)) == len(epoch0) == 112  # 2 x 7 batches of 8, none repeated
    history = MlflowClient(config.mlflow.tracking_uri).get_metric_history(result.run_id,
                                                                          "loss")
    assert [m.step for m in history] == [2, 4, 6, 8, 10]


def test_a_node_killed_hard_at_a_random_step_loses_and_repeats_no_sample(tmp_path, s3_bucket,
                                                                         two_nodes):
    """The worker node's raylet and workers SIGKILLed (no graceful shutdown) at a random
    step, not a prepared one: every (rank, step) trains on the keys an uninterrupted run on
    the same cluster trained on, and MLflow has each logged step once."""
    cluster, nodes = two_nodes
    seed = time.time_ns()
    at_step = random.Random(seed).randint(2, 9)
    steps = 14
    straight = _config(tmp_path, s3_bucket, "straight", steps)
    assert run_stage(straight, "clip", sample_log=str(tmp_path / "straight")
                     ).final_metrics["step"] == steps
    config = _config(tmp_path, s3_bucket, "hard", steps)
    result = _run_losing_the_worker_node(cluster, nodes, config, tmp_path / "hard",
                                         at_step=at_step, graceful=False)
    context = f"node killed once every rank had logged step {at_step} (seed {seed})"
    assert result.final_metrics["step"] == steps, context
    reference, kept = _kept(tmp_path / "straight"), _kept(tmp_path / "hard")
    assert sorted(kept) == sorted(reference) == [(f"rank{r}", s) for r in (0, 1)
                                                 for s in range(1, steps + 1)], context
    assert kept == reference, context
    history = MlflowClient(config.mlflow.tracking_uri).get_metric_history(result.run_id,
                                                                          "loss")
    assert [m.step for m in history] == list(range(2, steps + 1, 2)), context
