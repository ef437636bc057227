"""ZeroMQ bridge against plain pyzmq peers: sensor frames, decisions, control, fuzzing, CURVE."""
import math
import random
import time
from collections import Counter
from pathlib import Path

import msgpack
import pytest
import zmq

from plc_bridge import messages
from plc_bridge.bridge import Bridge, Reporter
from plc_bridge.messages import MessageError, decode_sensor
from plc_bridge.zmq_bridge import (ControlClient, DecisionSubscriber, SensorPublisher, ZmqBridge,
                                   load_client_curve, make_keys)
from sdk.cli import main as cli_main
from tests.conftest import wait_for

ANY = "tcp://127.0.0.1:*"


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def make_bridge(**kw):
    cfg = {"sensors": ANY, "decisions": ANY, "control": ANY, **kw.pop("cfg", {})}
    return ZmqBridge.from_config(cfg, Path("."), **kw).start()


def frame(stream, seq, values, t_ns=1):
    return msgpack.packb({"v": 1, "stream": stream, "seq": seq, "t_ns": t_ns, "values": values})


def test_sensor_frames_latest_per_stream_without_slow_joiner_loss():
    seen = []
    b = make_bridge(inputs=["level", "temp"], on_input=lambda stream, f: seen.append((stream, f["seq"])))
    try:
        with SensorPublisher(b.endpoints["sensors"]) as pub:
            assert pub.wait_ready(5)
            for i in range(400):                       # sent at once, right after the subscription
                stream = "a" if i % 2 == 0 else "b"
                pub.send(stream, i // 2, {"level": float(i), "temp": -1.0 * i} if i < 398 else {"level": float(i)})
            pub.send("a", 200, {"level": 1.0, "bogus": 2.0})
            assert wait_for(lambda: len(seen) == 401)
        assert seen[:4] == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]       # nothing lost at the start
        frames = b.latest_frames()
        assert set(frames) == {"a", "b"}
        assert frames["a"]["seq"] == 200 and frames["a"]["values"] == {"level": 1.0}
        assert frames["b"]["seq"] == 199 and frames["b"]["values"] == {"level": 399.0}
        assert frames["b"]["rx_ns"] <= time.monotonic_ns()
        # Per signal, the newest value of the stream even when the last frame lacked it.
        snap = b.snapshot("b")
        assert snap["level"][0] == 399.0 and snap["temp"][0] == -397.0
        assert b.snapshot("nope") == {}
        # As a Bridge: inputs of every stream that sent a frame, decisions of any stream.
        assert isinstance(b, Bridge) and isinstance(b, Reporter) and b.name == "zmq"
        assert sorted(b.input_streams()) == ["a", "b"] and b.serves("a") and b.serves("nope")
        h = b.health()
        assert h["frames"] == 401 and h["bad"] == {"unknown_signal": 1} and h["errors"].get("seq_gaps", 0) == 0
    finally:
        b.stop()
        b.stop()


def test_publish_from_on_input_goes_out_directly(ctx):
    holder = {}

    def on_input(stream, f):
        holder["b"].publish({"valve": f["values"]["level"] * 2}, "ok", f["seq"], 5.0, stream=stream)

    b = holder["b"] = make_bridge(on_input=on_input)
    try:
        sub = DecisionSubscriber(b.endpoints["decisions"], context=ctx)
        with SensorPublisher(b.endpoints["sensors"], context=ctx) as pub:
            assert pub.wait_ready(5)
            got = None
            for seq in range(500):                       # until the subscriber has joined
                pub.send("main", seq, {"level": 1.5})
                got = sub.recv(timeout_ms=10)
                if got is not None:
                    break
            assert got is not None and got["outputs"] == {"valve": 3.0} and got["latency_us"] == 5.0
            pub.send("main", 1000, {"level": 2.0})
            while got["seq"] != 1000:
                got = sub.recv(timeout_ms=2000)
            assert got["outputs"] == {"valve": 4.0}
        sub.close()
        assert "callback_error" not in b.health()["errors"]
    finally:
        b.stop()


