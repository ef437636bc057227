"""The ZeroMQ message schemas: one msgpack map per single-frame message.

Sensor frame (publisher -> bridge)::

    {"v": 1, "stream": str, "seq": int, "t_ns": int, "values": {name: float}}

Decision (bridge -> subscribers)::

    {"v": 1, "stream": str, "seq": int, "t_ns": int, "outputs": {name: float},
     "status": "ok" | "failsafe" | "hold", "latency_us": float}

Control request (client -> bridge ROUTER) ``{"v": 1, "cmd": "status" | "stats" | "health"}``,
or ``{"v": 1, "cmd": "mode", "stream": str, "mode": "manual" | "auto"}`` to switch a stream;
reply ``{"v": 1, "ok": bool, "cmd": str, "result": map}`` or ``{"v": 1, "ok": False,
"error": str}``.

Decoding treats its input as hostile: the size is checked before unpacking, msgpack runs
with length limits, and every field is checked for presence, type and range. Any failure
raises :class:`MessageError` with a short ``reason`` that the bridges count. Values may be
ints or floats (ints become floats); NaN and infinities are valid on the wire (a sensor may
report "no reading") and it is the controller that treats them as invalid input. Booleans,
strings, nested containers, extension types, missing or extra keys, and any ``v`` other
than 1 are rejected.
"""
from __future__ import annotations

import msgpack

VERSION = 1
MAX_MESSAGE_BYTES = 65536
MAX_VALUES = 256
MAX_NAME_LEN = 64
STATUSES = frozenset(("ok", "failsafe", "hold"))
COMMANDS = frozenset(("status", "stats", "health", "mode"))
MODES = frozenset(("manual", "auto"))
_U64 = 1 << 64
_SENSOR_KEYS = frozenset(("v", "stream", "seq", "t_ns", "values"))
_DECISION_KEYS = frozenset(("v", "stream", "seq", "t_ns", "outputs", "status", "latency_us"))
_CONTROL_KEYS = frozenset(("v", "cmd"))
_MODE_KEYS = frozenset(("v", "cmd", "stream", "mode"))


