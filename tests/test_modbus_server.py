"""Modbus server mode against independent peers: mbpoll (libmodbus) and raw sockets."""
import random
import re
import shutil
import socket
import struct
import subprocess
import time

import pytest
from pymodbus.client import ModbusTcpClient

from plc_bridge.bridge import Bridge, Reporter
from plc_bridge.modbus import ModbusBridge
from tests.conftest import wait_for



@pytest.fixture(scope="module", autouse=True)
def _mbpoll_installed():
    if shutil.which("mbpoll") is None:
        pytest.fail("mbpoll (Debian package, libmodbus) is not installed; scripts/bootstrap.sh installs it")

INPUTS = ["level", "temp", "press"]
OUTPUTS = {"valve": 0.25, "flow": 0.0, "speed": 0.0, "pump": 0.0, "alarm": 0.0, "ir": -1.0}
MAP = [
    {"signal": "level", "table": "holding", "address": 0, "type": "float32", "word_order": "big"},
    {"signal": "temp", "table": "holding", "address": 2, "type": "float32", "word_order": "little"},
    {"signal": "press", "table": "holding", "address": 4, "type": "int16", "scale": 0.01},
    {"signal": "valve", "table": "holding", "address": 10, "type": "float32", "word_order": "big"},
    {"signal": "flow", "table": "holding", "address": 12, "type": "float32", "word_order": "little"},
    {"signal": "speed", "table": "holding", "address": 14, "type": "int16", "scale": 0.1, "offset": 0.0},
    {"signal": "pump", "table": "coil", "address": 0},
    {"signal": "alarm", "table": "discrete", "address": 3},
    {"signal": "ir", "table": "input", "address": 0, "type": "float32", "word_order": "big"},
]


def make_bridge(**extra):
    cfg = {"mode": "server", "host": "127.0.0.1", "port": 0, "device_id": 1, "map": MAP, **extra}
    return ModbusBridge.from_config(cfg, INPUTS, OUTPUTS)


@pytest.fixture
def bridge():
    b = make_bridge().start()
    yield b
    b.stop()


def mbpoll(port, *args, values=()):
    """Run mbpoll once: 0-based addresses, unit 1, one poll, 1 s timeout."""
    cmd = ["mbpoll", "-m", "tcp", "-p", str(port), "-a", "1", "-0", "-1", "-o", "1", *args, "127.0.0.1", *values]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=10)


def mbpoll_read(port, *args) -> list[float]:
    """mbpoll read; returns the values (the signed reading for 16-bit registers)."""
    r = mbpoll(port, *args)
    assert r.returncode == 0, r.stdout + r.stderr
    values = []
    for m in re.finditer(r"^\[(\d+)\]:\s+(\S+)(?: \((-?\d+)\))?$", r.stdout, re.M):
        values.append(float(m.group(3) if m.group(3) is not None else m.group(2)))
    return values


def mbpoll_write(port, *args, values):
    r = mbpoll(port, *args, values=[str(v) for v in values])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Written" in r.stdout


def test_mbpoll_writes_inputs_float32_both_word_orders_and_scaled_int16(bridge):
    p = bridge.port
    before = time.monotonic_ns()
    mbpoll_write(p, "-t", "4:float", "-B", "-r", "0", values=[1.5])           # ABCD
    mbpoll_write(p, "-t", "4:float", "-r", "2", values=["--", -3.25])         # CDAB
    mbpoll_write(p, "-t", "4", "-r", "4", values=[1234])                      # int16, scale 0.01
    snap = bridge.snapshot()
    assert snap["level"][0] == 1.5
    assert snap["temp"][0] == -3.25
    assert snap["press"][0] == pytest.approx(12.34)
    assert all(before <= rx <= time.monotonic_ns() for _, rx in snap.values())
    # mbpoll writes 16-bit registers unsigned; 64302 is int16 -1234.
    mbpoll_write(p, "-t", "4", "-r", "4", values=[64302])
    assert bridge.snapshot()["press"][0] == pytest.approx(-12.34)
    # The PLC reads back what it wrote, in its own word order; the other order is a different number.
    assert mbpoll_read(p, "-t", "4:float", "-B", "-r", "0") == [1.5]
    assert mbpoll_read(p, "-t", "4:float", "-r", "2") == [-3.25]
    assert mbpoll_read(p, "-t", "4:float", "-r", "0") != [1.5]


