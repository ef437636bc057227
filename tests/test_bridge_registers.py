"""Register maps: codecs checked against pymodbus' own converters, validation errors, planning."""
import math
import random
import struct

import pytest
from pymodbus.client import ModbusTcpClient

from plc_bridge.registers import MAX_READ_REGISTERS, RegisterMap

DT = ModbusTcpClient.DATATYPE
PYMODBUS_TYPE = {"int16": DT.INT16, "uint16": DT.UINT16, "int32": DT.INT32, "uint32": DT.UINT32,
                 "float32": DT.FLOAT32}


def _map(entries, inputs=(), outputs=(), mode="server", **kw):
    return RegisterMap.from_config(entries, inputs=inputs, outputs=outputs, mode=mode, **kw)


@pytest.mark.parametrize("typ", sorted(PYMODBUS_TYPE))
@pytest.mark.parametrize("word_order", ["big", "little"])
def test_codec_matches_pymodbus_converters(typ, word_order):
    entry = _map([{"signal": "x", "table": "holding", "address": 0, "type": typ, "word_order": word_order}],
                 inputs=["x"]).entries[0]
    rng = random.Random(f"{typ}-{word_order}")
    fmt = {"int16": "h", "uint16": "H", "int32": "i", "uint32": "I", "float32": "f"}[typ]
    for _ in range(500):
        raw_bytes = rng.randbytes(struct.calcsize(fmt))
        value = struct.unpack(">" + fmt, raw_bytes)[0]
        if typ == "float32" and math.isnan(value):
            continue
        expected = ModbusTcpClient.convert_to_registers(value, PYMODBUS_TYPE[typ], word_order=word_order)
        words, clamped = entry.encode(float(value))
        assert words == expected and not clamped
        assert entry.decode(words) == ModbusTcpClient.convert_from_registers(
            expected, PYMODBUS_TYPE[typ], word_order=word_order)


def test_word_order_abcd_and_cdab():
    big, little = _map([
        {"signal": "a", "table": "holding", "address": 0, "type": "float32", "word_order": "big"},
        {"signal": "b", "table": "holding", "address": 2, "type": "float32", "word_order": "little"},
    ], inputs=["a", "b"]).entries
    # 1.5f = 0x3FC00000: ABCD sends the high word first, CDAB the low word first.
    assert big.encode(1.5)[0] == [0x3FC0, 0x0000]
    assert little.encode(1.5)[0] == [0x0000, 0x3FC0]


def test_scale_offset_rounding_and_clamping():
    e = _map([{"signal": "t", "table": "holding", "address": 0, "type": "int16", "scale": 0.1, "offset": -40.0}],
             inputs=["t"]).entries[0]
    assert e.encode(21.5) == ([615], False)             # (21.5 + 40) / 0.1
    assert e.decode([615]) == pytest.approx(21.5)
    assert e.decode([0xFFFF]) == pytest.approx(-40.1)   # int16 -1
    assert e.encode(1e9) == ([32767], True)
    assert e.encode(-1e9) == ([0x8000], True)
    with pytest.raises(ValueError, match="NaN"):
        e.encode(float("nan"))
    f = _map([{"signal": "f", "table": "holding", "address": 0, "type": "float32"}], inputs=["f"]).entries[0]
    assert f.encode(1e39)[1] is True and f.decode(f.encode(1e39)[0]) == struct.unpack(">f", b"\x7f\x7f\xff\xff")[0]
    assert math.isnan(f.decode(f.encode(float("nan"))[0]))
    c = _map([{"signal": "c", "table": "coil", "address": 3}], inputs=["c"]).entries[0]
    assert c.encode(2.0) == ([1], False) and c.encode(0.0) == ([0], False) and c.decode([1]) == 1.0


