"""`unclip data inspect`: counts, caption statistics, skipped reasons and a contact sheet.

Only the manifest and a bounded number of shards are read, so inspecting a large dataset in
object storage stays quick; the report says how many captions the statistics cover.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont, ImageOps

from data_pipelines.images import BadImage, decode_image
from data_pipelines.shards import (
    Manifest,
    iter_webdataset_members,
    read_manifest,
    shard_location,
)
from data_pipelines.storage import Location, resolve

THUMB = 128  # contact-sheet cell width and image height, pixels
PAD = 8
CAPTION_LINES = 3
LINE_HEIGHT = 12
CAPTION_HEIGHT = CAPTION_LINES * LINE_HEIGHT + 4
_SHARD_IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")

SampleRow = tuple[str, bytes, str]  # (key, encoded image, caption)


def inspect_dataset(uri: str, *, contact_sheet: str | None, num_samples: int = 16,
                    seed: int = 0, max_shards: int = 8) -> dict:
    """Summarise the dataset at `uri`; draw `num_samples` random samples into `contact_sheet`."""
    manifest = read_manifest(uri)
    shards = pick_shards(manifest, max_shards)
    captions: list[str] = []
    picker = ReservoirSample(num_samples, seed)
    root = resolve(uri)
    for shard in shards:
        for row in read_shard(shard_location(root, shard), manifest.format):
            captions.append(row[2])
            picker.offer(row)
    report = {
        "uri": uri,
        "format": manifest.format,
        "layout": manifest.layout,
        "source": manifest.source,
        "num_samples": manifest.num_samples,
        "splits": {name: {"num_samples": info.num_samples, "num_shards": len(info.shards)}
                   for name, info in manifest.splits.items()},
        "num_skipped": manifest.num_skipped,
        "skipped_reasons": skipped_reasons(manifest),
        "captions": caption_stats(captions, len(shards), _num_shards(manifest)),
        "contact_sheet": None,
    }
    if contact_sheet and picker.items:
        size = write_contact_sheet(picker.items, contact_sheet)
        report["contact_sheet"] = {"path": contact_sheet, "num_samples": len(picker.items),
                                   "width": size[0], "height": size[1]}
    return report


def _num_shards(manifest: Manifest) -> int:
    return sum(len(info.shards) for info in manifest.splits.values())


def pick_shards(manifest: Manifest, max_shards: int) -> list[str]:
    """Up to `max_shards` shards, taken from the splits in turn so each split is represented."""
    queues = [list(info.shards) for info in manifest.splits.values()]
    picked: list[str] = []
    while len(picked) < max_shards and any(queues):
        for queue in queues:
            if queue and len(picked) < max_shards:
                picked.append(queue.pop(0))
    return picked


def read_shard(location: Location, fmt: str) -> Iterator[SampleRow]:
    data = location.read_bytes()
    if fmt == "parquet":
        table = pq.read_table(pa.BufferReader(data), columns=["key", "image", "caption"])
        yield from zip(*(table.column(c).to_pylist() for c in ("key", "image", "caption")),
                       strict=True)
        return
    for key, members in iter_webdataset_members(data):
        ext = next((e for e in _SHARD_IMAGE_EXTS if e in members), None)
        if ext is not None:
            yield key, members[ext], members.get("txt", b"").decode("utf-8", "replace")


class ReservoirSample:
    """A uniform random sample of fixed size from a stream of unknown length (seeded)."""

    def __init__(self, size: int, seed: int):
        self.size, self.seen = size, 0
        self.items: list = []
        self._rng = random.Random(seed)

    def offer(self, item) -> None:
        self.seen += 1
        if len(self.items) < self.size:
            self.items.append(item)
            return
        slot = self._rng.randrange(self.seen)
        if slot < self.size:
            self.items[slot] = item


def skipped_reasons(manifest: Manifest) -> dict[str, int]:
    """Reason kinds ("truncated or corrupt image", "no caption", ...) with counts, most first."""
    counts = Counter(s.reason.split(":", 1)[0].strip() for s in manifest.skipped)
    return dict(counts.most_common())


def caption_stats(captions: list[str], shards_read: int, shards_total: int) -> dict:
    return {
        "measured": len(captions),
        "shards_read": shards_read,
        "shards_total": shards_total,
        "chars": _min_mean_max([len(c) for c in captions]),
        "words": _min_mean_max([len(c.split()) for c in captions]),
    }


def _min_mean_max(values: list[int]) -> dict:
    if not values:
        return {"min": None, "mean": None, "max": None}
    return {"min": min(values), "mean": round(statistics.fmean(values), 2), "max": max(values)}


# ---------------------------------------------------------------- contact sheet


def sheet_grid(num_samples: int) -> tuple[int, int]:
    """(columns, rows) of a near-square grid."""
    cols = max(1, math.ceil(math.sqrt(num_samples)))
    return cols, max(1, math.ceil(num_samples / cols))


def contact_sheet_size(num_samples: int) -> tuple[int, int]:
    cols, rows = sheet_grid(num_samples)
    return cols * THUMB + (cols + 1) * PAD, rows * (THUMB + CAPTION_HEIGHT) + (rows + 1) * PAD


def write_contact_sheet(rows: list[SampleRow], path: str) -> tuple[int, int]:
    """Grid of thumbnails with wrapped captions under them, saved as PNG; returns its size."""
    cols, _ = sheet_grid(len(rows))
    sheet = Image.new("RGB", contact_sheet_size(len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for index, (_key, image_bytes, caption) in enumerate(rows):
        col, row = index % cols, index // cols
        left = PAD + col * (THUMB + PAD)
        top = PAD + row * (THUMB + CAPTION_HEIGHT + PAD)
        thumb = _thumbnail(image_bytes)
        sheet.paste(thumb, (left + (THUMB - thumb.width) // 2, top + (THUMB - thumb.height) // 2))
        for line_no, line in enumerate(wrap_caption(caption, font, THUMB)):
            draw.text((left, top + THUMB + 2 + line_no * LINE_HEIGHT), line, fill="black",
                      font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return sheet.size


def _thumbnail(image_bytes: bytes) -> Image.Image:
    try:
        image = decode_image(image_bytes)
    except BadImage:
        return Image.new("RGB", (THUMB, THUMB), (200, 0, 0))  # visible marker for a bad sample
    # Small images (32x32 shapes) are enlarged with crisp pixels rather than blurred.
    upscale = image.width < THUMB and image.height < THUMB
    method = Image.Resampling.NEAREST if upscale else Image.Resampling.BICUBIC
    return ImageOps.contain(image, (THUMB, THUMB), method=method)


def wrap_caption(text: str, font, width: int, max_lines: int = CAPTION_LINES) -> list[str]:
    """Greedy word wrap to `width` pixels; overlong words are cut, overflow ends in '...'."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if font.getlength(candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = _fit(word, font, width)
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _fit(lines[-1] + "...", font, width, keep_tail="...")
    return lines


