"""`inspect_dataset` after a real ingest: counts, caption statistics, skipped reasons, sheet."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageFont

from data_pipelines.ingest import ingest
from data_pipelines.inspect_dataset import (
    CAPTION_LINES,
    THUMB,
    contact_sheet_size,
    format_report,
    inspect_dataset,
    wrap_caption,
)

LONG_CAPTION = ("a very long caption about purple permanganate crystals photographed under "
                "polarised light at high magnification with a scale bar in the corner")
CAPTIONS = {f"cls {i}/img{i}": f"caption number {i}" for i in range(9)}
CAPTIONS["cls 9/img9"] = LONG_CAPTION


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inspect src")
    for index, (stem, caption) in enumerate(CAPTIONS.items()):
        (root / stem).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40 + index, 30), (index * 25, 80, 160)).save(root / f"{stem}.png")
        (root / f"{stem}.txt").write_text(caption)
    (root / "cls 0" / "broken.png").write_bytes(b"")
    (root / "cls 0" / "fake.jpg").write_bytes(b"hello")
    return root


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_inspect_reports_counts_captions_and_skips(source, tmp_path, fmt):
    out = tmp_path / "ds"
    manifest = ingest(str(source), str(out), fmt=fmt, samples_per_shard=3, test_fraction=0.3,
                      max_skip_fraction=0.5)
    sheet = tmp_path / "sheets" / "sheet.png"
    report = inspect_dataset(str(out), contact_sheet=str(sheet), num_samples=4, seed=1)

    assert report["format"] == fmt
    assert report["num_samples"] == len(CAPTIONS)
    assert {s: v["num_samples"] for s, v in report["splits"].items()} == {
        s: info.num_samples for s, info in manifest.splits.items()}
    assert report["num_skipped"] == 2
    assert report["skipped_reasons"] == {"empty file": 1, "not an image": 1}

    captions = list(CAPTIONS.values())
    stats = report["captions"]
    assert stats["measured"] == len(captions)
    assert stats["chars"]["min"] == min(map(len, captions))
    assert stats["chars"]["max"] == len(LONG_CAPTION)
    assert stats["words"] == {"min": 3, "max": len(LONG_CAPTION.split()),
                              "mean": round(sum(len(c.split()) for c in captions) / 10, 2)}

    with Image.open(sheet) as image:
        assert image.format == "PNG"
        assert image.size == contact_sheet_size(4) == (2 * THUMB + 3 * 8, image.size[1])
        image.load()
    assert report["contact_sheet"]["num_samples"] == 4

    text = format_report(report)
    assert f"samples   {len(CAPTIONS)}" in text
    assert "not an image" in text and str(sheet) in text


def test_inspect_is_seeded_and_caps_samples(source, tmp_path):
    out = tmp_path / "ds"
    ingest(str(source), str(out), max_skip_fraction=0.5)
    sheets = [tmp_path / f"{name}.png" for name in ("a", "b", "c")]
    for path in sheets[:2]:
        inspect_dataset(str(out), contact_sheet=str(path), num_samples=3, seed=7)
    assert sheets[0].read_bytes() == sheets[1].read_bytes()
    report = inspect_dataset(str(out), contact_sheet=str(sheets[2]), num_samples=100)
    assert report["contact_sheet"]["num_samples"] == len(CAPTIONS)
    assert inspect_dataset(str(out), contact_sheet=None)["contact_sheet"] is None


def test_long_captions_wrap_within_the_cell():
    font = ImageFont.load_default()
    lines = wrap_caption(LONG_CAPTION, font, THUMB)
    assert len(lines) == CAPTION_LINES
    assert all(font.getlength(line) <= THUMB for line in lines)
    assert lines[-1].endswith("...")
    assert wrap_caption("short", font, THUMB) == ["short"]
    assert all(font.getlength(line) <= THUMB for line in wrap_caption("x" * 200, font, THUMB))
