"""Two Ray nodes on this machine, one training worker on each, sharing data and checkpoints
through the S3 endpoint — the way a real cluster shares them. Runs last: it replaces the
session's single-node Ray instance with a two-node cluster."""

from __future__ import annotations

import pytest
import ray
from mlflow.tracking import MlflowClient

from orchestration.config import load_config
from orchestration.training_job import run_stage

pytestmark = pytest.mark.slow


def test_two_node_training_through_s3(tmp_path, s3_bucket, ray_session):
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)  # 0.5 for the Train worker, the rest for Ray Data tasks
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
            "clip.steps=6", "clip.batch_size=8", "clip.log_every=2", "clip.checkpoint_every=3",
        ])
        result = run_stage(config, "clip")
        assert result.final_metrics["step"] == 6
        assert result.portable_uri == f"{s3_bucket}/runs/mn/clip/portable"
        history = MlflowClient(config.mlflow.tracking_uri).get_metric_history(result.run_id,
                                                                              "loss")
        assert len(history) == 3
    finally:
        ray.shutdown()
        cluster.shutdown()