def test_mbpoll_reads_outputs_in_every_table(bridge):
    p = bridge.port
    assert mbpoll_read(p, "-t", "4:float", "-B", "-r", "10") == [0.25]       # fail-safe before any publish
    bridge.publish({"valve": 0.75, "flow": -2.5, "speed": -12.3, "pump": 1.0, "alarm": 1.0, "ir": 3.5,
                    "not_mapped": 9.0}, "ok", 1, 100.0)
    assert mbpoll_read(p, "-t", "4:float", "-B", "-r", "10") == [0.75]
    assert mbpoll_read(p, "-t", "4:float", "-r", "12") == [-2.5]
    assert mbpoll_read(p, "-t", "4", "-r", "14") == [-123]                    # -12.3 / 0.1
    assert mbpoll_read(p, "-t", "0", "-r", "0") == [1]
    assert mbpoll_read(p, "-t", "1", "-r", "3") == [1]
    assert mbpoll_read(p, "-t", "3:float", "-B", "-r", "0") == [3.5]
    # A non-finite decision never reaches the PLC: the output's fail-safe value goes instead.
    bridge.publish({"valve": float("nan"), "speed": float("inf")}, "ok", 2, 100.0)
    assert mbpoll_read(p, "-t", "4:float", "-B", "-r", "10") == [0.25]
    assert mbpoll_read(p, "-t", "4", "-r", "14") == [0]
    assert bridge.health()["errors"]["nonfinite_output"] == 2


def test_serves_exactly_its_stream():
    b = make_bridge(stream="line1").start()
    try:
        assert isinstance(b, Bridge) and not isinstance(b, Reporter) and b.name == "modbus"
        assert b.serves("line1") and not b.serves("main") and b.input_streams() == ["line1"]
        mbpoll_write(b.port, "-t", "4:float", "-B", "-r", "0", values=[1.5])
        assert b.snapshot("line1")["level"][0] == b.snapshot()["level"][0] == 1.5
        assert b.snapshot("main") == {}
        with pytest.raises(ValueError, match="serves stream 'line1', not 'main'"):
            b.publish({"valve": 0.75}, "ok", 1, 0.0, "main")
        assert mbpoll_read(b.port, "-t", "4:float", "-B", "-r", "10") == [0.25]     # still the fail-safe
        b.publish({"valve": 0.75}, "ok", 2, 0.0, "line1")
        assert mbpoll_read(b.port, "-t", "4:float", "-B", "-r", "10") == [0.75]
    finally:
        b.stop()


@pytest.mark.parametrize("stream", ["", 5, "x" * 65])
def test_stream_must_be_a_stream_name(stream):
    with pytest.raises(ValueError, match="modbus.stream: .* is not a stream name"):
        make_bridge(stream=stream)


def test_exception_codes_for_unknown_addresses_and_output_writes(bridge):
    p = bridge.port
    bridge.publish({"valve": 0.5}, "ok", 1, 0.0)
    r = mbpoll(p, "-t", "4", "-r", "100")                                     # not in the map
    assert r.returncode != 0 and "Illegal data address" in r.stderr
    r = mbpoll(p, "-t", "4", "-r", "4", "-c", "3")                            # 4 mapped, 5 and 6 not
    assert r.returncode != 0 and "Illegal data address" in r.stderr
    r = mbpoll(p, "-t", "4:float", "-B", "-r", "10", values=["2.0"])         # output: read-only
    assert r.returncode != 0 and "Illegal data address" in r.stderr
    r = mbpoll(p, "-t", "0", "-r", "0", values=["0"])                         # output coil
    assert r.returncode != 0 and "Illegal data address" in r.stderr
    assert mbpoll_read(p, "-t", "4:float", "-B", "-r", "10") == [0.5]         # unchanged
    assert bridge.health()["bad"]["illegal_address"] == 4


def _request(sock, tid, pdu, unit=1):
    sock.sendall(struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu)


def _response(sock):
    head = _recv_exact(sock, 7)
    tid, pid, length, unit = struct.unpack(">HHHB", head)
    return tid, unit, _recv_exact(sock, length - 1)


