"""WebDataset shards as other tools write them, to a local folder or S3: img2dataset's output
folder (tar + metadata Parquet + stats JSON per shard) and the webdataset library's TarWriter."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from data_pipelines.storage import resolve


def jpeg(seed: int, size: tuple[int, int] = (20, 16)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def img2dataset_key(shard: int, row: int) -> str:
    """img2dataset's key: the shard number (5 digits) then the row in the shard (4 digits)."""
    return f"{shard:05d}{row:04d}"


def write_img2dataset(uri: str, shard_sizes: list[int], failed_per_shard: int = 2) -> dict:
    """An img2dataset `--output_format webdataset` folder: per shard `00000.tar` (members
    `<key>.jpg`, `.txt`, `.json` for each success), `00000.parquet` (every input row with its
    status; no image bytes) and `00000_stats.json`. Returns {key: caption} of the successes."""
    root, captions = resolve(uri), {}
    for shard, size in enumerate(shard_sizes):
        rows = [_row(shard, i, ok=i < size) for i in range(size + failed_per_shard)]
        successes = [r for r in rows if r["status"] == "success"]
        root.join(f"{shard:05d}.tar").write_bytes(_img2dataset_tar(successes))
        root.join(f"{shard:05d}.parquet").write_bytes(_parquet(rows))
        root.join(f"{shard:05d}_stats.json").write_text(json.dumps({
            "count": len(rows), "successes": len(successes),
            "failed_to_download": failed_per_shard, "failed_to_resize": 0,
            "duration": 1.5, "status_dict": {"success": len(successes)},
        }))
        captions.update({r["key"]: r["caption"] for r in successes})
    return captions


def _row(shard: int, index: int, ok: bool) -> dict:
    key = img2dataset_key(shard, index)
    return {"url": f"http://example.com/{key}.jpg", "caption": f"photo {key} of a cat",
            "key": key, "status": "success" if ok else "failed_to_download",
            "error_message": None if ok else "HTTP 404", "width": 20 if ok else None,
            "height": 16 if ok else None}


def _img2dataset_tar(rows: list[dict]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for row in rows:
            meta = {k: row[k] for k in ("url", "key", "status", "width", "height")}
            for ext, payload in (("jpg", jpeg(int(row["key"]))),
                                 ("txt", row["caption"].encode()),
                                 ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{row['key']}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def _parquet(rows: list[dict]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue()


def write_tarwriter_shard(path: str, samples: list[dict]) -> None:
    """One shard written by the webdataset library itself (`wds.TarWriter`)."""
    with wds.TarWriter(path) as sink:
        for sample in samples:
            sink.write(sample)
