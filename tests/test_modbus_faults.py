"""Faults on the Modbus bridge: a misbehaving PLC in client mode, idle peers in server mode,
a task that dies under supervision, and the collapsing of repeated warnings."""
import logging
import select
import socket
import struct
import time

import pytest

from plc_bridge.bridge import Supervised
from plc_bridge.metrics import CollapsingLog
from plc_bridge.modbus import ModbusBridge
from tests.conftest import wait_for
from tests.raw_plc import RawPLC, reply_frame

INPUTS = ["level", "temp", "door"]
OUTPUTS = {"valve": 0.25}
MAP = [
    {"signal": "level", "table": "holding", "address": 0, "type": "float32"},   # FC3
    {"signal": "temp", "table": "input", "address": 0, "type": "float32"},      # FC4
    {"signal": "door", "table": "coil", "address": 3},                          # FC1
    {"signal": "valve", "table": "holding", "address": 10, "type": "float32"},
]
FLOAT_REGS = {0.75: (0x3F40, 0), 0.5: (0x3F00, 0), 0.25: (0x3E80, 0)}


def client_bridge(port, **extra):
    cfg = {"mode": "client", "host": "127.0.0.1", "port": port, "map": MAP, "poll_ms": 10,
           "request_timeout_ms": 300, "reconnect_min_ms": 10, "reconnect_max_ms": 40, **extra}
    return ModbusBridge.from_config(cfg, INPUTS, OUTPUTS)


def valve_on_plc(plc) -> tuple[int, int]:
    return plc.regs["holding"].get(10, 0), plc.regs["holding"].get(11, 0)


class Once:
    """A fault applied to the first request of function ``fc`` after ``arm()``."""

    def __init__(self, fc, make):
        self.fc, self.make, self.armed, self.fired = fc, make, False, 0

    def arm(self):
        self.armed = True

    def __call__(self, tid, unit, pdu, reply):
        if self.armed and pdu[0] == self.fc:
            self.armed = False
            self.fired += 1
            return self.make(tid, unit, pdu, reply)
        return ...


def short(tid, unit, pdu, reply):
    """One register (or one bit byte fewer) less than asked, byte count consistent."""
    fc = pdu[0]
    if fc in (1, 2):            # 1 bit asked: answer with no data byte at all
        return reply_frame(tid, unit, bytes((fc, 0)))
    data = reply[2:-2]
    return reply_frame(tid, unit, bytes((fc, len(data))) + data)


@pytest.mark.parametrize("fc", [1, 3, 4])
def test_short_read_response_is_counted_logged_once_and_writes_go_on(fc, caplog):
    fault = Once(fc, short)
    with RawPLC(fault) as plc, client_bridge(plc.port) as b:
        plc.regs["holding"].update({0: 0x3FC0, 1: 0})                         # level 1.5
        assert wait_for(lambda: b.snapshot().get("level", (None,))[0] == 1.5)
        b.publish({"valve": 0.75})
        assert wait_for(lambda: valve_on_plc(plc) == FLOAT_REGS[0.75])
        with caplog.at_level(logging.WARNING, logger="plc_bridge"):
            fault.arm()
            assert wait_for(lambda: fault.fired == 1)
            # After the short answer the poller goes on: the next decision reaches the PLC,
            # and so do the fail-safe values when the controller fails safe.
            b.publish({"valve": 0.5})
            assert wait_for(lambda: valve_on_plc(plc) == FLOAT_REGS[0.5])
            b.publish({"valve": 0.25})
            assert wait_for(lambda: valve_on_plc(plc) == FLOAT_REGS[0.25])
            polls = b.health()["io_us"]["n"]
            assert wait_for(lambda: b.health()["io_us"]["n"] > polls + 3)
        h = b.health()
        assert h["errors"]["plc_short_response"] == 1
        assert h["running"] and h["down"] == [] and h["connected"]
        lines = [r for r in caplog.records if "short response" in r.getMessage()]
        assert len(lines) == 1 and lines[0].levelno == logging.WARNING


def _long(tid, unit, pdu, reply):
    return reply_frame(tid, unit, bytes((pdu[0], reply[1] + 2)) + reply[2:] + b"\x00\x01")