def _recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def test_protocol_exceptions_on_raw_socket(bridge):
    with socket.create_connection(("127.0.0.1", bridge.port), timeout=2) as s:
        cases = [
            (struct.pack(">BHH", 3, 0, 0), b"\x83\x03"),        # quantity 0
            (struct.pack(">BHH", 3, 0, 126), b"\x83\x03"),      # quantity > 125
            (struct.pack(">BHH", 1, 0, 2001), b"\x81\x03"),     # coils > 2000
            (struct.pack(">BHH", 5, 0, 0x1234), b"\x85\x03"),   # coil value not FF00/0000
            (struct.pack(">BHH", 4, 0, 2), None),               # input registers 0..1: ok
            (struct.pack(">BHH", 4, 65535, 2), b"\x84\x02"),    # past the address space
            (bytes([0x2B, 0x0E, 0x01, 0x00]), b"\xab\x01"),     # device identification: not served
            (bytes([0x41]), b"\xc1\x01"),                       # unknown function code
        ]
        for tid, (pdu, expected) in enumerate(cases, start=1):
            _request(s, tid, pdu)
            rtid, unit, reply = _response(s)
            assert (rtid, unit) == (tid, 1)
            if expected is None:
                assert reply[:2] == b"\x04\x04"
            else:
                assert reply == expected, (pdu, reply)
        _request(s, 99, struct.pack(">BHH", 3, 0, 2), unit=7)   # another unit id
        assert _response(s) == (99, 7, b"\x83\x0b")
        # Three requests in one segment are answered in order.
        s.sendall(b"".join(struct.pack(">HHHB", 200 + i, 0, 6, 1) + struct.pack(">BHH", 3, 10, 2) for i in range(3)))
        assert [_response(s)[0] for _ in range(3)] == [200, 201, 202]
    bad = bridge.health()["bad"]
    assert bad["illegal_value"] == 4 and bad["illegal_address"] == 1
    assert bad["illegal_function"] == 2 and bad["unknown_unit"] == 1


def test_allow_list_refuses_other_clients():
    b = make_bridge(allow=["10.9.8.7", "192.168.0.0/16"]).start()
    try:
        r = mbpoll(b.port, "-t", "4:float", "-B", "-r", "10")
        assert r.returncode != 0
        assert b.health()["bad"]["rejected_client"] >= 1
    finally:
        b.stop()
    b = make_bridge(allow=["127.0.0.0/8"]).start()
    try:
        assert mbpoll_read(b.port, "-t", "4:float", "-B", "-r", "10") == [0.25]
        assert "rejected_client" not in b.health()["bad"]
    finally:
        b.stop()


def test_heartbeat_stop_forces_failsafe_until_publish_with_heartbeat_back():
    b = make_bridge(heartbeat={"address": 100, "timeout_ms": 300}).start()
    try:
        p = b.port
        h = b.health()
        assert not h["heartbeat_ok"] and h["failsafe"]
        b.publish({"valve": 0.9}, "ok", 1, 0.0)                         # ignored: no heartbeat yet
        assert mbpoll_read(p, "-t", "4:float", "-B", "-r", "10") == [0.25]
        mbpoll_write(p, "-t", "4", "-r", "100", values=[1])
        assert b.health()["heartbeat_ok"]
        b.publish({"valve": 0.9}, "ok", 2, 0.0)
        assert mbpoll_read(p, "-t", "4:float", "-B", "-r", "10") == [0.9]
        assert not b.health()["failsafe"]
        mbpoll_write(p, "-t", "4", "-r", "100", values=[1])             # same value: not a heartbeat
        # The heartbeat stops: without any publish the bridge itself writes the fail-safe value.
        assert wait_for(lambda: b.health()["failsafe"], timeout=5.0)
        assert not b.health()["heartbeat_ok"]
        assert mbpoll_read(p, "-t", "4:float", "-B", "-r", "10") == [0.25]
        b.publish({"valve": 0.8}, "ok", 3, 0.0)                         # still stale: ignored
        assert mbpoll_read(p, "-t", "4:float", "-B", "-r", "10") == [0.25]
        mbpoll_write(p, "-t", "4", "-r", "100", values=[2])             # heartbeat back
        assert b.health()["heartbeat_ok"]
        assert mbpoll_read(p, "-t", "4:float", "-B", "-r", "10") == [0.25]  # until the next publish
        b.publish({"valve": 0.8}, "ok", 4, 0.0)
        assert mbpoll_read(p, "-t", "4:float", "-B", "-r", "10") == [pytest.approx(0.8)]
        assert b.health()["errors"]["failsafe_entries"] >= 1
    finally:
        b.stop()


