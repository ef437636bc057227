"""Prometheus metrics and a health endpoint for a running controller (``[metrics]``).

Scraping never calls into a control cycle, and its costly part runs in another process. A
scrape or a ``/healthz`` request reaches the exporter process (``sdk/service/metrics_exporter.py``:
HTTP, rendering with prometheus_client), which asks this process for a snapshot over a Unix
socket. A relay thread here asks the controller's :class:`SnapshotExchange`; the control loop
takes the snapshot at its next cycle boundary, after that cycle's outputs went out (a plain
copy of counters and histogram bins, about 10 us), and the relay sends it back with the
bridges' health. So the figures of one scrape all come from the same instant between two
cycles, and a loop that stops cycling stops answering: ``/healthz`` then says 503. The
service watchdog (``sdk.service.notify``) uses the same exchange.

``/metrics`` (Prometheus text format; times in seconds):

- ``r1edge_cycles_total``, ``r1edge_deadline_misses_total``, ``r1edge_skipped_ticks_total``;
- ``r1edge_failsafe_cycles_total{reason}`` and ``r1edge_held_cycles_total{reason}``: cycles in
  which at least one stream failed safe (held) for that reason (``invalid_input``,
  ``timeout``, ``error``, ``busy``, ``bad_output``); a cycle with two reasons counts under
  both;
- ``r1edge_invalid_inputs_total{signal,reason}``: invalid input values (``nan``, ``inf``,
  ``range``, ``stale``, ``missing``);
- ``r1edge_cycle_latency_seconds{phase}``: histograms of ``total`` (tick to outputs ready),
  ``read``, ``infer``, ``write`` and ``record``; buckets 1 us to 10 s, four a decade, exact
  bin edges of the controller's own histograms;
- ``r1edge_output{stream,name}``, ``r1edge_stream_status{stream,status}`` (1 for the
  stream's status in the last cycle), ``r1edge_heartbeat``;
- ``r1edge_bridge_bad_messages_total{bridge,reason}``, ``r1edge_bridge_errors_total{bridge,reason}``,
  ``r1edge_bridge_io_total{bridge}`` (the bridge's own I/O count: Modbus requests served or
  poll rounds, ZeroMQ sensor frames, OPC UA input writes), ``r1edge_bridge_connected{bridge}``,
  ``r1edge_bridge_heartbeat_ok{bridge}``; bridge figures come from each bridge's ``health()``
  (thread-safe, called by the relay thread);
- ``r1edge_up``: 1 while the loop answers.

``/healthz``: 200 while the loop runs, answers within ``max(0.25 s, 5 periods)`` and every
stream active in the last cycle had fresh inputs (none stale or missing), with at least one
stream active; 503 otherwise. The body is JSON with the reasons.
"""
from __future__ import annotations

import logging
import socket
import subprocess
import sys
import threading
import time
from typing import Callable

from runtime.control.safety import INVALID_NAMES, REASON_NAMES, STATUS_NAMES

logger = logging.getLogger(__name__)


class SnapshotExchange:
    """Hands a snapshot taken in the control loop's thread to any other thread.

    ``request(timeout_s)`` (any thread) asks for one and waits; ``serve()`` (the loop, once
    per cycle, after the outputs went out) costs one attribute test unless somebody asked,
    then takes one snapshot for every waiting requester. ``request`` returns None when the
    loop did not serve within the timeout.
    """

    def __init__(self, take: Callable[[], dict]):
        self._take = take
        self._cond = threading.Condition()
        self._wanted = False
        self._generation = 0
        self._snapshot: dict | None = None

    def request(self, timeout_s: float) -> dict | None:
        """A snapshot taken by the loop after this call, or None after ``timeout_s``."""
        with self._cond:
            generation = self._generation
            self._wanted = True
            if not self._cond.wait_for(lambda: self._generation != generation, timeout_s):
                return None
            return self._snapshot

    def take_now(self) -> dict:
        """A snapshot taken in the calling thread (when no loop is running)."""
        return self._take()

    def serve(self) -> None:
        """Called by the loop at each cycle boundary."""
        if not self._wanted:
            return
        snapshot = self._take()
        with self._cond:
            self._snapshot = snapshot
            self._generation += 1
            self._wanted = False
            self._cond.notify_all()


