"""Counters and a latency ring shared by the bridges' I/O threads and their ``health()``."""
from __future__ import annotations

import threading
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
    visible without letting a flood of it flood the log (the counters keep the exact count)."""
    return count & (count - 1) == 0
