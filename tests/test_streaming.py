"""Shards written through the CLI, streamed back through Ray Data: S3 endpoint and local folder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_pipelines.settings import PreprocessSettings, ShapesSettings
from data_pipelines.shapes import build_shapes
from data_pipelines.shards import read_manifest
from data_pipelines.storage import resolve
from data_pipelines.streaming import image_caption_dataset

TINY = ["--set", "data.shapes.train_size=300", "--set", "data.shapes.test_size=60",
        "--set", "data.shapes.samples_per_shard=100"]


def _stream_all(uri: str, split: str, settings: PreprocessSettings, consumers: int = 1):
    """Batches per consumer; streaming_split consumers must read concurrently, as workers do."""
    from concurrent.futures import ThreadPoolExecutor

    dataset = image_caption_dataset(uri, split, settings, seed=0)
    iterators = dataset.streaming_split(consumers, equal=False)
    with ThreadPoolExecutor(consumers) as pool:
        return list(pool.map(
            lambda it: list(it.iter_batches(batch_size=32, batch_format="numpy")), iterators))


def _check_batches(batches, size: int, context_length: int) -> int:
    total = 0
    for batch in batches:
        image, tokens = batch["image"], batch["tokens"]
        assert image.dtype == np.float32 and image.shape[1:] == (3, size, size)
        assert -1.0 <= image.min() and image.max() <= 1.0
        assert image.std() > 0.05  # real pictures, not a constant
        assert tokens.shape[1:] == (context_length,) and tokens.dtype == np.int64
        # open_clip's SimpleTokenizer: start-of-text 49406 first, end-of-text 49407 present
        assert (tokens[:, 0] == 49406).all() and ((tokens == 49407).sum(axis=1) == 1).all()
        assert all(caption.startswith("a ") for caption in batch["caption"])
        total += len(batch["key"])
    return total


@pytest.mark.usefixtures("ray_session")
def test_s3_shapes_through_cli_and_stream_back(run_cli, s3_bucket):
    uri = f"{s3_bucket}/shapes"
    code, _, err = run_cli("data", "shapes", "--out", uri, *TINY)
    assert code == 0, err
    manifest = read_manifest(uri)
    assert manifest.splits["train"].num_samples == 300
    assert manifest.splits["test"].num_samples == 60
    assert manifest.splits["train"].shards == [f"train/part-0000{i}.tar" for i in range(3)]
    assert manifest.extra["held_out_pairs"]
    # held-out pairs never appear in train captions; some appear in test
    settings = PreprocessSettings(image_size=32, context_length=16)
    per_worker = _stream_all(uri, "train", settings, consumers=2)
    assert sum(_check_batches(b, 32, 16) for b in per_worker) == 300
    assert all(per_worker), "each streaming_split consumer gets data"
    held_out = [f"{c} {s}" for c, s in manifest.extra["held_out_pairs"]]
    train_captions = [c for b in per_worker for batch in b for c in batch["caption"]]
    assert not any(pair in c for pair in held_out for c in train_captions)
    test_captions = [c for b in _stream_all(uri, "test", settings) for batch in b
                     for c in batch["caption"]]
    assert any(pair in c for pair in held_out for c in test_captions)


@pytest.mark.usefixtures("ray_session")
def test_local_folder_parquet_and_crop(tmp_path):
    uri = str(tmp_path / "shapes")
    build_shapes(uri, ShapesSettings(train_size=120, test_size=20, image_size=48,
                                     samples_per_shard=50), fmt="parquet")
    assert sorted(p.name for p in (tmp_path / "shapes" / "train").iterdir()) == [
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    settings = PreprocessSettings(image_size=24, random_crop=True, context_length=32)
    batches = _stream_all(uri, "train", settings)[0]
    assert _check_batches(batches, 24, 32) == 120


def test_shapes_are_deterministic_by_seed(tmp_path):
    settings = ShapesSettings(train_size=40, test_size=10, samples_per_shard=20)
    build_shapes(str(tmp_path / "a"), settings, use_ray=False)
    build_shapes(str(tmp_path / "b"), settings, use_ray=False)
    build_shapes(str(tmp_path / "c"), settings.model_copy(update={"seed": 1}), use_ray=False)
    shard = "train/part-00000.tar"
    a, b, c = (resolve(str(tmp_path / d)).join(shard).read_bytes() for d in "abc")
    assert a == b and a != c


def test_augmentation_reproducible_per_epoch(tmp_path, ray_session):
    uri = str(tmp_path / "shapes")
    build_shapes(uri, ShapesSettings(train_size=64, test_size=8, samples_per_shard=64),
                 use_ray=False)
    settings = PreprocessSettings(image_size=32, random_crop=True, crop_scale=(0.5, 0.7))

    def epoch_images(epoch: int) -> dict:
        ds = image_caption_dataset(uri, "train", settings, seed=3, epoch=epoch)
        rows = ds.take_all()
        return {r["key"]: r["image"] for r in rows}

    first, again, other = epoch_images(0), epoch_images(0), epoch_images(1)
    assert first.keys() == again.keys() == other.keys()
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert any(not np.array_equal(first[k], other[k]) for k in first)


@pytest.mark.usefixtures("ray_session")
def test_corrupt_records_are_skipped_within_budget_and_fail_past_it(tmp_path):
    import io
    import tarfile

    from data_pipelines.shards import MANIFEST_NAME, Manifest, SplitInfo

    def write_dataset(root, bad: int, good: int):
        buffer = io.BytesIO()
        src = ShapesSettings(train_size=good, test_size=1, samples_per_shard=good)
        from data_pipelines.shapes import render_shard

        samples = render_shard(src, "train", 0, good)
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for i, s in enumerate(samples):
                payload = s.image if i >= bad else b"\x89PNG broken"
                for name, data in ((f"{s.key}.png", payload), (f"{s.key}.txt",
                                                                 s.caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        (root / "train").mkdir(parents=True)
        (root / "train" / "part-00000.tar").write_bytes(buffer.getvalue())
        manifest = Manifest("webdataset", {"train": SplitInfo(good, ["train/part-00000.tar"])})
        (root / MANIFEST_NAME).write_text(manifest.to_json())

    settings = PreprocessSettings(image_size=32)
    ok_root = tmp_path / "ok"
    write_dataset(ok_root, bad=2, good=200)
    rows = image_caption_dataset(str(ok_root), "train", settings,
                                 max_skip_fraction=0.05).take_all()
    assert len(rows) == 198
    bad_root = tmp_path / "bad"
    write_dataset(bad_root, bad=100, good=200)
    with pytest.raises(Exception, match="unreadable so far"):
        image_caption_dataset(str(bad_root), "train", settings,
                              max_skip_fraction=0.05).take_all()
    assert json.loads((bad_root / MANIFEST_NAME).read_text())["num_samples"] == 200
