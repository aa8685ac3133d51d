"""Ray Data datasets over image-caption shards (local or S3), preprocessed for training.

Decoding, crop/resize/flip, scaling to [-1, 1] and caption tokenisation run as Ray Data tasks,
not in the training workers. Augmentation randomness is derived from (seed, epoch, sample key),
so an epoch is reproducible whichever worker or block a sample lands on; that is what
mid-epoch resumption will build on. Bad records are dropped and counted against an error
budget held by a small actor; past the budget the dataset fails with one clear line.
"""

from __future__ import annotations

import contextlib
import hashlib

import numpy as np
import ray
from PIL import Image

from data_pipelines.images import BadImage, decode_image
from data_pipelines.settings import PreprocessSettings
from data_pipelines.shards import STREAM_IMAGE_EXTS, read_manifest, shard_location
from data_pipelines.storage import StorageError, resolve

MIN_SEEN_FOR_BUDGET = 64  # don't judge the error rate on a handful of samples


class BadRecordBudgetExceeded(RuntimeError):
    pass


@ray.remote(num_cpus=0)
class BadRecordCounter:
    """Counts seen and dropped records across all preprocessing tasks of one dataset."""

    def __init__(self, max_fraction: float):
        self.max_fraction, self.seen, self.bad = max_fraction, 0, 0
        self.reasons: list[str] = []

    def record(self, seen: int, bad: int, reasons: list[str]) -> tuple[int, int, bool]:
        self.seen += seen
        self.bad += bad
        self.reasons.extend(reasons[: max(0, 5 - len(self.reasons))])
        over = self.seen >= MIN_SEEN_FOR_BUDGET and self.bad > self.max_fraction * self.seen
        return self.seen, self.bad, over

    def summary(self) -> dict:
        return {"seen": self.seen, "bad": self.bad, "reasons": self.reasons}


def new_counter(max_fraction: float):
    """A BadRecordCounter beside the driver (whose node outlives any worker node); restarted
    (its counts from zero) if even that node goes, so data tasks never hold a dead handle."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return BadRecordCounter.options(scheduling_strategy=here, max_restarts=-1,
                                    max_task_retries=-1).remote(max_fraction)


@contextlib.contextmanager
def bad_record_budget(max_fraction: float):
    """One BadRecordCounter shared by the datasets built inside (e.g. every epoch of a run),
    killed on exit: tasks keep the handle they were given, so it would otherwise live as long
    as the driver does."""
    counter = new_counter(max_fraction)
    try:
        yield counter
    finally:
        ray.kill(counter)


def tokenize(captions: list[str], context_length: int) -> np.ndarray:
    """`models.clip_model.tokenize` as an int64 array (imported here, on first use: importing
    this module does not pay for torch and open_clip)."""
    from models.clip_model import tokenize as clip_tokenize

    return clip_tokenize(captions, context_length=context_length).numpy()


def _sample_rng(key: str, seed: int, epoch: int) -> np.random.Generator:
    digest = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def preprocess_image(image: Image.Image, settings: PreprocessSettings, rng: np.random.Generator,
                     train: bool) -> np.ndarray:
    """PIL RGB -> float32 CHW in [-1, 1]: (random crop, then) resize, random flip."""
    size = settings.image_size
    if train and settings.random_crop:
        w, h = image.size
        area = w * h * rng.uniform(*settings.crop_scale)
        side = int(round(min(np.sqrt(area), w, h)))
        left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        image = image.crop((left, top, left + side, top + side))
    else:  # centre square crop keeps the aspect ratio honest
        w, h = image.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    if train and settings.hflip and rng.random() < 0.5:
        array = array[:, ::-1]
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def _images(batch: dict) -> list:
    """Each row's image bytes from its first image column that has them: shards may mix jpg
    and png, and a block then has both columns, empty (None or NaN) where a sample lacks one."""
    columns = [list(batch[ext]) for ext in (*STREAM_IMAGE_EXTS, "image") if ext in batch]
    if not columns:
        raise KeyError(f"no image column among {sorted(batch)}")
    return [next((c[i] for c in columns if isinstance(c[i], bytes | bytearray)), None)
            for i in range(len(columns[0]))]


def _caption_of(batch: dict, index: int) -> str:
    for column in ("txt", "caption"):
        if column in batch:
            value = batch[column][index]
            if isinstance(value, bytes):
                return value.decode("utf-8", "replace")
            return value if isinstance(value, str) else ""  # None / NaN: no caption
    return ""


def preprocess_batch(batch: dict, *, settings: PreprocessSettings, train: bool, seed: int,
                     epoch: int, counter=None, count_seen: bool = True) -> dict:
    """Decode and augment a batch of raw samples, dropping (and budgeting) unreadable ones;
    `count_seen=False` when the reader has counted the batch's records already."""
    keys = [str(k) for k in batch.get("__key__", batch.get("key"))]
    images = _images(batch)
    out_keys, captions, arrays, reasons, kept = [], [], [], [], []
    for index, (key, data) in enumerate(zip(keys, images, strict=True)):
        caption = _caption_of(batch, index).strip()
        try:
            if data is None or not caption:
                raise BadImage("missing image or caption")
            image = decode_image(bytes(data))
        except BadImage as exc:
            reasons.append(f"{key}: {exc}")
            continue
        arrays.append(preprocess_image(image, settings, _sample_rng(key, seed, epoch), train))
        out_keys.append(key)
        captions.append(caption)
        kept.append(index)
    seen_here = len(keys) if count_seen else 0
    if counter is not None and reasons:
        seen, bad, over = ray.get(counter.record.remote(seen_here, len(reasons), reasons))
        if over:
            raise BadRecordBudgetExceeded(
                f"{bad} of {seen} records unreadable so far (first: {reasons[0]}); "
                "raise data.max_skip_fraction or fix the shards"
            )
    elif counter is not None and seen_here:
        counter.record.remote(seen_here, 0, [])
    size, length = settings.image_size, settings.context_length
    return {
        "key": np.array(out_keys, dtype=object),
        "caption": np.array(captions, dtype=object),
        "image": np.stack(arrays) if arrays else np.zeros((0, 3, size, size), np.float32),
        "tokens": tokenize(captions, length) if captions else np.zeros((0, length), np.int64),
        # bookkeeping columns (e.g. a sample's place in a resumable stream) follow their rows
        **{name: np.asarray(batch[name])[kept] for name in batch if name.startswith("_")},
    }


