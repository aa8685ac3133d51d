"""Progress bars of the data commands: counts and rate on a terminal, nothing in logs or pipes."""

from __future__ import annotations

import io
import re
import sys
import time

from PIL import Image
from webdataset_fixtures import write_img2dataset

from data_pipelines.progress import polled_progress, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def final_line(text: str) -> str:
    """What a terminal shows last of a redrawn bar (tqdm redraws with carriage returns)."""
    return text.replace("\r", "\n").strip().splitlines()[-1]


def test_bar_draws_counts_and_rate_only_on_a_terminal():
    pipe, terminal = io.StringIO(), Terminal()
    for stream in (pipe, terminal):
        with progress_bar("ingest", total=3, stream=stream) as bar:
            bar.update(3)
    assert pipe.getvalue() == ""
    assert re.fullmatch(r"ingest: 100%\|\S+\| 3/3 \[00:00<00:00, +[\d.]+img/s\]",
                        final_line(terminal.getvalue())), terminal.getvalue()


def test_polled_bar_counts_from_its_first_reading():
    seen, terminal = [10], Terminal()
    with polled_progress("embed train", 5, lambda: seen[0], every=0.01, stream=terminal) as bar:
        seen[0] = 12
        deadline = time.monotonic() + 10
        while bar.n != 2 and time.monotonic() < deadline:  # the poller picks it up
            time.sleep(0.01)
        assert bar.n == 2
        seen[0] = 15
    assert re.fullmatch(r"embed train: 100%\|\S+\| 5/5 \[00:00<00:00, +[\d.]+img/s\]",
                        final_line(terminal.getvalue())), terminal.getvalue()
    calls = []
    with polled_progress("embed test", 5, lambda: calls.append(1) or 0, stream=io.StringIO()):
        pass
    assert calls == []  # no terminal: not even a first reading


def test_ingest_and_index_bars_on_a_terminal_and_quiet_otherwise(run_cli, tmp_path, monkeypatch):
    src = tmp_path / "src" / "a red square"
    src.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (4, 4), (255, 0, 0)).save(src / f"{i}.png")
    (src / "broken.png").write_bytes(b"not a png")
    args = ("data", "ingest", str(tmp_path / "src"), "--max-skip-fraction", "0.5")
    out = tmp_path / "out"
    assert run_cli(*args, "--out", str(out)) == (
        0, "", f"wrote 3 samples, skipped 1, to {out}\n  skipped a red square/broken.png: "
               "not an image\n")  # captured stderr is no terminal: no bar
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert run_cli(*args, "--out", str(tmp_path / "out2"))[0] == 0
    bar = terminal.getvalue().replace("\r", "\n")
    assert re.search(r"ingest: 4img \[[\d:]+, +[\d.]+img/s, kept=3, skipped=1\]", bar), bar
    write_img2dataset(str(tmp_path / "shards"), [2, 2])
    assert run_cli("data", "index", str(tmp_path / "shards"), "--out", str(tmp_path / "idx"),
                   "--test-shards", "1")[0] == 0
    bar = terminal.getvalue().replace("\r", "\n")
    assert re.search(r"index: 100%\|\S+\| 2/2 \[[\d:<]+, +[\d.]+shard/s, samples=4\]", bar), bar
