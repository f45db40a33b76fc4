"""Progress lines (count, rate, ETA) for long loops, through a logger.

Every function of this project that logs takes a ``logging.Logger`` (Dagster's ``context.log``
is one); none takes ``Any``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class Progress:
    """Logs ``label: done/total (pct), rate/s, ETA`` at most every ``every_s`` seconds."""

    def __init__(
        self,
        label: str,
        total: int | None,
        log: logging.Logger,
        every_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.total = total
        self.log = log
        self.every_s = every_s
        self.clock = clock
        self.count = 0
        self.started = clock()
        self._last = self.started

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more; log when ``every_s`` passed since the last line, or at the total."""
        self.count += n
        now = self.clock()
        reached = self.total is not None and self.count >= self.total
        if reached or now - self._last >= self.every_s:
            self._last = now
            self.log.info(self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max((self.clock() if now is None else now) - self.started, 1e-9)
        rate = self.count / elapsed
        if self.total:
            pct = 100.0 * self.count / self.total
            eta = (self.total - self.count) / rate if rate > 0 else float("inf")
            return (
                f"{self.label}: {self.count:,}/{self.total:,} ({pct:.0f}%), "
                f"{rate:,.0f}/s, ETA {eta:,.0f}s"
            )
        return f"{self.label}: {self.count:,}, {rate:,.0f}/s"

    def done(self) -> None:
        elapsed = self.clock() - self.started
        rate = self.count / elapsed if elapsed > 0 else 0.0
        self.log.info(f"{self.label}: done, {self.count:,} in {elapsed:,.1f}s ({rate:,.0f}/s)")