def _fit(text: str, font, width: int, keep_tail: str = "") -> str:
    """Cut `text` so it fits `width`, keeping `keep_tail` at the end."""
    body = text[: len(text) - len(keep_tail)] if keep_tail else text
    while body and font.getlength(body + keep_tail) > width:
        body = body[:-1]
    return body + keep_tail


# ---------------------------------------------------------------- text report


def format_report(report: dict) -> str:
    layout = "; indexed in place" if report.get("layout") == "indexed" else ""
    lines = [f"dataset   {report['uri']}  ({report['format']}{layout}; "
             f"source: {report['source'] or '-'})"]
    splits = ", ".join(f"{name} {info['num_samples']} in {info['num_shards']} shard(s)"
                       for name, info in report["splits"].items())
    lines.append(f"samples   {report['num_samples']}  ({splits})")
    lines.append(f"skipped   {report['num_skipped']}")
    lines += [f"  {count:6d}  {reason}" for reason, count in report["skipped_reasons"].items()]
    stats = report["captions"]
    lines.append(f"captions  {stats['measured']} measured in {stats['shards_read']} of "
                 f"{stats['shards_total']} shard(s)")
    for unit in ("chars", "words"):
        s = stats[unit]
        if s["min"] is not None:
            lines.append(f"  {unit:6s}  min {s['min']}  mean {s['mean']}  max {s['max']}")
    sheet = report.get("contact_sheet")
    if sheet:
        lines.append(f"contact sheet  {sheet['path']}  ({sheet['num_samples']} samples, "
                     f"{sheet['width']}x{sheet['height']})")
    return "\n".join(lines)
