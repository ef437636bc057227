"""Fuzz target ``zmq``: sensor frames and control commands over real sockets into a running
ZeroMQ bridge.

Each input goes through the bridge's real SUB or ROUTER socket. Properties: the I/O thread
never dies (``health()["running"]``); every sensor frame is counted, accepted (``frames``) or
refused by reason (``bad``); a refused frame changes nothing the controller would read (the
image of every stream is as before); every control request is answered and counted; no
command over this plain socket ever reaches the mode handler (behaviour-changing commands
need CURVE), so garbage never changes an output.
"""
from __future__ import annotations

import math
import time

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

from plc_bridge.zmq_bridge import SensorPublisher, ZmqBridge
from tests.fuzz.budget import budget, corpus, tried

INPUTS = ["level", "temperature", "auto"]
SENTINEL = "sentinel-0"
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=True),
                    st.text(max_size=8), st.binary(max_size=8))
VALUES = st.dictionaries(st.one_of(st.sampled_from(INPUTS), st.text(max_size=6)), SCALARS, max_size=6)
FIELDS = {"v": st.one_of(st.just(1), SCALARS), "stream": st.one_of(st.sampled_from(["main", "x"]), SCALARS),
          "seq": st.one_of(st.integers(0, 2**64 - 1), SCALARS), "t_ns": st.one_of(st.integers(0, 2**63 - 1), SCALARS),
          "values": st.one_of(VALUES, SCALARS)}
NEAR_VALID = st.fixed_dictionaries({}, optional=FIELDS).map(msgpack.packb)
ANY_MSGPACK = st.recursive(SCALARS, lambda c: st.one_of(st.lists(c, max_size=4),
                                                        st.dictionaries(st.text(max_size=6), c, max_size=4)),
                           max_leaves=12).map(lambda o: msgpack.packb(o, default=repr))
CONTROL = st.fixed_dictionaries({}, optional={
    "v": st.one_of(st.just(1), SCALARS), "cmd": st.one_of(st.sampled_from(["mode", "status", "stats", "health"]),
                                                          SCALARS),
    "stream": st.one_of(st.just("main"), SCALARS), "mode": st.one_of(st.sampled_from(["manual", "auto"]), SCALARS),
}).map(msgpack.packb)
PAYLOADS = st.one_of(NEAR_VALID, ANY_MSGPACK, st.binary(max_size=64))


class Harness:
    """A bridge with a sensor publisher and a raw DEALER control socket, and the checks."""

    def __init__(self):
        self.mode_calls = []
        self.bridge = ZmqBridge(sensors="tcp://127.0.0.1:*", control="tcp://127.0.0.1:*", inputs=INPUTS)
        self.bridge.set_mode_handler(lambda s, m: self.mode_calls.append((s, m)) or {})
        self.bridge.set_status_provider(lambda: {"ok": True})
        self.bridge.start()
        self.ctx = zmq.Context()
        self.pub = SensorPublisher(self.bridge.endpoints["sensors"], context=self.ctx)
        assert self.pub.wait_ready()
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.linger = 0
        self.dealer.connect(self.bridge.endpoints["control"])
        self.sentinel = 0

    def image(self) -> dict:
        return {s: self.bridge.snapshot(s) for s in self.bridge.input_streams()}

    def sensor(self, data: bytes) -> None:
        """Send ``data``, then a valid sentinel frame; once the sentinel is read back, the input
        was handled (one publisher's frames arrive in order)."""
        h0, before_image = self.bridge.health(), self.image()
        self.sentinel += 1
        self.pub.send_bytes(data)
        self.pub.send(SENTINEL, self.sentinel, {"level": float(self.sentinel)})
        end = time.monotonic() + 5
        while self.bridge.snapshot(SENTINEL).get("level", (None,))[0] != self.sentinel and time.monotonic() < end:
            time.sleep(0.0005)
        h = self.bridge.health()
        assert h["running"], "the I/O thread died"
        accepted = h["frames"] - h0["frames"] - 1
        refused = sum(h["bad"].values()) - sum(h0["bad"].values())
        assert accepted in (0, 1) and accepted + refused >= 1, "a frame was not counted"
        if not accepted:                                   # refused: nothing changed for the loop
            after = self.image()
            after.pop(SENTINEL), before_image.pop(SENTINEL, None)
            assert after == before_image
        assert self.mode_calls == []

    def control(self, data: bytes) -> None:
        requests = self.bridge.health()["requests"]
        self.dealer.send(data)
        assert self.dealer.poll(5000, zmq.POLLIN), "a control request got no reply"
        reply = msgpack.unpackb(self.dealer.recv(), raw=False, strict_map_key=False)
        assert isinstance(reply, dict) and reply.get("v") == 1 and isinstance(reply.get("ok"), bool)
        h = self.bridge.health()
        assert h["running"] and h["requests"] == requests + 1
        assert self.mode_calls == []                      # plain socket: never carried out

    def close(self) -> None:
        self.pub.close()
        self.dealer.close(0)
        self.ctx.term()
        self.bridge.stop()


@pytest.fixture(scope="module")
def harness():
    h = Harness()
    yield h
    h.close()


@budget()
@given(data=PAYLOADS)
def test_fuzz_zmq_sensor_frames(harness, data):
    with tried("zmq"):
        harness.sensor(data)


@budget()
@given(data=st.one_of(CONTROL, ANY_MSGPACK, st.binary(max_size=64)))
def test_fuzz_zmq_control_commands(harness, data):
    with tried("zmq"):
        harness.control(data)


def test_fuzz_zmq_valid_frames_land_in_the_image(harness):
    """The oracle is not vacuous: a valid frame is accepted and read back exactly."""
    harness.sensor(msgpack.packb({"v": 1, "stream": "main", "seq": 7, "t_ns": 1,
                                  "values": {"level": 0.25, "temperature": 40.0}}))
    snap = harness.bridge.snapshot("main")
    assert snap["level"][0] == 0.25 and snap["temperature"][0] == 40.0
    img = harness.bridge.read()
    row = dict(img.taken)["main"]
    assert img.values[row, 0] == 0.25 and not math.isnan(img.values[row, 1]) and np.isnan(img.values[row, 2])


@pytest.mark.parametrize("path", corpus("zmq"), ids=lambda p: p.name)
def test_fuzz_zmq_corpus(harness, path):
    data = path.read_bytes()
    harness.sensor(data)
    harness.control(data)
