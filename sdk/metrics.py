"""Prometheus metrics and a health endpoint for a running controller (``[metrics]``).

Scraping never calls into a control cycle. A scrape, a ``/healthz`` request or the service
watchdog (``sdk.notify``) asks the controller's :class:`SnapshotExchange` for a snapshot; the
control loop takes it at its next cycle boundary, after that cycle's outputs went out (a
plain copy of counters and histogram bins, tens of microseconds), and the requesting thread
renders it. So the figures of one scrape all come from the same instant between two cycles,
and a loop that stops cycling stops answering: ``/healthz`` then says 503.

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
  (thread-safe, taken in the scraping thread);
- ``r1edge_up``: 1 while the loop answers.

``/healthz``: 200 while the loop runs, answers within ``max(0.25 s, 5 periods)`` and every
stream active in the last cycle had fresh inputs (none stale or missing), with at least one
stream active; 503 otherwise. The body is JSON with the reasons.
"""
from __future__ import annotations

import json
import logging
import socket
import socketserver
import threading
import time
from typing import Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from runtime.safety import INVALID_NAMES, REASON_NAMES, STATUS_NAMES

logger = logging.getLogger(__name__)

#: Export every 10th bin edge of the controller's 40-a-decade histograms: 4 buckets a decade.
_BIN_STRIDE = 10
_LO_S, _HI_S = 1e-6, 10.0
_PHASES = {"total": "latency", "read": "read", "infer": "infer", "write": "write", "record": "record"}
_FRESHNESS = (INVALID_NAMES.index("stale"), INVALID_NAMES.index("missing"))


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


class _Collector:
    """Renders one snapshot (and the bridges' health) as Prometheus metric families."""

    def __init__(self, server: "MetricsServer"):
        self._server = server

    def collect(self):
        server = self._server
        ctrl = server.ctrl
        snap, state = server.snapshot()
        yield GaugeMetricFamily("r1edge_up", "1 while the control loop runs and answers",
                                value=float(state == "running"))
        if snap is None:
            return
        c = snap["counters"]
        yield CounterMetricFamily("r1edge_cycles", "Control cycles run", value=c["cycles"])
        yield CounterMetricFamily("r1edge_deadline_misses", "Cycles whose outputs were ready after the deadline",
                                  value=c["deadline_misses"])
        yield CounterMetricFamily("r1edge_skipped_ticks", "Loop ticks skipped because a cycle overran",
                                  value=snap["skipped_ticks"])
        for key, name, doc in (("failsafe_by_reason", "r1edge_failsafe_cycles",
                                "Cycles in which a stream got its fail-safe outputs, by reason"),
                               ("held_by_reason", "r1edge_held_cycles",
                                "Cycles in which a stream held its last outputs, by reason")):
            fam = CounterMetricFamily(name, doc, labels=["reason"])
            for reason, n in snap[key].items():
                fam.add_metric([reason], n)
            yield fam
        fam = CounterMetricFamily("r1edge_invalid_inputs", "Invalid input values, by signal and reason",
                                  labels=["signal", "reason"])
        for signal, row in zip(ctrl.input_names, snap["invalid_by_signal"]):
            for k in range(1, len(INVALID_NAMES)):
                fam.add_metric([signal, INVALID_NAMES[k]], row[k])
        yield fam
        fam = HistogramMetricFamily("r1edge_cycle_latency_seconds",
                                    "Cycle latency by phase: total = tick to outputs ready", labels=["phase"])
        for phase, key in _PHASES.items():
            counts, count, total_us = snap["hist"][key]
            fam.add_metric([phase], _buckets(ctrl.hist[key], counts, count), total_us / 1e6)
        yield fam
        fam = GaugeMetricFamily("r1edge_output", "Each stream's outputs in the last cycle", labels=["stream", "name"])
        status = GaugeMetricFamily("r1edge_stream_status", "1 for each stream's status in the last cycle",
                                   labels=["stream", "status"])
        for stream, s in snap["streams"].items():
            for name, value in zip(ctrl.output_names, s["outputs"]):
                fam.add_metric([stream, name], value)
            for name in STATUS_NAMES:
                status.add_metric([stream, name], float(s["status"] == name))
        yield fam
        yield status
        yield GaugeMetricFamily("r1edge_heartbeat", "The output heartbeat counter (mod 65536)", value=snap["heartbeat"])
        yield from _bridge_families(ctrl.bridges)


