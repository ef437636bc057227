"""The Prometheus exporter process behind ``[metrics]``: serves ``/metrics`` and ``/healthz``.

``sdk.service.metrics.MetricsServer`` starts this file as its own process (``python -I``; it imports
only the standard library, msgpack and prometheus_client, never torch or the rest of ``sdk``),
so that HTTP parsing and rendering, milliseconds of Python per scrape, never hold the control
process's interpreter lock. Per request it asks the controller over an inherited Unix socket
for a snapshot (one length-prefixed msgpack map: the state of the loop, the snapshot the loop
took between two cycles, the bridges' health) and renders that.

Protocol on the socket: the controller first sends the static part (signal names, reason and
status names, histogram bin edges, the address to bind); the exporter answers ``{"port": N}``
once it listens, or ``{"error": "..."}``; then each request is one byte (``m`` for /metrics,
``h`` for /healthz) answered by one message. The exporter exits with the controller process.
"""
from __future__ import annotations

import json
import os
import socket
import socketserver
import struct
import sys
import threading
import time
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import msgpack
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

_LEN = struct.Struct("<I")
#: Export every 10th bin edge of the controller's 40-a-decade histograms: 4 buckets a decade.
_BIN_STRIDE = 10
_LO_S, _HI_S = 1e-6, 10.0
_PHASES = {"total": "latency", "read": "read", "infer": "infer", "write": "write", "record": "record"}
_STATES = {"starting": "the control loop has not started cycling yet",
           "stalled": "the control loop did not answer (stalled)",
           "stopped": "the control loop is not running",
           "error": "taking a snapshot failed (see the controller's log)"}


def send(sock: socket.socket, obj) -> None:
    """One length-prefixed msgpack message."""
    data = msgpack.packb(obj)
    sock.sendall(_LEN.pack(len(data)) + data)


def recv(sock: socket.socket):
    """One message from :func:`send` (None at end of stream)."""
    head = _recv_exact(sock, _LEN.size)
    if head is None:
        return None
    body = _recv_exact(sock, _LEN.unpack(head)[0])
    return None if body is None else msgpack.unpackb(body)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


class Exporter:
    """Renders the controller's answers; one request to the controller at a time."""

    def __init__(self, sock: socket.socket, static: dict):
        self.sock = sock
        self.static = static
        self.lock = threading.Lock()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self.metrics_app = make_wsgi_app(self.registry)

    def ask(self, what: bytes) -> dict:
        with self.lock:
            self.sock.sendall(what)
            answer = recv(self.sock)
        if answer is None:
            raise ConnectionError("the controller closed the exporter's socket")
        return answer

    def app(self, environ, start_response):
        if environ.get("PATH_INFO") == "/healthz":
            ok, body = health(self.static, self.ask(b"h"))
            data = json.dumps(body).encode()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
            return [data]
        return self.metrics_app(environ, start_response)

    def collect(self):
        answer = self.ask(b"m")
        st = self.static
        snap = answer["snapshot"]
        yield GaugeMetricFamily("r1edge_up", "1 while the control loop runs and answers",
                                value=float(answer["state"] == "running"))
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
        invalid = st["invalid_names"]
        for signal, row in zip(st["inputs"], snap["invalid_by_signal"]):
            for k in range(1, len(invalid)):
                fam.add_metric([signal, invalid[k]], row[k])
        yield fam
        fam = HistogramMetricFamily("r1edge_cycle_latency_seconds",
                                    "Cycle latency by phase: total = tick to outputs ready", labels=["phase"])
        for phase, key in _PHASES.items():
            counts, count, total_us = snap["hist"][key]
            fam.add_metric([phase], _buckets(st["edges_us"], counts, count), total_us / 1e6)
        yield fam
        fam = GaugeMetricFamily("r1edge_output", "Each stream's outputs in the last cycle", labels=["stream", "name"])
        status = GaugeMetricFamily("r1edge_stream_status", "1 for each stream's status in the last cycle",
                                   labels=["stream", "status"])
        for stream, s in snap["streams"].items():
            for name, value in zip(st["outputs"], s["outputs"]):
                fam.add_metric([stream, name], value)
            for name in st["status_names"]:
                status.add_metric([stream, name], float(s["status"] == name))
        yield fam
        yield status
        yield GaugeMetricFamily("r1edge_heartbeat", "The output heartbeat counter (mod 65536)", value=snap["heartbeat"])
        yield from _bridge_families(answer["bridges"])