def _bad_count(tid, unit, pdu, reply):
    return reply_frame(tid, unit, bytes((pdu[0], reply[1] + 2)) + reply[2:])


def _wrong_fc(tid, unit, pdu, reply):
    return reply_frame(tid, unit, bytes((4 if pdu[0] == 3 else 3,)) + reply[1:])


def _exception(tid, unit, pdu, reply):
    return reply_frame(tid, unit, bytes((pdu[0] | 0x80, 4)))


def _wrong_tid(tid, unit, pdu, reply):
    return reply_frame((tid + 7) & 0xFFFF, unit, reply)


def _garbage(tid, unit, pdu, reply):
    return b"\x13\x37\xde\xad\xbe\xef\x00\x09junkjunk"


def _closed_mid_frame(tid, unit, pdu, reply):
    return reply_frame(tid, unit, reply)[:5], "close"


def _closed(tid, unit, pdu, reply):
    return None


@pytest.mark.parametrize("make, kind", [
    (_long, "plc_long_response"), (_bad_count, "plc_bad_byte_count"), (_wrong_fc, "plc_wrong_function"),
    (_exception, "plc_device_failure"), (_wrong_tid, "plc_wrong_transaction"), (_garbage, "plc_bad_frame"),
    (_closed_mid_frame, "plc_disconnected"), (_closed, "plc_disconnected"),
])
def test_any_bad_answer_is_counted_and_the_poller_goes_on(make, kind):
    fault = Once(3, make)
    with RawPLC(fault) as plc, client_bridge(plc.port) as b:
        b.publish({"valve": 0.75})
        assert wait_for(lambda: valve_on_plc(plc) == FLOAT_REGS[0.75])
        fault.arm()
        assert wait_for(lambda: fault.fired == 1)
        b.publish({"valve": 0.5})
        assert wait_for(lambda: valve_on_plc(plc) == FLOAT_REGS[0.5])
        assert wait_for(lambda: b.health()["errors"].get(kind) == 1), b.health()["errors"]
        assert b.health()["running"] and "poller_failed" not in b.health()["errors"]


def test_a_task_that_dies_is_down_in_health_counted_and_restarted(caplog):
    with RawPLC() as plc:
        b = client_bridge(plc.port)
        b.RESTART_MIN_S = 0.3
        assert isinstance(b, Supervised) and b.down_tasks() == ()
        real = b._poll_connected
        crashes = [0]

        async def crashing(conn):
            if crashes[0] < 2:
                crashes[0] += 1
                raise RuntimeError("injected bug in the poller")
            await real(conn)

        b._poll_connected = crashing
        with caplog.at_level(logging.WARNING, logger="plc_bridge"), b:
            assert wait_for(lambda: "poller" in b.down_tasks())
            h = b.health()
            assert not h["running"] and h["down"] == ["poller"]
            assert wait_for(lambda: b.health()["errors"].get("poller_failed") == 2)
            b.publish({"valve": 0.75})
            assert wait_for(lambda: valve_on_plc(plc) == FLOAT_REGS[0.75])
            assert b.health()["running"] and b.down_tasks() == ()
        tracebacks = [r for r in caplog.records if r.exc_info and "task poller failed" in r.getMessage()]
        assert len(tracebacks) == 1                     # the second crash of the same kind: no traceback
        assert "injected bug in the poller" in caplog.text


SERVER_MAP = [
    {"signal": "level", "table": "holding", "address": 0, "type": "float32"},
    {"signal": "valve", "table": "holding", "address": 10, "type": "float32"},
]


def server_bridge(**extra):
    cfg = {"mode": "server", "host": "127.0.0.1", "port": 0, "map": SERVER_MAP, **extra}
    return ModbusBridge.from_config(cfg, ["level"], OUTPUTS)


def _round_trip(sock, tid, pdu):
    sock.sendall(struct.pack(">HHHB", tid, 0, len(pdu) + 1, 1) + pdu)
    head = b""
    while len(head) < 7:
        chunk = sock.recv(7 - len(head))
        assert chunk, "closed"
        head += chunk
    length = struct.unpack(">HHHB", head)[2]
    body = b""
    while len(body) < length - 1:
        body += sock.recv(length - 1 - len(body))
    return body


