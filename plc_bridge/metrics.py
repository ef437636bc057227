"""Counters, a latency ring and rate-limited logging shared by the bridges' I/O threads and
their ``health()``."""
from __future__ import annotations

import logging
import threading
import time
from array import array
from collections import Counter


class LatencyRing:
    """The last ``size`` durations in nanoseconds, in a preallocated ring.

    ``add`` is called from one I/O thread and does no allocation; ``percentiles`` copies and
    sorts on demand (health requests, not the hot path).
    """

    def __init__(self, size: int = 2048):
        self._buf = array("q", bytes(8 * size))
        self._size = size
        self._n = 0

    def add(self, ns: int) -> None:
        """Record one duration in nanoseconds."""
        self._buf[self._n % self._size] = ns
        self._n += 1

    def percentiles(self) -> dict:
        """``{"n", "p50", "p99", "max"}`` in microseconds over the samples held (None when empty)."""
        n = min(self._n, self._size)
        if n == 0:
            return {"n": 0, "p50": None, "p99": None, "max": None}
        data = sorted(self._buf[:n])
        return {
            "n": self._n,
            "p50": data[(n - 1) // 2] / 1e3,
            "p99": data[min(n - 1, (99 * n) // 100)] / 1e3,
            "max": data[-1] / 1e3,
        }


class Counters:
    """Thread-safe named counters (bad messages by reason, reconnects, ...)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c: Counter = Counter()

    def inc(self, name: str, n: int = 1) -> int:
        """Add ``n`` to counter ``name``; returns the new value."""
        with self._lock:
            self._c[name] += n
            return self._c[name]

    def get(self, name: str) -> int:
        """Current value of ``name`` (0 if never incremented)."""
        with self._lock:
            return self._c[name]

    def snapshot(self) -> dict[str, int]:
        """A copy of every counter."""
        with self._lock:
            return dict(self._c)


def worth_logging(count: int) -> bool:
    """True for the 1st, 2nd, 4th, 8th, ... occurrence: warnings about hostile traffic stay
    visible without letting a flood of it flood the log (the counters keep the exact count).
    :class:`CollapsingLog` is the time-based form, for warnings that may repeat all day."""
    return count & (count - 1) == 0


class CollapsingLog:
    """Repeated log lines collapsed per key: the first occurrence of a key is logged at once;
    further ones within ``window_s`` are only counted, and the first one after the window is
    logged with ``" (x N in the last 10 s)"`` appended, N counting every occurrence since the
    last line (itself included). So a flood of the same warning costs one line per key per
    window, and the operator still sees how many there were. Thread-safe; ``clock`` (seconds)
    may be injected for tests.

    ``log(level, key, msg, *args, exc_info=...)``; ``warning(key, msg, *args)`` and
    ``exception(key, msg, *args)`` (an error with the current traceback) are shorthands.
    """

    def __init__(self, logger: logging.Logger, window_s: float = 10.0, clock=time.monotonic):
        self.logger = logger
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[str, list] = {}      # key -> [start of the window, occurrences since the last line]

    def log(self, level: int, key: str, msg: str, *args, exc_info=None) -> bool:
        """Log ``msg % args`` now or count it under ``key``; returns whether a line was written."""
        now = self._clock()
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None and now - seen[0] < self.window_s:
                seen[1] += 1
                return False
            repeated = 0 if seen is None else seen[1] + 1
            self._seen[key] = [now, 0]
        if repeated > 1:
            msg = f"{msg} (x {repeated} in the last {self.window_s:g} s)"
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def warning(self, key: str, msg: str, *args) -> bool:
        """:meth:`log` at WARNING."""
        return self.log(logging.WARNING, key, msg, *args)

    def exception(self, key: str, msg: str, *args) -> bool:
        """:meth:`log` at ERROR with the exception being handled (its traceback)."""
        return self.log(logging.ERROR, key, msg, *args, exc_info=True)
