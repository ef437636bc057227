"""The systemd notify protocol, spoken by ``r1edge run`` when ``NOTIFY_SOCKET`` is set.

A service unit with ``Type=notify`` (example in ``examples/ops/r1edge.service``) learns from
these datagrams, each a few ``KEY=value`` lines sent to the Unix datagram socket named by
``NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract socket):

- ``READY=1`` once a cycle gave a stream the model's outputs (status ok): the controller is
  up, its inputs arrive and the model answers. Until then systemd keeps the unit
  "activating", so ``TimeoutStartSec`` must cover the engine's first compilation and the
  wait for the first valid inputs;
- ``WATCHDOG=1`` every half ``WATCHDOG_USEC`` while the loop is healthy: it answered a
  snapshot request (``sdk.service.metrics.SnapshotExchange``) within that half period, so it is
  still cycling, and not every cycle since the last ping that needed the model found the
  inference thread timed out or still busy (a hung model). When either fails the pings stop
  and systemd restarts the service after ``WatchdogSec``. Fail-safe outputs because the PLC
  went away do not stop the pings: a restart would not bring the PLC back;
- ``STATUS=`` one line (cycles, streams and their status, fail-safe cycles, deadline misses)
  about once a second;
- ``STOPPING=1`` when shutdown begins (SIGTERM, SIGINT or the end of ``--duration``).
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Mapping

logger = logging.getLogger(__name__)


class Notifier:
    """Sends notify messages to one socket address (a path, or ``@name`` for an abstract one).

    Sending never blocks and never raises: a full or vanished socket is logged (once) and
    counted in ``errors``.
    """

    def __init__(self, address: str):
        if not address or not (address.startswith("/") or address.startswith("@")):
            raise ValueError(f"NOTIFY_SOCKET {address!r} is neither an absolute path nor an @abstract name")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.errors = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "Notifier | None":
        """A notifier for ``NOTIFY_SOCKET``, or None when it is not set."""
        address = environ.get("NOTIFY_SOCKET")
        return cls(address) if address else None

    def send(self, *fields: str) -> bool:
        """Send one datagram of ``KEY=value`` lines; whether it went out."""
        try:
            self._sock.sendto("\n".join(fields).encode(), self.address)
            return True
        except OSError as exc:
            self.errors += 1
            if self.errors == 1:
                logger.warning("systemd notify to %r failed: %s", self.address, exc)
            return False

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()


def watchdog_interval(environ: Mapping[str, str] = os.environ) -> float | None:
    """The watchdog period in seconds from ``WATCHDOG_USEC``, or None when there is none or
    ``WATCHDOG_PID`` names another process (as ``sd_watchdog_enabled`` decides)."""
    usec = environ.get("WATCHDOG_USEC")
    pid = environ.get("WATCHDOG_PID")
    if not usec:
        return None
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        logger.warning("WATCHDOG_USEC=%r is not an integer; no watchdog pings", usec)
        return None
    return value / 1e6 if value > 0 else None


class ServiceMonitor:
    """Speaks the notify protocol for a running controller from its own thread (see the module
    docstring). ``start()`` before ``Controller.run``, ``stopping()`` when shutdown begins
    (safe in a signal handler), ``close()`` after ``run`` returns."""

    def __init__(self, ctrl, notifier: Notifier, watchdog_s: float | None = None, status_s: float = 1.0):
        self.ctrl = ctrl
        self.notifier = notifier
        self.watchdog_s = watchdog_s
        self.status_s = status_s
        self.ready = False
        self.pings = 0
        self._stopping = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: dict | None = None

    @classmethod
    def from_env(cls, ctrl, environ: Mapping[str, str] = os.environ) -> "ServiceMonitor | None":
        """A monitor when ``NOTIFY_SOCKET`` is set (watchdog pings when ``WATCHDOG_USEC`` is), else None."""
        notifier = Notifier.from_env(environ)
        return None if notifier is None else cls(ctrl, notifier, watchdog_interval(environ))

    def start(self) -> "ServiceMonitor":
        """Start the monitor thread."""
        self._thread = threading.Thread(target=self._main, name="r1edge-notify", daemon=True)
        self._thread.start()
        return self

    def stopping(self) -> None:
        """Send ``STOPPING=1`` (once) and stop pinging the watchdog."""
        if not self._stopping:
            self._stopping = True
            self.notifier.send("STOPPING=1", "STATUS=stopping")

    def close(self) -> None:
        """Send ``STOPPING=1`` if not yet sent, stop the thread and close the socket."""
        self.stopping()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self.notifier.close()

    def _main(self) -> None:
        period = self.watchdog_s / 2 if self.watchdog_s else self.status_s
        next_status = 0.0
        while not self._stop.is_set() and not self._stopping:
            t0 = time.monotonic()
            wait = 0.05 if not self.ready else period      # poll quickly until READY
            snap = self.ctrl.snapshots.request(wait if self.ready else max(wait, 1.0))
            if self._stopping:
                break
            healthy = snap is not None and self._inference_alive(snap)
            if not self.ready and snap is not None and any(
                    s["active"] and s["status"] == "ok" for s in snap["streams"].values()):
                self.ready = True
                self.notifier.send("READY=1", "STATUS=" + _status_line(snap))
                next_status = t0 + self.status_s
            elif self.ready and healthy and self.watchdog_s:
                self.notifier.send("WATCHDOG=1")
                self.pings += 1
            if self.ready and time.monotonic() >= next_status:
                line = _status_line(snap) if snap is not None else "control loop not answering"
                if not healthy and snap is not None:
                    line = "inference not answering; " + line
                self.notifier.send("STATUS=" + line)
                next_status = time.monotonic() + self.status_s
            self._stop.wait(max(0.0, wait - (time.monotonic() - t0)))

    def _inference_alive(self, snap: dict) -> bool:
        """False when every cycle since the previous snapshot that needed the model found the
        inference thread over its budget or still busy."""
        last, self._last = self._last, snap
        if last is None:
            return True
        cycles = snap["counters"]["cycles"] - last["counters"]["cycles"]
        stuck = sum(snap["watchdog"][k] - last["watchdog"][k] for k in ("timeouts", "busy_cycles"))
        return not (cycles > 0 and stuck >= cycles)


def _status_line(snap: dict) -> str:
    c = snap["counters"]
    streams = ", ".join(f"{name} {s['status']}" for name, s in snap["streams"].items() if s["active"]) or "none"
    return (f"cycles {c['cycles']}; streams: {streams}; fail-safe cycles {c['failsafe_cycles']}; "
            f"deadline misses {c['deadline_misses']}")