def test_stream_limit():
    b = make_bridge(cfg={"max_streams": 2})
    try:
        with SensorPublisher(b.endpoints["sensors"]) as pub:
            assert pub.wait_ready(5)
            for s in ("s1", "s2", "s3", "s1"):
                pub.send(s, 0, {"x": 1.0})
            assert wait_for(lambda: b.health()["frames"] == 3)
        assert set(b.latest_frames()) == {"s1", "s2"} and b.health()["bad"] == {"too_many_streams": 1}
    finally:
        b.stop()


def test_decisions_schema_and_late_joiner_gets_current_decisions(ctx):
    b = make_bridge()
    try:
        before = time.time_ns()
        b.publish({"valve": 0.5}, "ok", 7, 120.5, stream="line1")     # stamped with Unix time when published
        after = time.time_ns()
        b.publish({"valve": 0.1, "pump": 1.0}, "failsafe", 3, 80.0, stream="line2", t_ns=123)
        sub = ctx.socket(zmq.SUB)                        # a plain pyzmq subscriber, joining late
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(b.endpoints["decisions"])
        got = {}
        while len(got) < 2 and sub.poll(5000):
            m = msgpack.unpackb(sub.recv(), raw=False)
            got[m["stream"]] = m
        assert got["line2"] == {"v": 1, "stream": "line2", "seq": 3, "t_ns": 123, "outputs": {"valve": 0.1, "pump": 1.0},
                                "status": "failsafe", "latency_us": 80.0}
        assert set(got["line1"]) == {"v", "stream", "seq", "t_ns", "outputs", "status", "latency_us"}
        assert got["line1"]["seq"] == 7 and before <= got["line1"]["t_ns"] <= after
        assert got["line1"]["outputs"] == {"valve": 0.5} and got["line1"]["status"] == "ok"
        b.publish({"valve": 0.6}, "ok", 8, 100.0, stream="line1")
        # A subscriber may see a decision twice around its join (catch-up re-send); it skips
        # a seq it already has.
        while True:
            assert sub.poll(5000)
            m = msgpack.unpackb(sub.recv(), raw=False)
            if m["seq"] <= got[m["stream"]]["seq"]:
                assert m == got[m["stream"]]
                continue
            assert (m["stream"], m["seq"], m["outputs"]) == ("line1", 8, {"valve": 0.6})
            break
        with pytest.raises(ValueError, match="status"):
            b.publish({"valve": 0.6}, "bogus", 9, 1.0)
        with pytest.raises(ValueError, match="not a number"):
            b.publish({"valve": "x"}, "ok", 9, 1.0)
        # (the subscriber may see the message before the I/O thread has counted it)
        assert wait_for(lambda: b.health()["published"] == 3 and b.health()["publish_us"]["n"] == 3)
    finally:
        b.stop()


def test_control_endpoint_req_and_dealer(ctx):
    b = make_bridge()
    try:
        b.set_status_provider(lambda: {"state": "running", "cycles": 42})
        req = ctx.socket(zmq.REQ)                        # plain REQ client
        req.connect(b.endpoints["control"])
        req.send(msgpack.packb({"v": 1, "cmd": "status"}))
        assert req.poll(5000)
        assert msgpack.unpackb(req.recv(), raw=False) == {"v": 1, "ok": True, "cmd": "status",
                                                          "result": {"state": "running", "cycles": 42}}
        req.send(b"\xc1garbage")
        assert req.poll(5000)
        reply = msgpack.unpackb(req.recv(), raw=False)
        assert reply["ok"] is False and "malformed" in reply["error"]
        with ControlClient(b.endpoints["control"]) as cc:
            h = cc.request("health")
            assert h["ok"] and h["result"]["running"] and h["result"]["requests"] == 3
            # connection events come from libzmq's monitor, asynchronously
            assert wait_for(lambda: b.health()["peers"]["control"] >= 1)
            assert cc.request("stats") == {"v": 1, "ok": False, "cmd": "stats", "error": "no stats provider registered"}
            b.set_stats_provider(lambda: 1 / 0)
            r = cc.request("stats")
            assert r["ok"] is False and "ZeroDivisionError" in r["error"]
            b.set_stats_provider(lambda: {"latency_us": {"p50": 1.5, "p99": float("inf")}, "obj": object()})
            r = cc.request("stats")
            assert r["ok"] and r["result"]["latency_us"]["p99"] == math.inf and isinstance(r["result"]["obj"], str)
        h = b.health()
        assert h["bad"] == {"control_malformed": 1} and h["errors"] == {"provider_error": 1}
    finally:
        b.stop()


