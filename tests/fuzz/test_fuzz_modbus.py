"""Fuzz targets for the Modbus bridge.

- ``modbus_server``: byte streams of well-formed and malformed MBAP frames sent over a real
  socket to a server-mode bridge. Every complete well-formed frame before the first bad header
  is answered in order (its transaction id and unit echoed, the function or its exception),
  and the connection is closed at a bad header or at the end of the stream; no task dies.
- ``modbus_client``: random answers from a fake PLC (well-framed random PDUs, mutations of
  the right answer, random bytes) to a client-mode bridge's polls and writes. The poller never
  dies and, once the PLC answers right again, decisions reach it.

Kept inputs: ``corpus/modbus_server/*.bin`` (a byte stream), ``corpus/modbus_client/*.json``
(a list of hex answers).
"""
from __future__ import annotations

import json
import socket
import struct

from hypothesis import given, strategies as st

from plc_bridge.modbus import ModbusBridge
from tests.conftest import wait_for
from tests.fuzz.budget import budget, corpus, tried
from tests.raw_plc import RawPLC, reply_frame

SERVER_MAP = [
    {"signal": "level", "table": "holding", "address": 0, "type": "float32"},
    {"signal": "door", "table": "coil", "address": 0},
    {"signal": "valve", "table": "holding", "address": 10, "type": "float32"},
    {"signal": "alarm", "table": "discrete", "address": 3},
    {"signal": "ir", "table": "input", "address": 0, "type": "uint16"},
]
SERVER_OUTPUTS = {"valve": 0.25, "alarm": 0.0, "ir": 0.0}
SERVED = [1, 2, 3, 4, 5, 6, 15, 16, 22, 23]


def expected_answers(stream: bytes) -> tuple[list[tuple[int, int, int]], bool]:
    """``([(tid, unit, fc) of each frame the server must answer], stops_at_bad_header)``."""
    frames, at = [], 0
    while len(stream) - at >= 7:
        tid, pid, length, unit = struct.unpack_from(">HHHB", stream, at)
        if pid != 0 or not 2 <= length <= 254:
            return frames, True
        if at + 6 + length > len(stream):
            break
        frames.append((tid, unit, stream[at + 7]))
        at += 6 + length
    return frames, False


def check_server(port: int, stream: bytes) -> None:
    answers, _ = expected_answers(stream)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(stream)
        s.shutdown(socket.SHUT_WR)                  # the end of the stream: the server must close
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    at = 0
    for tid, unit, fc in answers:
        assert len(data) - at >= 9, f"no answer to transaction {tid}"
        rtid, pid, length, runit = struct.unpack_from(">HHHB", data, at)
        pdu = data[at + 7:at + 6 + length]
        assert (rtid, pid, runit) == (tid, 0, unit) and len(pdu) == length - 1
        if pdu[0] & 0x80:
            assert pdu[0] == (fc | 0x80) and len(pdu) == 2 and pdu[1] in (1, 2, 3, 0x0B), pdu
        else:
            assert pdu[0] == fc and fc in SERVED, pdu
        at += 6 + length
    assert at == len(data), "answers to frames that were never completed"


frame_st = st.one_of(
    # well-formed: a served function with a plausible body, or anything at all
    st.builds(lambda tid, unit, fc, body: struct.pack(">HHHB", tid, 0, len(body) + 2, unit) + bytes((fc,)) + body,
              st.integers(0, 65535), st.sampled_from([1, 0, 255, 7]), st.sampled_from(SERVED + [0, 8, 43, 0x81, 255]),
              st.binary(max_size=40)),
    st.builds(lambda tid, fc, a, n: struct.pack(">HHHBBHH", tid, 0, 6, 1, fc, a, n),
              st.integers(0, 65535), st.sampled_from([1, 2, 3, 4]), st.sampled_from([0, 1, 3, 10, 11, 65535]),
              st.integers(0, 2001)),
    st.builds(lambda tid, a, vals: struct.pack(">HHHBBHHB", tid, 0, 7 + 2 * len(vals), 1, 16, a, len(vals),
                                               2 * len(vals)) + struct.pack(f">{len(vals)}H", *vals),
              st.integers(0, 65535), st.sampled_from([0, 1, 2, 10]), st.lists(st.integers(0, 65535), min_size=1, max_size=3)),
    # malformed header, or plain junk
    st.builds(lambda tid, pid, length, rest: struct.pack(">HHH", tid, pid, length) + rest,
              st.integers(0, 65535), st.integers(0, 3), st.sampled_from([0, 1, 255, 256, 65535]), st.binary(max_size=20)),
    st.binary(min_size=1, max_size=30),
)


