"""Progress bars for the long data commands: counts and rate on a terminal, silent otherwise
(logs, CI and pipes get the commands' one-line summaries, not redrawn bars)."""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TextIO

from tqdm import tqdm


def progress_bar(desc: str, *, total: int | None = None, unit: str = "img",
                 stream: TextIO | None = None) -> tqdm:
    """A tqdm bar on `stream` (default stderr), disabled when that is not a terminal."""
    stream = stream or sys.stderr
    return tqdm(total=total, desc=desc, unit=unit, file=stream, disable=not stream.isatty(),
                dynamic_ncols=True, smoothing=0.1)


@contextlib.contextmanager
def polled_progress(desc: str, total: int | None, read_count: Callable[[], int], *,
                    every: float = 0.5, stream: TextIO | None = None) -> Iterator[tqdm]:
    """A bar fed by polling `read_count()` from a thread, for work that reports nothing while
    it runs (a Ray Data write); counts are taken relative to the first reading."""
    bar = progress_bar(desc, total=total, stream=stream)
    if bar.disable:  # no terminal: no thread, no polling
        yield bar
        return
    base, stop = read_count(), threading.Event()

    def advance() -> None:
        bar.update(max(0, read_count() - base - bar.n))

    def poll() -> None:
        while not stop.wait(every):
            advance()

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield bar
    finally:
        stop.set()
        thread.join()
        advance()
        bar.close()