@pytest.mark.parametrize("entries, kwargs, message", [
    ([{"signal": "a", "table": "holding", "address": 0, "type": "float32"},
      {"signal": "b", "table": "holding", "address": 1, "type": "int16"}], {},
     r"modbus\.map\[1\] \(signal 'b'\): holding address 1 overlaps modbus\.map\[0\] \(signal 'a'\)"),
    ([{"signal": "a", "table": "holding", "address": 65535, "type": "int32"}], {},
     r"modbus\.map\[0\] \(signal 'a'\): address 65535 .* outside 0\.\.65535"),
    ([{"signal": "a", "table": "holding", "address": -1, "type": "int16"}], {},
     r"modbus\.map\[0\] \(signal 'a'\): address -1"),
    ([{"signal": "a", "table": "holding", "address": 0, "type": "float64"}], {},
     r"modbus\.map\[0\] \(signal 'a'\): type = 'float64'"),
    ([{"signal": "a", "table": "holding", "adress": 0, "type": "int16"}], {},
     r"modbus\.map\[0\] \(signal 'a'\): unknown key\(s\) adress"),
    ([{"signal": "a", "table": "holding", "address": 0, "type": "int16", "word_order": "middle"}], {},
     r"word_order = 'middle'"),
    ([{"signal": "a", "table": "holding", "address": 0, "type": "int16", "scale": 0}], {}, r"scale must not be 0"),
    ([{"signal": "a", "table": "holding", "address": "7", "type": "int16"}], {}, r"address = '7' is not an integer"),
    ([{"signal": "zz", "table": "holding", "address": 0, "type": "int16"}], {},
     r"modbus\.map\[0\] \(signal 'zz'\): signal is not a declared input or output"),
    ([{"signal": "a", "table": "input", "address": 0, "type": "int16"}], {},
     r"modbus\.map\[0\] \(signal 'a'\): in server mode the PLC writes inputs"),
    ([{"signal": "a", "table": "coil", "address": 0, "type": "int16"}], {}, r"'type' does not apply to a coil"),
    ([{"signal": "a", "table": "holding", "address": 0, "type": "int16"},
      {"signal": "a", "table": "holding", "address": 5, "type": "int16"}], {},
     r"modbus\.map\[1\] \(signal 'a'\): signal already mapped by modbus\.map\[0\]"),
    ([{"signal": "a", "table": "holding", "address": 100, "type": "int16"}], {"heartbeat": {"address": 100, "timeout_ms": 500}},
     r"modbus\.map\[0\] \(signal 'a'\): holding address 100 overlaps modbus\.heartbeat"),
    ([{"signal": "a", "table": "holding", "address": 0, "type": "int16"}], {"heartbeat": {"address": 5}},
     r"modbus\.heartbeat: 'timeout_ms' is missing"),
    ([{"signal": "a", "table": "holding", "address": 0, "type": "int16"}], {"max_read": 200},
     r"modbus\.max_read: 200 .* at most 125 registers per read"),
    ([{"signal": "a", "table": "holding", "address": 0, "type": "float32"}], {"max_read": 1},
     r"modbus\.map\[0\] \(signal 'a'\): needs 2 registers in one read, more than modbus\.max_read = 1"),
])
def test_validation_names_the_entry(entries, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _map(entries, inputs=["a", "b"], **kwargs)


def test_client_mode_outputs_must_be_writable():
    with pytest.raises(ValueError, match=r"modbus\.map\[0\] \(signal 'v'\): in client mode outputs"):
        _map([{"signal": "v", "table": "input", "address": 0, "type": "int16"}], outputs=["v"], mode="client")
    # inputs may come from any table when we poll
    _map([{"signal": "a", "table": "input", "address": 0, "type": "int16"},
          {"signal": "b", "table": "discrete", "address": 0}], inputs=["a", "b"], mode="client")


def test_read_plan_respects_limit_and_never_splits_a_value():
    entries = [{"signal": f"s{i}", "table": "holding", "address": 2 * i, "type": "float32"} for i in range(70)]
    entries += [{"signal": "gap", "table": "holding", "address": 1000, "type": "int16"},
                {"signal": "ir", "table": "input", "address": 0, "type": "int16"}]
    names = [e["signal"] for e in entries]
    m = _map(entries, inputs=names, mode="client")
    blocks = m.read_blocks(m.inputs)
    assert [(b.table, b.address, b.count) for b in blocks] == [
        ("holding", 0, 124), ("holding", 124, 16), ("holding", 1000, 1), ("input", 0, 1)]
    assert all(b.count <= MAX_READ_REGISTERS for b in blocks)
    covered = [e.signal for b in blocks for e in b.entries]
    assert sorted(covered) == sorted(names)
    small = _map(entries, inputs=names, mode="client", max_read=10)
    assert max(b.count for b in small.read_blocks(small.inputs)) == 10