def _buckets(hist, counts: list[int], count: int) -> list[tuple[str, float]]:
    """Cumulative counts at every ``_BIN_STRIDE``-th bin edge between 1 us and 10 s."""
    edges = hist._edges                                   # microseconds; the bins' upper edges
    out, acc, i = [], 0, 0
    for i, n in enumerate(counts):
        acc += n
        edge_s = edges[i] / 1e6
        if (i + 1) % _BIN_STRIDE == 0 and _LO_S * 0.999 <= edge_s <= _HI_S * 1.001:
            out.append((floatToGoString(edge_s), acc))
    out.append(("+Inf", count))
    return out


def _bridge_families(bridges) -> list:
    bad = CounterMetricFamily("r1edge_bridge_bad_messages", "Traffic a bridge refused, by reason",
                              labels=["bridge", "reason"])
    errors = CounterMetricFamily("r1edge_bridge_errors", "A bridge's own I/O trouble, by reason",
                                 labels=["bridge", "reason"])
    io = CounterMetricFamily("r1edge_bridge_io", "A bridge's I/O operations as it counts them", labels=["bridge"])
    connected = GaugeMetricFamily("r1edge_bridge_connected", "1 while a bridge has a peer", labels=["bridge"])
    hb = GaugeMetricFamily("r1edge_bridge_heartbeat_ok", "1 while a bridge's PLC heartbeat moves (1 without one)",
                           labels=["bridge"])
    for bridge in bridges:
        try:
            health = bridge.health()
        except Exception as exc:                          # a broken bridge must not break the scrape
            logger.warning("metrics: %s.health() raised: %s", bridge.name, exc)
            continue
        for reason, n in sorted(health.get("bad", {}).items()):
            bad.add_metric([bridge.name, reason], n)
        for reason, n in sorted(health.get("errors", {}).items()):
            errors.add_metric([bridge.name, reason], n)
        io.add_metric([bridge.name], health.get("io_us", {}).get("n", 0))
        connected.add_metric([bridge.name], float(bool(health.get("connected"))))
        hb.add_metric([bridge.name], float(bool(health.get("heartbeat_ok", True))))
    return [bad, errors, io, connected, hb]


_STATES = {"starting": "the control loop has not started cycling yet",
           "stalled": "the control loop did not answer (stalled)",
           "stopped": "the control loop is not running"}


def health(snap: dict | None, state: str) -> tuple[bool, dict]:
    """``(healthy, body)`` for ``/healthz`` from :meth:`MetricsServer.snapshot`'s answer."""
    if state != "running":
        return False, {"status": "unhealthy", "problems": [_STATES[state]]}
    problems = []
    active = {name: s for name, s in snap["streams"].items() if s["active"]}
    if not active:
        problems.append("no stream has inputs")
    streams = {}
    for name, s in active.items():
        stale = [k for k, code in enumerate(s["codes"]) if code in _FRESHNESS]
        streams[name] = {"status": s["status"], "reason": s["reason"] or None}
        if stale:
            problems.append(f"stream {name!r}: {len(stale)} input(s) stale or missing")
    body = {"status": "ok" if not problems else "unhealthy", "cycles": snap["counters"]["cycles"],
            "heartbeat": snap["heartbeat"], "streams": streams}
    if problems:
        body["problems"] = problems
    return not problems, body


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):                 # noqa: A002 (the base class's name)
        logger.debug("metrics: " + format, *args)


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class MetricsServer:
    """Serves ``/metrics`` and ``/healthz`` for ``ctrl`` on ``host:port`` in a background
    thread (``port = 0`` takes a free port; see :attr:`port` after ``start()``)."""

    def __init__(self, ctrl, host: str = "127.0.0.1", port: int = 9108):
        self.ctrl = ctrl
        self.host, self.port = host, port
        self.timeout_s = max(0.25, 5 * ctrl.period_s)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        self._metrics_app = make_wsgi_app(self.registry)
        self._httpd = None
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
        """Bind and serve in a daemon thread; raises ``OSError`` if the address is taken."""
        server_class = _ThreadingServer
        if ":" in self.host:
            server_class = type("_ThreadingServer6", (_ThreadingServer,), {"address_family": socket.AF_INET6})
        self._httpd = make_server(self.host, self.port, self._app, server_class=server_class,
                                  handler_class=_QuietHandler)
        self.port = self._httpd.server_port
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="r1edge-metrics", daemon=True)
        self._thread.start()
        logger.info("metrics on http://%s:%d/metrics and /healthz", self.host, self.port)
        return self

    def stop(self) -> None:
        """Stop serving and close the socket. Idempotent."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5.0)
        self._httpd = None

    def _app(self, environ, start_response):
        if environ.get("PATH_INFO") == "/healthz":
            ok, body = health(*self.snapshot())
            data = json.dumps(body).encode()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
            return [data]
        return self._metrics_app(environ, start_response)
