"""A line per tenth of a long stage: the passes print it on the driver, training on its first worker
(Ray Data's progress bars are off in tests and logs, and Ray Train has none)."""

from __future__ import annotations

import math
import time


def duration(seconds: float) -> str:
    """'42 s', '3 min 05 s', '1 h 02 min'."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """Counts `total` units of `stage` from `start` (a resumed stage goes on from where it was) and
    prints, at each tenth and at the end: done/total, the rate since this process started counting,
    an optional note (a loss), and the time left at that rate."""

    def __init__(self, stage: str, total: int, unit: str = "images", start: int = 0):
        self.stage, self.total, self.unit = stage, total, unit
        self.start = self.done = start
        self.every = max(1, math.ceil(total / 10))
        self.started = time.perf_counter()

    def advance(self, n: int, note: str = "") -> None:
        before, self.done = self.done, self.done + n
        if self.done // self.every > before // self.every or self.done == self.total:
            rate = (self.done - self.start) / max(time.perf_counter() - self.started, 1e-9)
            left = f", {duration((self.total - self.done) / rate)} left" if self.done < self.total and rate > 0 else ""
            note = f", {note}" if note else ""
            print(f"{self.stage}: {self.done}/{self.total} {self.unit} ({rate:.1f} {self.unit}/s{note}){left}",
                  flush=True)