# ----------------------------------------------------------------------------- fuzzing

def accepts(data: bytes) -> dict | None:
    """Reference acceptance rule, written from the schema independently of the decoder."""
    if len(data) > messages.MAX_MESSAGE_BYTES:
        return None
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:
        return None
    if type(obj) is not dict or set(obj) != {"v", "stream", "seq", "t_ns", "values"}:
        return None
    if type(obj["v"]) is not int or obj["v"] != 1:
        return None
    if type(obj["stream"]) is not str or not 1 <= len(obj["stream"]) <= 64:
        return None
    for k in ("seq", "t_ns"):
        if type(obj[k]) is not int or not 0 <= obj[k] < 2 ** 64:
            return None
    vals = obj["values"]
    if type(vals) is not dict or not 1 <= len(vals) <= 256:
        return None
    for name, x in vals.items():
        if type(name) is not str or not 1 <= len(name) <= 64 or type(x) not in (int, float):
            return None
    return obj


def _valid(rng):
    n = rng.randint(1, 12)
    values = {}
    for i in range(n):
        r = rng.random()
        values[f"s{i}_{rng.randrange(1000)}"] = (
            rng.uniform(-1e6, 1e6) if r < 0.6 else rng.randrange(-2 ** 63, 2 ** 64) if r < 0.8
            else rng.choice([math.nan, math.inf, -math.inf, 0.0, -0.0, 5e-324]))
    return {"v": 1, "stream": rng.choice(["main", "line-2", "x" * 64, "é流"]),
            "seq": rng.randrange(2 ** 64), "t_ns": rng.randrange(2 ** 64), "values": values}


BAD_FIELDS = ["str", True, None, [1.0], {"a": 1.0}, b"bytes", -1, 1.5, msgpack.ExtType(5, b"x"),
              {"nested": {"deep": 1}}, "", "y" * 65]


