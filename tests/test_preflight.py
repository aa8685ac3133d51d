"""What is checked before any cluster resource is taken: the dataset against its manifest, the
batch against the dataset, the Train workers against the connected cluster. Each mistake is
one line naming the bad thing and the fix."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from data_pipelines.shards import (
    MANIFEST_NAME,
    Manifest,
    Sample,
    ShardWriter,
    SplitInfo,
    check_manifest_shards,
)
from data_pipelines.storage import StorageError, resolve
from orchestration.common.data_check import check_batch_fits, ensure_dataset
from orchestration.common.ray_runtime import (
    Capacity,
    ClusterTooSmall,
    check_cluster_fits,
    cluster_capacity,
)
from orchestration.config import ConfigError, load_config


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (value, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_dataset(uri: str, train: int = 6, test: int = 2, per_shard: int = 2) -> Manifest:
    """A small WebDataset dataset with its manifest, written without Ray."""
    root = resolve(uri)
    splits = {}
    for split, count in (("train", train), ("test", test)):
        writer = ShardWriter(root, split, "webdataset", per_shard)
        for index in range(count):
            writer.add(Sample(f"{split}-{index}", _png(index), "png", f"a red square {index}"))
        writer.flush()
        splits[split] = writer.info
    manifest = Manifest(format="webdataset", splits=splits)
    root.join(MANIFEST_NAME).write_text(manifest.to_json())
    return manifest


def config_for(uri: str, *extra: str):
    return load_config("tiny", [f"data.uri={uri}", "data.build_shapes_if_missing=false",
                                *extra])


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------ data


def test_missing_dataset_uri_is_one_line(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(StorageError) as err:
        ensure_dataset(config_for(str(missing)))
    assert one_line(err) == (
        f"no dataset at {missing}; build one with `unclip data shapes --out {missing}` or set "
        "data.build_shapes_if_missing=true")


def test_empty_dataset_is_one_line(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    empty = Manifest(format="webdataset", splits={"train": SplitInfo(), "test": SplitInfo()})
    (root / MANIFEST_NAME).write_text(empty.to_json())
    with pytest.raises(StorageError) as err:
        ensure_dataset(config_for(str(root)))
    assert one_line(err) == (
        f"dataset {root} has no train samples; rebuild it (`unclip data shapes`, "
        "`unclip data ingest` or `unclip data index`) or point data.uri at another dataset")


def test_manifest_that_disagrees_with_its_shards_is_one_line(tmp_path):
    root = tmp_path / "data"
    manifest = write_dataset(str(root))
    config = config_for(str(root))
    assert ensure_dataset(config).splits["train"].num_samples == 6  # intact: accepted

    (root / "train" / "part-00001.tar").unlink()
    with pytest.raises(StorageError) as err:
        ensure_dataset(config)
    assert one_line(err) == (
        f"dataset {root}: manifest.json lists 1 'train' shard(s) that are missing (first: "
        f"{root}/train/part-00001.tar); restore them, or rebuild the dataset (or its index) "
        "so the manifest matches the shards")

    write_dataset(str(root))
    (root / "test" / "part-00000.tar").write_bytes(b"")
    with pytest.raises(StorageError, match=r"lists 1 'test' shard\(s\) that are empty \(first: "
                                           rf"{root}/test/part-00000.tar\)"):
        ensure_dataset(config)

    manifest.splits["test"].shards = []  # counts samples, lists nothing
    (root / MANIFEST_NAME).write_text(manifest.to_json())
    with pytest.raises(StorageError) as err:
        ensure_dataset(config)
    assert one_line(err) == (f"dataset {root}: manifest.json counts 2 'test' samples but lists "
                             "no shards; rebuild the dataset (or its index)")


def test_indexed_manifest_with_absolute_shard_paths(tmp_path):
    """An index lists shards that live elsewhere by absolute path; a gone source shows."""
    source, index = tmp_path / "source", tmp_path / "index"
    manifest = write_dataset(str(source))
    for info in manifest.splits.values():
        info.shards = [str(source / entry) for entry in info.shards]
    manifest.layout = "indexed"
    index.mkdir()
    (index / MANIFEST_NAME).write_text(manifest.to_json())
    check_manifest_shards(str(index), manifest)
    (source / "train" / "part-00002.tar").unlink()
    with pytest.raises(StorageError, match=f"first: {source}/train/part-00002.tar"):
        ensure_dataset(config_for(str(index)))
    check_manifest_shards(str(index), manifest, splits=("test",))  # only the splits asked for


def test_manifest_shards_checked_on_s3(s3_bucket):
    import boto3

    uri = f"{s3_bucket}/shapes"
    write_dataset(uri)
    config = config_for(uri)
    assert ensure_dataset(config).splits["test"].num_samples == 2
    boto3.client("s3").delete_object(Bucket=s3_bucket[len("s3://"):],
                                     Key="shapes/train/part-00000.tar")
    with pytest.raises(StorageError) as err:
        ensure_dataset(config)
    assert f"lists 1 'train' shard(s) that are missing (first: {uri}/train/part-00000.tar)" in \
        one_line(err)
    assert "testing-secret" not in str(err.value)


def test_batch_larger_than_the_train_split_is_one_line(tmp_path):
    config = config_for(str(tmp_path), "clip.batch_size=4", "scaling.num_workers=2",
                        "scaling.cpus_per_worker=0.5")
    check_batch_fits(config, "clip", 8)
    with pytest.raises(StorageError) as err:
        check_batch_fits(config, "clip", 7)
    assert one_line(err) == (
        f"clip.batch_size=4 x scaling.num_workers=2 needs at least 8 train samples per epoch, "
        f"but dataset {tmp_path} has 7; lower clip.batch_size or scaling.num_workers, or use a "
        "larger dataset")


# --------------------------------------------------------------------------------- cluster

ONE_NODE = Capacity([({"CPU": 2.0, "memory": 8e9}, 1)], "the Ray cluster")


@pytest.mark.parametrize(("overrides", "capacity", "message"), [
    (["scaling.num_workers=3"], ONE_NODE,
     "scaling.num_workers=3 workers of 1 CPU each (scaling.cpus_per_worker) do not fit the Ray "
     "cluster: it can place at most 2 (2 CPU, 0 GPU on 1 node(s)); lower scaling.num_workers or "
     "scaling.cpus_per_worker, or add nodes"),
    (["scaling.cpus_per_worker=3"], ONE_NODE, "it can place at most 0 (2 CPU, 0 GPU"),
    (["scaling.use_gpu=true"], ONE_NODE,
     "scaling.use_gpu=true but the Ray cluster has no GPUs (2 CPU, 0 GPU on 1 node(s)); set "
     "scaling.use_gpu=false or connect to a cluster with GPU nodes (ray.address)"),
    # 3 CPUs in total, but a worker never spans two nodes
    (["scaling.num_workers=3"], Capacity([({"CPU": 1.5}, 2)], "the Ray cluster"),
     "it can place at most 2 (3 CPU, 0 GPU on 2 node(s))"),
    (["scaling.num_workers=2", "scaling.cpus_per_worker=0.5",
      "scaling.placement_strategy=STRICT_SPREAD"], ONE_NODE,
     "scaling.placement_strategy=STRICT_SPREAD puts each of the 2 workers on its own node, but "
     "the Ray cluster has 1 node(s) that can hold one; set scaling.placement_strategy=PACK or "
     "SPREAD, or lower scaling.num_workers"),
    (["scaling.num_workers=9", "scaling.use_gpu=true"],
     Capacity([({"CPU": 8.0}, 1), ({"CPU": 48.0, "GPU": 4.0}, 2)],
              "the Ray cluster at its autoscaling limit"),
     "scaling.num_workers=9 workers of 1 CPU + 1 GPU each (scaling.cpus_per_worker, "
     "scaling.use_gpu) do not fit the Ray cluster at its autoscaling limit: it can place at "
     "most 8 (104 CPU, 8 GPU on 3 node(s))"),
])
def test_workers_the_cluster_can_never_place_are_one_line(overrides, capacity, message):
    with pytest.raises(ClusterTooSmall) as err:
        check_cluster_fits(load_config("tiny", overrides), capacity)
    assert message in one_line(err)
    assert isinstance(err.value, ConfigError)  # the CLI prints it as one `error:` line


def test_workers_that_fit_pass():
    check_cluster_fits(load_config("tiny"), ONE_NODE)
    check_cluster_fits(load_config("tiny", ["scaling.num_workers=2",
                                            "scaling.cpus_per_worker=0.5"]), ONE_NODE)
    unbounded = Capacity([({"CPU": 4.0, "GPU": 1.0}, None)], "the Ray cluster at its limit")
    check_cluster_fits(load_config("tiny", ["scaling.num_workers=64", "scaling.use_gpu=true",
                                            "scaling.placement_strategy=STRICT_SPREAD"]),
                       unbounded)


@pytest.mark.usefixtures("ray_session")
def test_cluster_check_against_the_connected_cluster(tmp_path, monkeypatch):
    capacity = cluster_capacity()  # the test session's local instance: 2 CPUs, one node
    assert capacity is not None and capacity.total("CPU") == 2
    check_cluster_fits(load_config("tiny"))
    with pytest.raises(ClusterTooSmall, match=r"^scaling.num_workers=3 workers of 1 CPU each "
                                              r".* it can place at most 2 \(2 CPU, 0 GPU on 1 "
                                              r"node\(s\)\)"):
        check_cluster_fits(load_config("tiny", ["scaling.num_workers=3"]))
    # On a launcher (`ray up`) cluster whose limit Ray does not report, nodes may still come.
    monkeypatch.setenv("HOME", str(tmp_path))
    Path(tmp_path, "ray_bootstrap_config.yaml").write_text(json.dumps({"max_workers": 4}))
    assert cluster_capacity() is None
    check_cluster_fits(load_config("tiny", ["scaling.num_workers=3"]))