class MessageError(ValueError):
    """A message that fails decoding or validation. ``reason`` is a counter name:
    ``oversize``, ``malformed``, ``schema``, ``version``, ``type``, ``limits``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _unpack(data: bytes, max_bytes: int, max_values: int) -> dict:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageError("type", f"payload is {type(data).__name__}, not bytes")
    if len(data) > max_bytes:
        raise MessageError("oversize", f"{len(data)} bytes > {max_bytes}")
    try:
        obj = msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True,
            max_str_len=max_bytes, max_bin_len=max_bytes, max_array_len=max_values,
            max_map_len=max(max_values, 16), max_ext_len=max_bytes)
    except Exception as exc:  # msgpack raises several types for hostile input; all mean the same here
        raise MessageError("malformed", f"msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise MessageError("schema", f"top level is {type(obj).__name__}, not a map")
    return obj


def _check_keys(obj: dict, expected: frozenset, what: str) -> None:
    if obj.keys() != expected:
        missing = sorted(expected - obj.keys())
        extra = sorted(map(str, obj.keys() - expected))
        raise MessageError("schema", f"{what}: missing {missing}, unexpected {extra}")
    v = obj["v"]
    if type(v) is not int or v != VERSION:
        raise MessageError("version", f"{what}: v = {v!r}, expected {VERSION}")


def _name(value, what: str) -> str:
    if type(value) is not str:
        raise MessageError("type", f"{what} is {type(value).__name__}, not str")
    if not 0 < len(value) <= MAX_NAME_LEN:
        raise MessageError("limits", f"{what} length {len(value)} not in 1..{MAX_NAME_LEN}")
    return value


def _u64(value, what: str) -> int:
    if type(value) is not int:
        raise MessageError("type", f"{what} is {type(value).__name__}, not int")
    if not 0 <= value < _U64:
        raise MessageError("limits", f"{what} = {value} outside 0..2**64-1")
    return value


def _number_map(value, what: str, max_values: int) -> dict[str, float]:
    if type(value) is not dict:
        raise MessageError("type", f"{what} is {type(value).__name__}, not a map")
    if not 0 < len(value) <= max_values:
        raise MessageError("limits", f"{what} has {len(value)} entries, not 1..{max_values}")
    out = {}
    for name, x in value.items():
        _name(name, f"{what} name")
        t = type(x)
        if t is float:
            out[name] = x
        elif t is int:
            out[name] = float(x)
        else:
            raise MessageError("type", f"{what}[{name!r}] is {t.__name__}, not a number")
    return out


def decode_sensor(data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES, max_values: int = MAX_VALUES) -> dict:
    """Validate one sensor frame; returns ``{"v", "stream", "seq", "t_ns", "values"}``
    with float values. Raises :class:`MessageError`."""
    obj = _unpack(data, max_bytes, max_values)
    _check_keys(obj, _SENSOR_KEYS, "sensor frame")
    return {
        "v": VERSION,
        "stream": _name(obj["stream"], "stream"),
        "seq": _u64(obj["seq"], "seq"),
        "t_ns": _u64(obj["t_ns"], "t_ns"),
        "values": _number_map(obj["values"], "values", max_values),
    }


def decode_decision(data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES, max_values: int = MAX_VALUES) -> dict:
    """Validate one decision message (for subscribers). Raises :class:`MessageError`."""
    obj = _unpack(data, max_bytes, max_values)
    _check_keys(obj, _DECISION_KEYS, "decision")
    status = obj["status"]
    if type(status) is not str or status not in STATUSES:
        raise MessageError("type", f"status = {status!r} is not one of {sorted(STATUSES)}")
    latency = obj["latency_us"]
    if type(latency) not in (float, int):
        raise MessageError("type", f"latency_us is {type(latency).__name__}, not a number")
    return {
        "v": VERSION,
        "stream": _name(obj["stream"], "stream"),
        "seq": _u64(obj["seq"], "seq"),
        "t_ns": _u64(obj["t_ns"], "t_ns"),
        "outputs": _number_map(obj["outputs"], "outputs", max_values),
        "status": status,
        "latency_us": float(latency),
    }


def decode_control(data: bytes, *, max_bytes: int = 4096) -> dict:
    """Validate a control request; returns ``{"cmd": name}``, with ``stream`` and ``mode`` for
    "mode". Raises :class:`MessageError`."""
    obj = _unpack(data, max_bytes, 16)
    is_mode = obj.get("cmd") == "mode"
    _check_keys(obj, _MODE_KEYS if is_mode else _CONTROL_KEYS, "control request")
    cmd = obj["cmd"]
    if type(cmd) is not str or cmd not in COMMANDS:
        raise MessageError("type", f"cmd = {cmd!r} is not one of {sorted(COMMANDS)}")
    if not is_mode:
        return {"cmd": cmd}
    mode = obj["mode"]
    if type(mode) is not str or mode not in MODES:
        raise MessageError("type", f"mode = {mode!r} is not one of {sorted(MODES)}")
    return {"cmd": cmd, "stream": _name(obj["stream"], "stream"), "mode": mode}


def _check_values(values: dict, what: str, max_values: int) -> dict[str, float]:
    if not isinstance(values, dict) or not 0 < len(values) <= max_values:
        raise ValueError(f"{what}: must be a map of 1..{max_values} names to numbers")
    out = {}
    for name, x in values.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LEN:
            raise ValueError(f"{what}: name {name!r} is not a string of 1..{MAX_NAME_LEN} characters")
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise ValueError(f"{what}[{name!r}] = {x!r} is not a number")
        out[name] = float(x)
    return out


def _check_header(stream: str, seq: int, t_ns: int) -> None:
    if not isinstance(stream, str) or not 0 < len(stream) <= MAX_NAME_LEN:
        raise ValueError(f"stream {stream!r} is not a string of 1..{MAX_NAME_LEN} characters")
    for what, x in (("seq", seq), ("t_ns", t_ns)):
        if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < _U64:
            raise ValueError(f"{what} = {x!r} is not an integer in 0..2**64-1")


def encode_sensor(stream: str, seq: int, t_ns: int, values: dict, *, max_values: int = MAX_VALUES) -> bytes:
    """Pack a sensor frame (raises ``ValueError`` on arguments outside the schema)."""
    _check_header(stream, seq, t_ns)
    return msgpack.packb({"v": VERSION, "stream": stream, "seq": seq, "t_ns": t_ns,
                          "values": _check_values(values, "values", max_values)})


def encode_decision(stream: str, seq: int, t_ns: int, outputs: dict, status: str, latency_us: float,
                    *, max_values: int = MAX_VALUES) -> bytes:
    """Pack a decision (raises ``ValueError`` on arguments outside the schema)."""
    _check_header(stream, seq, t_ns)
    if status not in STATUSES:
        raise ValueError(f"status {status!r} is not one of {sorted(STATUSES)}")
    if isinstance(latency_us, bool) or not isinstance(latency_us, (int, float)):
        raise ValueError(f"latency_us = {latency_us!r} is not a number")
    return msgpack.packb({"v": VERSION, "stream": stream, "seq": seq, "t_ns": t_ns,
                          "outputs": _check_values(outputs, "outputs", max_values),
                          "status": status, "latency_us": float(latency_us)})


def encode_control(cmd: str, **args) -> bytes:
    """Pack a control request (``stream=`` and ``mode=`` for "mode")."""
    if cmd not in COMMANDS:
        raise ValueError(f"cmd {cmd!r} is not one of {sorted(COMMANDS)}")
    if cmd == "mode":
        if args.keys() != {"stream", "mode"} or args["mode"] not in MODES:
            raise ValueError(f"a mode request takes stream= and mode= one of {sorted(MODES)}, got {args}")
        _check_header(args["stream"], 0, 0)
    elif args:
        raise ValueError(f"{cmd!r} takes no arguments, got {sorted(args)}")
    return msgpack.packb({"v": VERSION, "cmd": cmd, **args})


def encode_reply(obj: dict) -> bytes:
    """Pack a control reply. Non-finite floats are fine; objects msgpack cannot pack become
    their ``str()`` so a provider's odd value never breaks the reply."""
    return msgpack.packb(obj, default=str)