def test_idle_squatters_cannot_lock_the_plc_out():
    with server_bridge() as b:
        squatters = [socket.create_connection(("127.0.0.1", b.port), timeout=2) for _ in range(8)]
        try:
            assert wait_for(lambda: b.health()["clients"] == 8)
            with socket.create_connection(("127.0.0.1", b.port), timeout=2) as plc:   # served within 2 s
                reply = _round_trip(plc, 1, struct.pack(">BHHB", 16, 0, 2, 4) + struct.pack(">f", 1.5))
                assert reply == struct.pack(">BHH", 16, 0, 2)
                assert _round_trip(plc, 2, struct.pack(">BHH", 3, 10, 2)) == b"\x03\x04\x3e\x80\x00\x00"
            assert b.snapshot()["level"][0] == 1.5
            assert b.health()["bad"]["evicted"] == 1
            readable = select.select(squatters, [], [], 0.5)[0]
            assert readable == [squatters[0]] and squatters[0].recv(1) == b""    # the longest idle, closed
        finally:
            for s in squatters:
                s.close()


def test_idle_connections_are_closed_after_idle_timeout():
    with server_bridge(idle_timeout_s=0.3) as b:
        with socket.create_connection(("127.0.0.1", b.port), timeout=5) as idle:
            assert idle.recv(1) == b""                                           # closed by the bridge
            assert b.health()["bad"]["idle_timeout"] == 1
        with socket.create_connection(("127.0.0.1", b.port), timeout=5) as active:
            for i in range(8):                                                   # 0.8 s of requests
                assert _round_trip(active, i, struct.pack(">BHH", 3, 10, 2))[:2] == b"\x03\x04"
                time.sleep(0.1)
        assert b.health()["running"]


@pytest.mark.parametrize("value", [0, 0.05, 1e6, float("nan"), "10", True])
def test_idle_timeout_is_bounded(value):
    with pytest.raises(ValueError, match=r"modbus\.idle_timeout_s: .* in 0\.1\.\.86400"):
        server_bridge(idle_timeout_s=value)


def test_collapsing_log_counts_repeats_per_key(caplog):
    now = [100.0]
    say = CollapsingLog(logging.getLogger("plc_bridge.test"), window_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="plc_bridge.test"):
        assert say.warning("a", "bad frame from %s", "x")
        for _ in range(41):
            now[0] += 0.1
            assert not say.warning("a", "bad frame from %s", "x")
        assert say.warning("b", "another kind")                               # its own key
        now[0] += 10.0
        assert say.warning("a", "bad frame from %s", "y")
        now[0] += 10.0
        assert say.warning("a", "bad frame from %s", "z")                     # alone in its window
    assert [r.getMessage() for r in caplog.records] == [
        "bad frame from x", "another kind", "bad frame from y (x 42 in the last 10 s)", "bad frame from z"]


def test_a_flood_of_bad_traffic_writes_a_few_lines(caplog):
    """What an operator's log (INFO) shows of 2,000 undecodable requests, 100 broken headers,
    100 frames cut short and 100 refused peers: a handful of lines, the counters hold the rest."""
    with caplog.at_level(logging.INFO), server_bridge() as b:
        with socket.create_connection(("127.0.0.1", b.port), timeout=5) as s:
            for i in range(2000):
                assert _round_trip(s, i, bytes((0x41 + i % 50,)) + b"\x00\x01")[0] & 0x80
        for i in range(100):
            with socket.create_connection(("127.0.0.1", b.port), timeout=5) as s:
                s.sendall(b"\x00\x01\x00\x07\x00\x06\x01\x03\x00\x00\x00\x01")   # protocol id 7
                assert s.recv(16) == b""
            with socket.create_connection(("127.0.0.1", b.port), timeout=5) as s:
                s.sendall(b"\x00\x01\x00\x00\x00\x06\x01\x03")                     # cut short
        assert wait_for(lambda: b.health()["bad"].get("truncated") == 100)
    with caplog.at_level(logging.INFO), server_bridge(allow=["10.0.0.1"]) as b:
        for i in range(100):
            with socket.create_connection(("127.0.0.1", b.port), timeout=5) as s:
                assert s.recv(16) == b""
    bad = b.health()["bad"]
    assert bad["rejected_client"] == 100
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert len(lines) <= 6, lines