def test_fuzz_modbus_server():
    cfg = {"mode": "server", "host": "127.0.0.1", "port": 0, "map": SERVER_MAP, "max_request_rate": 1e6}
    with ModbusBridge.from_config(cfg, ["level", "door"], SERVER_OUTPUTS) as b:
        for path in corpus("modbus_server"):
            check_server(b.port, path.read_bytes())

        @budget()
        @given(st.lists(frame_st, min_size=1, max_size=5))
        def one(frames):
            with tried("modbus_server"):
                check_server(b.port, b"".join(frames))

        one()
        h = b.health()
        assert h["running"] and h["down"] == [] and "handler_error" not in h["bad"], h


answer_st = st.one_of(
    st.builds(lambda fc, body: ("pdu", bytes((fc,)) + body), st.sampled_from([1, 2, 3, 4, 15, 16, 0x83, 0x90, 0]),
              st.binary(max_size=12)),
    st.builds(lambda cut, extra: ("mutate", cut, extra), st.integers(-4, 4), st.binary(max_size=4)),
    st.builds(lambda junk: ("raw", junk), st.binary(max_size=24)),
    st.just(("tid",)), st.just(("close",)), st.just(("ok",)),
)


class Script:
    """The fake PLC's answers: the next scripted one per request, then right answers."""

    def __init__(self):
        self.queue: list = []

    def __call__(self, tid, unit, pdu, reply):
        if not self.queue:
            return ...
        kind, *args = self.queue.pop(0)
        if kind == "pdu":
            return reply_frame(tid, unit, args[0])
        if kind == "mutate":
            cut, extra = args
            body = reply[:len(reply) + cut] if cut < 0 else reply + extra[:cut]
            return reply_frame(tid, unit, body or b"\x00")
        if kind == "raw":
            return args[0]
        if kind == "tid":
            return reply_frame(tid ^ 0x5555, unit, reply)
        if kind == "close":
            return None
        return ...


CLIENT_MAP = [
    {"signal": "level", "table": "holding", "address": 0, "type": "float32"},
    {"signal": "temp", "table": "input", "address": 0, "type": "float32"},
    {"signal": "door", "table": "coil", "address": 3},
    {"signal": "valve", "table": "holding", "address": 10, "type": "float32"},
]


def as_answers(items) -> list:
    return [tuple(bytes.fromhex(x) if isinstance(x, str) and i else x for i, x in enumerate(item)) for item in items]


def test_fuzz_modbus_client():
    script = Script()
    with RawPLC(script) as plc:
        cfg = {"mode": "client", "host": "127.0.0.1", "port": plc.port, "map": CLIENT_MAP, "poll_ms": 1,
               "request_timeout_ms": 30, "reconnect_min_ms": 1, "reconnect_max_ms": 5}
        with ModbusBridge.from_config(cfg, ["level", "temp", "door"], {"valve": 0.25}) as b:
            value = [0.0]

            def run(answers) -> None:
                script.queue[:] = list(answers)
                value[0] += 1.0
                b.publish({"valve": value[0]})
                assert wait_for(lambda: not script.queue, timeout=30), "the poller stopped asking"
                want = struct.unpack(">HH", struct.pack(">f", value[0]))
                assert wait_for(lambda: (plc.regs["holding"].get(10), plc.regs["holding"].get(11)) == want,
                                timeout=30), "decisions no longer reach the PLC"
                assert b.health()["down"] == [] and "poller_failed" not in b.health()["errors"]

            for path in corpus("modbus_client"):
                run(as_answers(json.loads(path.read_text())))

            @budget()
            @given(st.lists(answer_st, min_size=1, max_size=6))
            def one(answers):
                with tried("modbus_client"):
                    run(answers)

            one()
            assert b.health()["running"]