def _bad_total(b):
    return sum(b.health()["bad"].values())


def test_fuzzed_frames_are_counted_and_good_traffic_keeps_flowing(bridge):
    rng = random.Random(20240611)
    port = bridge.port
    good = ModbusTcpClient("127.0.0.1", port=port, timeout=2)
    assert good.connect()

    def good_round_trip(i):
        value = float(i)
        rr = good.write_registers(0, ModbusTcpClient.convert_to_registers(value, good.DATATYPE.FLOAT32), device_id=1)
        assert not rr.isError()
        assert bridge.snapshot()["level"][0] == value
        rr = good.read_holding_registers(10, count=2, device_id=1)
        assert not rr.isError() and rr.registers == [0x3E80, 0]          # valve fail-safe 0.25

    # 1. Well-framed requests with random function codes and bodies on one connection: each
    #    gets an answer, and every exception answer is counted.
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        exceptions = 0
        before = _bad_total(bridge)
        for i in range(400):
            pdu = bytes([rng.randrange(256)]) + rng.randbytes(rng.randrange(0, 12))
            _request(s, i, pdu)
            tid, unit, reply = _response(s)
            assert tid == i and unit == 1
            exceptions += reply[0] >= 0x80
            if i % 50 == 0:
                good_round_trip(i)
        assert exceptions > 300
        assert _bad_total(bridge) - before == exceptions

    # 2. Broken MBAP headers: counted, that connection closed, nothing else disturbed.
    before = bridge.health()["bad"].get("bad_frame", 0)
    for i in range(150):
        junk = rng.randbytes(rng.randrange(8, 300))
        junk = junk[:2] + struct.pack(">H", rng.randrange(1, 65536)) + junk[4:]   # protocol id != 0
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(junk)
            assert s.recv(16) == b""                                       # server closed it
        if i % 50 == 0:
            good_round_trip(1000 + i)
    assert bridge.health()["bad"]["bad_frame"] - before == 150

    # 3. Truncated frames: the peer goes away mid-frame; counted when the connection ends.
    #    (One at a time: a burst of connections would partly be refused by max_clients.)
    before = bridge.health()["bad"].get("truncated", 0)
    for i in range(150):
        frame = struct.pack(">HHHB", i, 0, 11, 1) + struct.pack(">BHHB", 16, 0, 2, 4) + rng.randbytes(4)
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(frame[:rng.randrange(1, len(frame))])
        assert wait_for(lambda: bridge.health()["bad"].get("truncated", 0) - before == i + 1)
        if i % 50 == 0:
            good_round_trip(2000 + i)

    good_round_trip(3000)
    good.close()
    assert bridge.health()["running"]
    assert "handler_error" not in bridge.health()["bad"]


def test_port_in_use_is_reported(bridge):
    with pytest.raises(RuntimeError, match=r"modbus server 127\.0\.0\.1:\d+"):
        ModbusBridge.from_config({"mode": "server", "port": bridge.port, "map": MAP}, INPUTS, OUTPUTS).start()


@pytest.mark.parametrize("cfg, message", [
    ({"mode": "server", "port": 0, "map": MAP, "hearbeat": {}}, r"modbus: unknown key\(s\) hearbeat"),
    ({"mode": "slave", "map": MAP}, r"modbus\.mode: 'slave'"),
    ({"mode": "server", "port": 70000, "map": MAP}, r"modbus\.port: 70000"),
    ({"mode": "server", "map": MAP, "allow": ["10.0.0.300"]}, r"modbus\.allow\[0\]: '10\.0\.0\.300'"),
    ({"mode": "client", "map": MAP, "allow": ["10.0.0.1"]}, r"modbus\.allow: only applies to server mode"),
    ({"mode": "server", "port": 0}, r"modbus\.map: missing"),
    ({"mode": "server", "port": 0, "map": MAP, "reconnect_min_ms": 0}, r"modbus\.reconnect_min_ms"),
])
def test_config_errors_name_the_key(cfg, message):
    with pytest.raises(ValueError, match=message):
        ModbusBridge.from_config(cfg, INPUTS, OUTPUTS)


def test_failsafe_value_must_be_finite():
    with pytest.raises(ValueError, match=r"outputs\['valve'\]: failsafe = nan"):
        ModbusBridge.from_config({"mode": "server", "port": 0, "map": MAP}, INPUTS, {**OUTPUTS, "valve": float("nan")})