def take_snapshot(ctrl) -> dict:
    """Copy what the metrics and the health checks need from a controller (``sdk.Controller``),
    in the loop's thread between two cycles: plain copies, no percentiles, no bridge calls."""
    cycle = ctrl.cycle
    streams = {}
    for name, slot in ctrl.slots.items():
        streams[name] = {"active": bool(cycle.active[slot]), "status": STATUS_NAMES[int(cycle.status[slot])],
                         "reason": REASON_NAMES[int(cycle.reason[slot])], "outputs": cycle.out[slot].tolist(),
                         "codes": cycle.guard.codes[slot].tolist()}
    return {
        "t_ns": time.monotonic_ns(),
        "counters": dict(ctrl.counters),
        "skipped_ticks": ctrl.loop.skipped_ticks,
        "watchdog": dict(cycle.counters),
        "failsafe_by_reason": dict(ctrl.failsafe_by_reason),
        "held_by_reason": dict(ctrl.held_by_reason),
        "invalid_by_signal": ctrl.invalid_by_signal.tolist(),
        "hist": {k: (list(h.counts), h.count, h.total_us) for k, h in ctrl.hist.items()},
        "heartbeat": cycle.heartbeat,
        "streams": streams,
    }


class MetricsServer:
    """Serves ``/metrics`` and ``/healthz`` for ``ctrl`` on ``host:port`` (``port = 0`` takes a
    free port; see :attr:`port` after ``start()``).

    HTTP and rendering run in the exporter process (``sdk/service/metrics_exporter.py``); here one
    relay thread answers its requests with a snapshot from the loop and the bridges' health.
    """

    def __init__(self, ctrl, host: str = "127.0.0.1", port: int = 9108):
        self.ctrl = ctrl
        self.host, self.port = host, port
        self.timeout_s = max(0.25, 5 * ctrl.period_s)
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def snapshot(self) -> tuple[dict | None, str]:
        """``(snapshot, state)``: taken by the loop while it runs (state ``"running"``); None
        when the running loop did not answer within :attr:`timeout_s` (``"starting"`` before
        its first cycle, ``"stalled"`` after); taken in this thread when no loop runs
        (``"stopped"``)."""
        ctrl = self.ctrl
        if ctrl.running:
            snap = ctrl.snapshots.request(self.timeout_s)
            if snap is not None:
                return snap, "running"
            if ctrl.running:
                return None, "starting" if ctrl.counters["cycles"] == 0 else "stalled"
        return ctrl.snapshots.take_now(), "stopped"

    def start(self) -> "MetricsServer":
        """Start the exporter process and wait until it listens; raises ``OSError`` if it
        cannot bind, ``RuntimeError`` if it does not come up."""
        from sdk.service import metrics_exporter as exporter

        ours, theirs = socket.socketpair()
        self._sock = ours
        self._proc = subprocess.Popen([sys.executable, "-I", exporter.__file__, str(theirs.fileno())],
                                      pass_fds=(theirs.fileno(),))
        theirs.close()
        try:
            ctrl = self.ctrl
            exporter.send(ours, {"host": self.host, "port": self.port, "inputs": ctrl.input_names,
                                 "outputs": ctrl.output_names, "invalid_names": list(INVALID_NAMES),
                                 "status_names": list(STATUS_NAMES), "edges_us": list(ctrl.hist["latency"]._edges)})
            ours.settimeout(60.0)
            hello = exporter.recv(ours)
            ours.settimeout(None)
        except OSError as exc:
            self.stop()
            raise RuntimeError(f"metrics exporter did not start: {exc}") from exc
        if hello is None or "error" in hello:
            self.stop()
            if hello is None:
                raise RuntimeError("metrics exporter exited at start")
            raise OSError(f"[metrics] listen: {hello['error']}")
        self.port = hello["port"]
        self._thread = threading.Thread(target=self._relay, name="r1edge-metrics", daemon=True)
        self._thread.start()
        logger.info("metrics on http://%s:%d/metrics and /healthz", self.host, self.port)
        return self

    def stop(self) -> None:
        """Stop the exporter process. Idempotent."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def _relay(self) -> None:
        from sdk.service.metrics_exporter import send

        sock = self._sock
        try:
            while True:
                what = sock.recv(1)
                if not what:
                    return
                try:
                    snap, state = self.snapshot()
                except Exception as exc:                  # e.g. a stream added by step() meanwhile
                    logger.warning("metrics: taking a snapshot failed: %s", exc)
                    snap, state = None, "error"
                send(sock, {"state": state, "snapshot": snap,
                            "bridges": _bridge_health(self.ctrl.bridges) if what == b"m" else None})
        except OSError as exc:                            # stop() closed the socket, or the exporter died
            if self._sock is not None:
                logger.error("metrics: the exporter connection failed: %s", exc)


def _bridge_health(bridges) -> dict:
    """What the exporter shows of each bridge's ``health()``."""
    out = {}
    for bridge in bridges:
        try:
            h = bridge.health()
        except Exception as exc:                          # a broken bridge must not break the scrape
            logger.warning("metrics: %s.health() raised: %s", bridge.name, exc)
            continue
        out[bridge.name] = {"bad": h.get("bad", {}), "errors": h.get("errors", {}),
                            "io": h.get("io_us", {}).get("n", 0), "connected": bool(h.get("connected")),
                            "heartbeat_ok": bool(h.get("heartbeat_ok", True))}
    return out