def _buckets(edges_us: list[float], counts: list[int], count: int) -> list[tuple[str, float]]:
    """Cumulative counts at every ``_BIN_STRIDE``-th bin edge between 1 us and 10 s."""
    out, acc = [], 0
    for i, n in enumerate(counts):
        acc += n
        edge_s = edges_us[i] / 1e6
        if (i + 1) % _BIN_STRIDE == 0 and _LO_S * 0.999 <= edge_s <= _HI_S * 1.001:
            out.append((floatToGoString(edge_s), acc))
    out.append(("+Inf", count))
    return out


def _bridge_families(bridges: dict) -> list:
    bad = CounterMetricFamily("r1edge_bridge_bad_messages", "Traffic a bridge refused, by reason",
                              labels=["bridge", "reason"])
    errors = CounterMetricFamily("r1edge_bridge_errors", "A bridge's own I/O trouble (a dead task included), by kind",
                                 labels=["bridge", "kind"])
    io = CounterMetricFamily("r1edge_bridge_io", "A bridge's I/O operations as it counts them", labels=["bridge"])
    connected = GaugeMetricFamily("r1edge_bridge_connected", "1 while a bridge has a peer", labels=["bridge"])
    hb = GaugeMetricFamily("r1edge_bridge_heartbeat_ok", "1 while a bridge's PLC heartbeat moves (1 without one)",
                           labels=["bridge"])
    for name, h in bridges.items():
        for reason, n in sorted(h["bad"].items()):
            bad.add_metric([name, reason], n)
        for kind, n in sorted(h["errors"].items()):
            errors.add_metric([name, kind], n)
        io.add_metric([name], h["io"])
        connected.add_metric([name], float(h["connected"]))
        hb.add_metric([name], float(h["heartbeat_ok"]))
    return [bad, errors, io, connected, hb]


def health(static: dict, answer: dict) -> tuple[bool, dict]:
    """``(healthy, body)`` of ``/healthz``: the loop runs and answered, at least one stream was
    active in the last cycle, and none of the active streams had a stale or missing input."""
    if answer["state"] != "running":
        return False, {"status": "unhealthy", "problems": [_STATES[answer["state"]]]}
    snap = answer["snapshot"]
    freshness = {static["invalid_names"].index("stale"), static["invalid_names"].index("missing")}
    problems, streams = [], {}
    for name, s in snap["streams"].items():
        if not s["active"]:
            continue
        streams[name] = {"status": s["status"], "reason": s["reason"] or None}
        stale = sum(code in freshness for code in s["codes"])
        if stale:
            problems.append(f"stream {name!r}: {stale} input(s) stale or missing")
    if not streams:
        problems.insert(0, "no stream has inputs")
    body = {"status": "ok" if not problems else "unhealthy", "cycles": snap["counters"]["cycles"],
            "heartbeat": snap["heartbeat"], "streams": streams}
    if problems:
        body["problems"] = problems
    return not problems, body


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):                 # noqa: A002 (the base class's name)
        pass


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


def main(fd: int) -> None:
    """Serve until the controller closes the socket ``fd``."""
    sock = socket.socket(fileno=fd)
    static = recv(sock)
    if static is None:
        return
    exporter = Exporter(sock, static)
    try:
        httpd = make_server(static["host"], static["port"], exporter.app,
                            server_class=_Server6 if ":" in static["host"] else _Server, handler_class=_QuietHandler)
    except OSError as exc:
        send(sock, {"error": f"{static['host']}:{static['port']}: {exc}"})
        return
    send(sock, {"port": httpd.server_port})
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    parent = os.getppid()
    while os.getppid() == parent:                         # ends with the controller, even a killed one
        time.sleep(1.0)


if __name__ == "__main__":
    main(int(sys.argv[1]))