def test_on_input_callback_and_a_faulty_one():
    seen = []
    cfg = {"mode": "server", "host": "127.0.0.1", "port": 0, "map": MAP}
    with ModbusBridge.from_config(cfg, INPUTS, OUTPUTS, on_input=seen.append) as b:
        mbpoll_write(b.port, "-t", "4:float", "-B", "-r", "0", values=[2.5])
        # The PLC is answered first; the callback follows in the I/O thread.
        assert wait_for(lambda: len(seen) == 1)
        assert list(seen[0]) == ["level"] and seen[0]["level"][0] == 2.5

    def broken(updates):
        raise RuntimeError("bug in the callback")

    with ModbusBridge.from_config(cfg, INPUTS, OUTPUTS, on_input=broken) as b:
        mbpoll_write(b.port, "-t", "4:float", "-B", "-r", "0", values=[2.5])
        mbpoll_write(b.port, "-t", "4:float", "-B", "-r", "0", values=[3.5])
        assert b.snapshot()["level"][0] == 3.5
        assert wait_for(lambda: b.health()["errors"].get("callback_error") == 2)


def test_every_served_function_with_pymodbus_as_the_independent_client():
    """Functions 1-6, 15, 16, 22 and 23 as pymodbus' client encodes and decodes them."""
    cfg = {"mode": "server", "host": "127.0.0.1", "port": 0, "map": [
        {"signal": "a", "table": "holding", "address": 0, "type": "uint16"},
        {"signal": "b", "table": "holding", "address": 1, "type": "uint16"},
        {"signal": "c0", "table": "coil", "address": 8}, {"signal": "c1", "table": "coil", "address": 9},
        {"signal": "y", "table": "holding", "address": 10, "type": "uint16"},
        {"signal": "z", "table": "coil", "address": 0},
        {"signal": "d", "table": "discrete", "address": 2},
        {"signal": "r", "table": "input", "address": 4, "type": "int16"}]}
    with ModbusBridge.from_config(cfg, ["a", "b", "c0", "c1"], {"y": 7.0, "z": 1.0, "d": 1.0, "r": -5.0}) as b:
        c = ModbusTcpClient("127.0.0.1", port=b.port, timeout=2)
        assert c.connect()
        try:
            assert c.read_coils(0, count=1, device_id=1).bits[0] is True                       # FC1
            assert c.read_discrete_inputs(2, count=1, device_id=1).bits[0] is True             # FC2
            assert c.read_holding_registers(10, count=1, device_id=1).registers == [7]         # FC3
            assert c.read_input_registers(4, count=1, device_id=1).registers == [0xFFFB]       # FC4
            assert not c.write_coil(9, True, device_id=1).isError()                            # FC5
            assert not c.write_register(0, 0x1234, device_id=1).isError()                      # FC6
            assert not c.write_coils(8, [True, False], device_id=1).isError()                  # FC15
            assert not c.write_registers(0, [0x00F0, 3], device_id=1).isError()                # FC16
            assert {k: v for k, (v, _) in b.snapshot().items()} == {"a": 0xF0, "b": 3, "c0": 1.0, "c1": 0.0}
            # FC22: (current AND and_mask) OR (or_mask AND NOT and_mask), the specification's example
            assert not c.write_register(0, 0x12, device_id=1).isError()
            rr = c.mask_write_register(address=0, and_mask=0x00F2, or_mask=0x0025, device_id=1)
            assert not rr.isError() and b.snapshot()["a"][0] == 0x17
            rr = c.readwrite_registers(read_address=0, read_count=2, write_address=1, values=[9], device_id=1)  # FC23
            assert rr.registers == [0x17, 9]                                                   # written first
            assert c.write_register(10, 1, device_id=1).isError()                              # an output
        finally:
            c.close()


def test_stop_with_a_client_connected_ends_its_handler_quietly(caplog):
    """Stopping ends a connected client's handler through the lost connection, not a
    cancellation, which Python 3.11's asyncio streams log as an error with a traceback."""
    b = make_bridge().start()
    client = ModbusTcpClient("127.0.0.1", port=b.port, timeout=2.0, retries=0)
    try:
        assert client.connect()
        assert not client.read_holding_registers(10, count=2, device_id=1).isError()
        with caplog.at_level("ERROR", logger="asyncio"):
            b.stop()
        assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []
    finally:
        client.close()
        b.stop()
