"""Progress of a long step as a log line every few seconds (done of total, rate, time left), so that a console
shows how far ingest, feature extraction or a sweep has come without a line per Ray report."""

from __future__ import annotations

import logging
import time


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """``update(n)`` as work is done; a line at most every ``every_s`` seconds, and one at ``close()``."""

    def __init__(self, log: logging.Logger, what: str, total: int | None, unit: str, every_s: float = 10.0) -> None:
        self.log, self.what, self.total, self.unit, self.every_s = log, what, total, unit, every_s
        self.done = 0
        self.started = self._last = time.monotonic()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        if not self.total:
            return f"{self.what}: {self.done} {self.unit} ({rate:.1f}/s)"
        left = f", {_duration((self.total - self.done) / rate)} left" if 0 < self.done < self.total else ""
        return f"{self.what}: {self.done}/{self.total} {self.unit} ({rate:.1f}/s{left})"

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self.log.info(self.line())

    def close(self) -> None:
        self.log.info("%s in %s", self.line(), _duration(time.monotonic() - self.started))


__all__ = ["Progress"]