def generate(n, seed=12345):
    """n messages: valid frames, mutated frames, wrong types, random bytes, oversize, limits."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.25:
            out.append(msgpack.packb(_valid(rng)))
        elif r < 0.45:
            data = bytearray(msgpack.packb(_valid(rng)))
            kind = rng.random()
            if kind < 0.4:
                for _ in range(rng.randint(1, 3)):
                    data[rng.randrange(len(data))] = rng.randrange(256)
            elif kind < 0.8:
                del data[rng.randrange(len(data)):]
            else:
                data += rng.randbytes(rng.randint(1, 8))
            out.append(bytes(data))
        elif r < 0.70:
            msg = _valid(rng)
            field = rng.choice(["v", "stream", "seq", "t_ns", "values", "value", "drop", "extra"])
            if field == "value":
                msg["values"][next(iter(msg["values"]))] = rng.choice(BAD_FIELDS)
            elif field == "drop":
                del msg[rng.choice(list(msg))]
            elif field == "extra":
                msg["extra"] = 1
            elif field == "v":
                msg["v"] = rng.choice([0, 2, True, 1.0, "1", None])
            else:
                msg[field] = rng.choice(BAD_FIELDS)
            out.append(msgpack.packb(msg))
        elif r < 0.85:
            out.append(rng.randbytes(rng.randrange(0, 200)))
        elif r < 0.90:
            out.append(msgpack.packb(rng.choice([[1, 2], 3, "frame", None, 1.5, {1: 2}, {b"v": 1}])))
        elif r < 0.93:
            depth = rng.randint(100, 5000)
            out.append(b"\x91" * depth + b"\x01")
        elif r < 0.96:
            msg = _valid(rng)
            msg["values"] = {f"n{i}": 1.0 for i in range(rng.randint(257, 400))}
            out.append(msgpack.packb(msg))
        elif r < 0.998:
            msg = _valid(rng)
            msg["values"] = {"z" * rng.randint(65, 100): 1.0}
            out.append(msgpack.packb(msg))
        else:
            msg = _valid(rng)
            msg["stream"] = "s" * rng.randint(messages.MAX_MESSAGE_BYTES, messages.MAX_MESSAGE_BYTES + 2000)
            out.append(msgpack.packb(msg))
    return out


def test_decoder_fuzz_100k_matches_reference_and_counts_every_rejection():
    corpus = generate(100_000)
    reasons = Counter()
    accepted = 0
    for data in corpus:
        expected = accepts(data)
        try:
            got = decode_sensor(data)
        except MessageError as exc:
            assert expected is None, (data[:80], exc)
            reasons[exc.reason] += 1
            continue
        assert expected is not None, data[:80]
        accepted += 1
        assert got["stream"] == expected["stream"] and got["seq"] == expected["seq"]
        for name, x in expected["values"].items():
            assert (math.isnan(x) and math.isnan(got["values"][name])) or got["values"][name] == float(x)
    assert accepted + sum(reasons.values()) == len(corpus)
    assert accepted > 25_000
    # every kind of rejection occurred
    assert set(reasons) == {"oversize", "malformed", "schema", "version", "type", "limits"}


def test_bad_traffic_on_the_socket_is_counted_and_good_frames_flow(ctx):
    b = make_bridge(cfg={"hwm": 100_000})
    try:
        pub = ctx.socket(zmq.PUB)                        # a plain pyzmq publisher
        pub.sndhwm = 100_000
        pub.connect(b.endpoints["sensors"])
        probe = 0
        while b.health()["frames"] == 0:                 # get past the slow-joiner window
            pub.send(frame("probe", probe, {"x": 1.0}))
            probe += 1
            time.sleep(0.01)
        base = b.health()["frames"]
        corpus = generate(3000, seed=777)
        good = 0
        for i, data in enumerate(corpus):
            pub.send(data)
            good += accepts(data) is not None
            if i % 100 == 0:
                pub.send(frame("main", i, {"level": float(i)}))
                good += 1
        pub.send_multipart([frame("main", 1, {"x": 1.0}), b"second part"])
        bad = len(corpus) + 1 - (good - len(range(0, 3000, 100)))
        assert wait_for(lambda: sum(b.health()["bad"].values()) == bad and b.health()["frames"] - base == good,
                        timeout=20)
        assert b.health()["bad"]["multipart"] == 1 and b.health()["bad"]["oversize"] >= 1
        assert b.snapshot("main")["level"][0] == 2900.0
        # Bigger than libzmq's own limit (16 x max message size): the peer is dropped, the
        # bridge carries on and the publisher's next connection works.
        pub.send(b"\x00" * (17 * messages.MAX_MESSAGE_BYTES))
        frames_before = b.health()["frames"]
        deadline = time.monotonic() + 10
        while b.health()["frames"] == frames_before and time.monotonic() < deadline:
            pub.send(frame("main", 9999, {"level": -1.0}))
            time.sleep(0.01)
        assert b.snapshot("main")["level"][0] == -1.0 and b.health()["running"]
        pub.close(linger=0)
    finally:
        b.stop()


# ----------------------------------------------------------------------------- CURVE

@pytest.fixture
def keys(tmp_path):
    assert cli_main(["keys", str(tmp_path / "keys")]) == 0                       # server pair
    assert cli_main(["keys", str(tmp_path / "keys" / "clients"), "--name", "hmi"]) == 0
    assert cli_main(["keys", str(tmp_path / "keys"), "--name", "server"]) == 2   # never overwrites
    make_keys(tmp_path / "elsewhere", "stranger")
    return tmp_path


def test_curve_allowed_client_only(keys, ctx):
    cfg = {"sensors": ANY, "decisions": ANY, "control": ANY,
           "curve": {"secret_key": "keys/server.key_secret", "allowed": "keys/clients"}}
    b = ZmqBridge.from_config(cfg, keys).start()
    try:
        server_key = keys / "keys" / "server.key"
        allowed = load_client_curve(server_key, keys / "keys" / "clients" / "hmi.key_secret")
        stranger = load_client_curve(server_key, keys / "elsewhere" / "stranger.key_secret")
        good = DecisionSubscriber(b.endpoints["decisions"], curve=allowed, context=ctx)
        bad = DecisionSubscriber(b.endpoints["decisions"], curve=stranger, context=ctx)
        plain = ctx.socket(zmq.SUB)
        plain.setsockopt(zmq.SUBSCRIBE, b"")
        plain.connect(b.endpoints["decisions"])
        got = None
        for seq in range(200):
            b.publish({"valve": 0.5}, "ok", seq, 1.0)
            got = good.recv(timeout_ms=20)
            if got is not None:
                break
        assert got is not None and got["outputs"] == {"valve": 0.5}
        for seq in range(200, 210):
            b.publish({"valve": 0.5}, "ok", seq, 1.0)
        assert good.recv(timeout_ms=1000)["seq"] >= 200
        assert bad.recv(timeout_ms=300) is None
        assert not plain.poll(300)
        # Sensors and control are protected the same way.
        with SensorPublisher(b.endpoints["sensors"], curve=allowed, context=ctx) as pub:
            assert pub.wait_ready(5)
            pub.send("main", 1, {"level": 2.0})
            assert wait_for(lambda: b.snapshot().get("level", (None,))[0] == 2.0)
        with SensorPublisher(b.endpoints["sensors"], curve=stranger, context=ctx) as pub:
            assert not pub.wait_ready(0.3)
        with ControlClient(b.endpoints["control"], curve=allowed, context=ctx) as cc:
            assert cc.request("health")["result"]["curve"] is True
        def refused():  # handshake failures arrive through libzmq's monitor, asynchronously
            bad_counts = b.health()["bad"]
            denied = bad_counts.get("auth_denied", 0)
            return denied >= 1 and sum(bad_counts.values()) - denied >= 1     # stranger; plain-text peer
        assert wait_for(refused)
        good.close()
        bad.close()
        plain.close(linger=0)
    finally:
        b.stop()


@pytest.mark.parametrize("cfg, error, message", [
    ({"sensors": ANY, "sensor": ANY}, ValueError, r"zmq: unknown key\(s\) sensor"),
    ({"sensors": "127.0.0.1:5556"}, ValueError, r"zmq\.sensors: '127\.0\.0\.1:5556' is not a ZeroMQ endpoint"),
    ({}, ValueError, r"none of sensors, decisions, control"),
    ({"sensors": ANY, "max_values": 0}, ValueError, r"zmq\.max_values"),
    ({"sensors": ANY, "curve": {"secret_key": "nope.key_secret"}}, FileNotFoundError, r"zmq\.curve\.secret_key: .*nope"),
    ({"sensors": ANY, "curve": {"secret_key": "keys/server.key"}}, ValueError, r"holds no secret key"),
    ({"sensors": ANY, "curve": {"secret_key": "keys/server.key_secret", "allowed": "missing"}},
     FileNotFoundError, r"zmq\.curve\.allowed"),
    ({"sensors": ANY, "curve": {"secret_key": "keys/server.key_secret", "allow": "x"}}, ValueError,
     r"zmq\.curve: unknown key\(s\) allow"),
])
def test_config_errors_name_the_key(keys, cfg, error, message):
    with pytest.raises(error, match=message):
        ZmqBridge.from_config(cfg, keys)


def test_bind_failure_is_reported(ctx):
    taken = ctx.socket(zmq.PUB)
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    try:
        with pytest.raises(RuntimeError, match=r"zmq\.decisions: cannot bind"):
            ZmqBridge.from_config({"decisions": f"tcp://127.0.0.1:{port}"}, Path(".")).start()
    finally:
        taken.close(linger=0)
