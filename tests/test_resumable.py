"""Resumable per-rank streams over real shards through Ray Data: the plan partitions every
epoch exactly, a resume reads nothing before its position, a class-sorted dataset still
gives mixed batches, and broken shards are skipped and budgeted."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from data_pipelines.resumable import Position, StreamPlan, TrainStream
from data_pipelines.settings import PreprocessSettings
from data_pipelines.shards import Manifest, Sample, SplitInfo, write_shard
from data_pipelines.storage import resolve
from data_pipelines.streaming import bad_record_budget
from orchestration.train.training_job import user_facing_reason

pytestmark = pytest.mark.usefixtures("ray_session")
SETTINGS = PreprocessSettings(image_size=8, context_length=8, hflip=False)


def _png(colour: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (colour * 20 % 256, 40, 200 - colour * 10)).save(buffer, "PNG")
    return buffer.getvalue()


def class_sorted_dataset(uri: str, classes: int = 8, per_shard: int = 24) -> list[str]:
    """One class per shard, in class order (as ingest writes a class-folder dataset);
    returns the shard URIs."""
    root, shards = resolve(uri), []
    for index in range(classes):
        samples = [Sample(f"c{index}-{i:03d}", _png(index), "png", f"a shape of class {index}")
                   for i in range(per_shard)]
        shards.append(write_shard(root, "train", index, samples, "webdataset"))
    manifest = Manifest("webdataset", {"train": SplitInfo(classes * per_shard, shards)})
    root.join("manifest.json").write_text(manifest.to_json())
    return [root.join(name).uri for name in shards]


def _plan(shards, world_size=2, window=4, seed=0):
    return StreamPlan(tuple(shards), "webdataset", "test", seed, world_size, window,
                      samples_per_shard=24)


def _rows(plan, rank, start=Position(), counter=None, columns=("caption",)):
    stream = TrainStream(plan, columns, SETTINGS, counter)
    batches = stream.dataset(rank, start).iter_batches(batch_size=None, batch_format="numpy")
    return [(str(key), int(w), int(r), str(c)) for b in batches
            for key, w, r, c in zip(b["key"], b["_window"], b["_row"], b["caption"], strict=True)]


def test_plan_partitions_every_epoch_over_ranks_and_reshuffles_per_epoch():
    shards = [f"/data/train/part-{i:05d}.tar" for i in range(10)]
    plan = _plan(shards, world_size=3, window=2)
    for epoch in range(3):
        taken = [uri for rank in range(3) for window in plan.windows(epoch, rank)
                 for uri, _, _ in window]
        assert sorted(taken) == shards  # each shard on exactly one rank
        assert [len(w) for w in plan.windows(epoch, 0)] == [2, 2]  # shards 0, 3, 6, 9
    assert plan.windows(0, 0) != plan.windows(1, 0)
    assert plan.windows(0, 1) == _plan(shards, world_size=3, window=2).windows(0, 1)
    with pytest.raises(ValueError, match="has 10 shard.*num_workers is 11"):
        _plan(shards, world_size=11)


def unequal_dataset(uri: str, sizes: list[int]) -> tuple[list[str], list[int]]:
    """Shards of the given sizes (as img2dataset or an index gives them); sample j of shard
    i has the key s<i>-<j>. Returns the shard URIs and their counts, as a manifest has them."""
    root, shards = resolve(uri), []
    for index, size in enumerate(sizes):
        samples = [Sample(f"s{index}-{j:03d}", _png(index), "png", f"shard {index}")
                   for j in range(size)]
        shards.append(write_shard(root, "train", index, samples, "webdataset"))
    return [root.join(name).uri for name in shards], sizes


def test_unequal_shards_train_every_sample_once_an_epoch_but_the_named_few(tmp_path):
    """Split by sample, not by shard: 3 ranks get 27 of the 81 samples each (a shard may be
    cut between two ranks), batches of 4 take 24, and the 9 left are exactly those
    `left_out` names: fewer than world_size * batch_size, another few each epoch."""
    uris, sizes = unequal_dataset(str(tmp_path / "d"), [5, 13, 24, 2, 17, 9, 11])
    world, batch = 3, 4
    plan = StreamPlan(tuple(uris), "webdataset", "test", 0, world, 2, samples_per_shard=81 / 7,
                      shard_samples=tuple(sizes))
    key_of = {(uri, j): f"s{i}-{j:03d}" for i, uri in enumerate(uris) for j in range(sizes[i])}
    left_by_epoch = []
    with bad_record_budget(0.0) as counter:
        for epoch in range(2):
            start = Position(epoch=epoch)
            read = {rank: [row[0] for row in _rows(plan, rank, start, counter)]
                    for rank in range(world)}
            assert [len(read[rank]) for rank in range(world)] == [27, 27, 27]
            assert [read[rank] for rank in range(world)] == [
                [key_of[s] for s in plan.epoch_order(epoch, rank)] for rank in range(world)]
            trained = [key for rank in range(world) for key in read[rank][:24]]  # drop_last
            left = sorted(key_of[s] for s in plan.left_out(epoch, batch))
            assert len(trained) == len(set(trained)) == plan.samples_per_epoch(batch) == 72
            assert sorted(trained + left) == sorted(key_of.values())  # each sample once
            assert len(left) == 9 < world * batch
            left_by_epoch.append(left)
    assert left_by_epoch[0] != left_by_epoch[1]  # not the same samples left out every epoch
    cut = [uri for uri in uris if sum(p[0] == uri for r in range(world)
                                      for p in plan.pieces(0, r)) > 1]
    assert cut  # at least one shard is read by two ranks, each its own row range


def test_two_ranks_read_every_sample_once_and_resume_without_rereading(tmp_path):
    shards = class_sorted_dataset(str(tmp_path / "d"))
    plan = _plan(shards, window=2)  # 4 shards a rank: 2 windows of 48 samples
    with bad_record_budget(0.0) as counter:
        full = {rank: _rows(plan, rank, counter=counter) for rank in (0, 1)}
    keys = [row[0] for rank in (0, 1) for row in full[rank]]
    assert len(keys) == len(set(keys)) == 8 * 24  # every sample, once, across the ranks
    assert _rows(plan, 0) == full[0]  # the order follows from the seed alone
    # resume inside rank 0's second window: exactly the rest of the sequence
    cut = 48 + 10  # window 1, row 10
    assert full[0][cut][1:3] == (1, 10)
    # the shards of window 0 are gone: a resume past them must not read them
    for uri, _, _ in plan.windows(0, 0)[0]:
        resolve(uri).delete()
    assert _rows(plan, 0, Position(0, 1, 10)) == full[0][cut:]


def test_windows_mix_a_class_sorted_dataset(tmp_path):
    shards = class_sorted_dataset(str(tmp_path / "d"), per_shard=32)  # two batches a shard

    def classes_per_batch(window: int) -> float:
        rows = _rows(_plan(shards, world_size=1, window=window), 0)
        batches = [rows[i:i + 16] for i in range(0, len(rows) - 15, 16)]
        return float(np.mean([len({caption for *_, caption in b}) for b in batches]))

    assert classes_per_batch(window=1) == 1.0  # a shard at a time: one class per batch
    assert classes_per_batch(window=8) >= 6.0  # 8 classes in a window of 8 shards


def test_broken_shards_are_skipped_and_budgeted(tmp_path):
    shards = class_sorted_dataset(str(tmp_path / "d"), classes=4)
    plan = _plan(shards, world_size=1)
    truncated = resolve(shards[1])
    truncated.write_bytes(truncated.read_bytes()[:5000])  # cut mid-member
    resolve(shards[2]).delete()  # deleted between listing and reading
    with bad_record_budget(0.6) as counter:
        rows = _rows(plan, 0, counter=counter)
        import ray

        summary = ray.get(counter.summary.remote())
    per_class = Counter(key.split("-")[0] for key, *_ in rows)
    assert per_class["c0"] == per_class["c3"] == 24 and "c2" not in per_class
    assert 0 < per_class["c1"] < 24  # the samples before the cut survive
    assert summary["bad"] == 24 + (24 - per_class["c1"])
    assert any("part-00002" in reason for reason in summary["reasons"])
    with bad_record_budget(0.1) as counter, pytest.raises(Exception) as failure:
        _rows(plan, 0, counter=counter)
    reason = user_facing_reason(failure.value)  # what the user sees, from Ray's wrapping
    assert reason.startswith(f"{summary['bad']} of ") and reason.endswith(
        "unreadable so far (first: " + summary["reasons"][0] + "); raise "
        "data.max_skip_fraction or fix the shards")
