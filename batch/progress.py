"""Progress on stderr: a bar redrawn in place on a terminal, plain throttled lines otherwise."""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


class Progress:
    def __init__(self, total: int, stream: TextIO | None = None, *, interval: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, width: int = 24):
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval  # seconds between plain lines (a log file wants few)
        self.clock = clock
        self.width = width
        self.started = clock()
        self.done = self.failed = 0
        self._last_line = None

    def update(self, ok: bool) -> None:
        self.done += ok
        self.failed += not ok
        now = self.clock()
        finished = self.done + self.failed >= self.total
        if self.tty:
            self.stream.write("\r" + self.line(now) + ("\n" if finished else ""))
        elif finished or self._last_line is None or now - self._last_line >= self.interval:
            self.stream.write("batch: " + self.line(now) + "\n")
            self._last_line = now
        self.stream.flush()

    def line(self, now: float) -> str:
        finished = self.done + self.failed
        elapsed = max(now - self.started, 1e-9)
        rate = finished / elapsed
        eta = (self.total - finished) / rate if rate else float("inf")
        text = f"{finished}/{self.total} images, {rate:.2f} images/s, ETA {_clock(eta)}"
        if self.failed:
            text += f", {self.failed} failed"
        if self.tty:
            filled = round(self.width * finished / max(self.total, 1))
            text = f"[{'#' * filled}{'.' * (self.width - filled)}] " + text
        return text


def _clock(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