def shard_uris(uri: str, split: str) -> tuple[object, list[str], str]:
    """(pyarrow filesystem, shard paths, format) for one split of a dataset; an indexed
    dataset's shards are read where they are."""
    manifest = read_manifest(uri)
    if split not in manifest.splits:
        raise StorageError(
            f"dataset {uri} has no split '{split}' (it has: {', '.join(manifest.splits)})"
        )
    if not manifest.splits[split].shards:  # Ray's own refusal would not say which split
        raise StorageError(
            f"dataset {uri} has no '{split}' shards; rebuild it with a {split} split "
            "(`unclip data ingest --test-fraction F` or `unclip data index --test-shards N`)"
        )
    root = resolve(uri)
    shards = [shard_location(root, name) for name in manifest.splits[split].shards]
    if len({shard.is_s3 for shard in shards}) > 1:  # one read, one filesystem
        raise StorageError(
            f"dataset {uri} lists '{split}' shards both on S3 and on local disk; "
            "index local and S3 shards into separate datasets"
        )
    filesystem = shards[0].filesystem if shards else root.filesystem
    return filesystem, [shard.path for shard in shards], manifest.format


def image_caption_dataset(uri: str, split: str, settings: PreprocessSettings, *,
                          train: bool = True, seed: int = 0, epoch: int = 0,
                          max_skip_fraction: float = 0.01, counter=None) -> ray.data.Dataset:
    """Preprocessed rows {key, caption, image [3,H,W] float32, tokens [L] int64}.

    Unreadable records are dropped and counted; past `max_skip_fraction` the read fails.
    Long-lived drivers pass a `counter` from `bad_record_budget` (its fraction then applies).
    Training reads its train split through `data_pipelines.resumable` instead; this reads a
    split whole, in manifest order (test splits, the embedding job).
    """
    filesystem, paths, fmt = shard_uris(uri, split)
    if fmt == "webdataset":
        dataset = ray.data.read_webdataset(paths, filesystem=filesystem, decoder=None)
    else:
        dataset = ray.data.read_parquet(paths, filesystem=filesystem,
                                        columns=["key", "image", "caption"])
    counter = counter or new_counter(max_skip_fraction)
    return dataset.map_batches(
        preprocess_batch,
        batch_size=128,
        fn_kwargs={"settings": settings, "train": train, "seed": seed, "epoch": epoch,
                   "counter": counter},
    )
