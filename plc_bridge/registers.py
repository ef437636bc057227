"""Modbus register maps: entries, value codecs, validation at load, read/write planning.

A map entry ties one named signal to a place in one of the four Modbus tables and says how
its raw bits become an engineering value::

    engineering = raw * scale + offset

Registers are 16-bit words sent big-endian on the wire (Modbus application protocol). A
32-bit value spans two consecutive registers; ``word_order = "big"`` puts the high word
first (ABCD, what ``mbpoll -B`` expects), ``"little"`` puts the low word first (CDAB,
``mbpoll`` without ``-B``). Coils and discrete inputs carry 0.0 or 1.0.

Everything here is pure data and arithmetic, the server's register image
(:class:`RegisterImage`) included; the servers and clients live in :mod:`plc_bridge.modbus`.
"""
from __future__ import annotations

import math
import struct
from array import array
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from .bridge import refuse_unknown_keys

TABLES = ("holding", "input", "coil", "discrete")
BIT_TABLES = frozenset(("coil", "discrete"))
#: type name -> (struct format of the big-endian value, number of registers)
TYPES = {
    "int16": ("h", 1),
    "uint16": ("H", 1),
    "int32": ("i", 2),
    "uint32": ("I", 2),
    "float32": ("f", 2),
}
INT_RANGES = {
    "int16": (-(1 << 15), (1 << 15) - 1),
    "uint16": (0, (1 << 16) - 1),
    "int32": (-(1 << 31), (1 << 31) - 1),
    "uint32": (0, (1 << 32) - 1),
}
WORD_ORDERS = ("big", "little")
#: The longest timeout a map or bridge key may give, in ms (a day): past it a value is a typo.
MAX_TIMEOUT_MS = 86_400_000
FLOAT32_MAX = struct.unpack(">f", b"\x7f\x7f\xff\xff")[0]

#: Protocol limits per request (Modbus application protocol V1.1b3, section 6).
MAX_READ_REGISTERS = 125
MAX_READ_BITS = 2000
MAX_WRITE_REGISTERS = 123
MAX_WRITE_BITS = 1968
ADDRESS_SPACE = 65536

#: Access levels of an address in a :class:`RegisterImage`.
UNMAPPED, READABLE, WRITABLE = 0, 1, 2

_ENTRY_KEYS = frozenset(("signal", "table", "address", "type", "word_order", "scale", "offset"))


@dataclass(frozen=True)
class MapEntry:
    """One signal in a register map.

    ``direction`` is ``"input"`` (a value the controller reads) or ``"output"`` (a value it
    decides). ``index`` is the entry's position in the configuration list, used to name it
    in errors.
    """

    index: int
    signal: str
    table: str
    address: int
    type: str
    word_order: str
    scale: float
    offset: float
    direction: str
    #: Registers (or bits, for coils and discrete inputs) the entry spans; one past its last
    #: address; whether it is a coil or discrete input (plain fields: read on every request).
    width: int = field(init=False, repr=False, compare=False)
    end: int = field(init=False, repr=False, compare=False)
    is_bit: bool = field(init=False, repr=False, compare=False)
    _fmt: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        fmt, width = ("?", 1) if self.table in BIT_TABLES else TYPES[self.type]
        object.__setattr__(self, "_fmt", ">" + fmt)
        object.__setattr__(self, "width", width)
        object.__setattr__(self, "end", self.address + width)
        object.__setattr__(self, "is_bit", self.table in BIT_TABLES)

    def name(self) -> str:
        """How errors and logs refer to this entry."""
        return f"modbus.map[{self.index}] (signal {self.signal!r})"

    def encode(self, value: float) -> tuple[list[int], bool]:
        """Engineering value -> raw registers (or ``[0|1]`` for a bit), and whether it was clamped.

        Integer types round to nearest and clamp to the type's range; float32 clamps to
        the largest finite float32. NaN cannot be sent as an integer or a bit: the caller
        substitutes the output's fail-safe value first (``ValueError`` otherwise).
        """
        if self.table in BIT_TABLES:
            if math.isnan(value):
                raise ValueError(f"{self.name()}: NaN cannot be written to a {self.table}")
            return [1 if value != 0.0 else 0], False
        raw = (value - self.offset) / self.scale
        clamped = False
        if self.type == "float32":
            if math.isfinite(raw) and abs(raw) > FLOAT32_MAX:
                raw, clamped = math.copysign(FLOAT32_MAX, raw), True
        else:
            if math.isnan(raw):
                raise ValueError(f"{self.name()}: NaN cannot be written as {self.type}")
            lo, hi = INT_RANGES[self.type]
            if raw < lo or raw > hi:
                raw, clamped = (lo if raw < lo else hi), True
            else:
                raw = round(raw)
        data = struct.pack(self._fmt, raw)
        if self.width == 1:
            return [int.from_bytes(data, "big")], clamped
        hi_word, lo_word = int.from_bytes(data[:2], "big"), int.from_bytes(data[2:], "big")
        return ([hi_word, lo_word] if self.word_order == "big" else [lo_word, hi_word]), clamped

    def decode(self, raw: Sequence[int]) -> float:
        """Raw registers (or bits) -> engineering value."""
        if self.table in BIT_TABLES:
            return 1.0 if raw[0] else 0.0
        if self.width == 1:
            value = struct.unpack(self._fmt, raw[0].to_bytes(2, "big"))[0]
        else:
            first, second = raw[0], raw[1]
            if self.word_order == "little":
                first, second = second, first
            value = struct.unpack(self._fmt, first.to_bytes(2, "big") + second.to_bytes(2, "big"))[0]
        return value * self.scale + self.offset


@dataclass(frozen=True)
class Block:
    """A contiguous run of addresses in one table, read or written with one request."""

    table: str
    address: int
    count: int
    entries: tuple[MapEntry, ...]


@dataclass(frozen=True)
class Heartbeat:
    """A holding register the PLC must keep changing; ``timeout_ms`` without a change trips fail-safe."""

    address: int
    timeout_ms: float


class RegisterMap:
    """A validated register map: every entry, indexed by signal and by table address.

    Build it with :meth:`from_config`. Validation names the offending entry in every error.
    """

    def __init__(self, entries: Sequence[MapEntry], heartbeat: Heartbeat | None, mode: str,
                 max_read: int = MAX_READ_REGISTERS):
        self.entries: tuple[MapEntry, ...] = tuple(entries)
        self.heartbeat = heartbeat
        self.mode = mode
        self.max_read = max_read
        self.by_signal = {e.signal: e for e in self.entries}
        self.inputs = tuple(e for e in self.entries if e.direction == "input")
        self.outputs = tuple(e for e in self.entries if e.direction == "output")

    @classmethod
    def from_config(cls, entries: Iterable[dict], *, inputs: Iterable[str], outputs: Iterable[str],
                    mode: str, heartbeat: dict | None = None,
                    max_read: int = MAX_READ_REGISTERS) -> "RegisterMap":
        """Validate the ``[[modbus.map]]`` list against the declared inputs and outputs.

        ``mode`` decides which tables a direction may use: in ``"server"`` mode the PLC
        writes inputs, so they must sit in writable tables (holding, coil); in ``"client"``
        mode we write outputs to the PLC, so outputs must sit in holding or coil. Raises
        ``ValueError`` naming the entry for unknown keys, bad types, overlaps, addresses out
        of range, and reads that would exceed ``max_read`` registers.
        """
        if mode not in ("server", "client"):
            raise ValueError(f"modbus.mode: {mode!r} is not 'server' or 'client'")
        if isinstance(max_read, bool) or not isinstance(max_read, int) or not 1 <= max_read <= MAX_READ_REGISTERS:
            raise ValueError(f"modbus.max_read: {max_read!r} must be an integer in 1..{MAX_READ_REGISTERS} "
                             f"(Modbus allows at most {MAX_READ_REGISTERS} registers per read)")
        input_set, output_set = set(inputs), set(outputs)
        if not isinstance(entries, (list, tuple)):
            raise ValueError("modbus.map: must be a list of tables ([[modbus.map]])")
        parsed: list[MapEntry] = []
        seen: dict[str, int] = {}
        for i, raw in enumerate(entries):
            entry = _parse_entry(i, raw, input_set, output_set, mode)
            if entry.signal in seen:
                raise ValueError(f"{entry.name()}: signal already mapped by modbus.map[{seen[entry.signal]}]")
            seen[entry.signal] = i
            parsed.append(entry)
        hb = _parse_heartbeat(heartbeat)
        _check_overlaps(parsed, hb)
        regmap = cls(parsed, hb, mode, max_read)
        for block in regmap.read_blocks(regmap.entries):
            if block.count > (MAX_READ_BITS if block.table in BIT_TABLES else max_read):
                # Only reachable when one entry alone exceeds max_read (a 32-bit value with max_read=1).
                raise ValueError(f"{block.entries[0].name()}: needs {block.count} registers in one read, "
                                 f"more than modbus.max_read = {max_read}")
        return regmap

    def read_blocks(self, entries: Iterable[MapEntry], include_heartbeat: bool = False) -> list[Block]:
        """Group entries into reads: contiguous addresses in one table, at most ``max_read``
        registers (2000 bits) each, never splitting a 32-bit value across two requests."""
        limit = {t: (MAX_READ_BITS if t in BIT_TABLES else self.max_read) for t in TABLES}
        items = list(entries)
        if include_heartbeat and self.heartbeat is not None:
            items.append(heartbeat_entry(self.heartbeat))
        return _group(items, limit)

    def write_blocks(self, entries: Iterable[MapEntry]) -> list[Block]:
        """Group entries into writes (at most 123 registers or 1968 coils per request)."""
        limit = {t: (MAX_WRITE_BITS if t in BIT_TABLES else MAX_WRITE_REGISTERS) for t in TABLES}
        return _group(list(entries), limit)


class RegisterImage:
    """A server's register image: the four tables as preallocated arrays, with an access level
    per address (:data:`UNMAPPED`, :data:`READABLE`: an output, :data:`WRITABLE`: an input or
    the heartbeat). Not thread-safe: the Modbus bridge calls it under its lock."""

    def __init__(self, regmap: RegisterMap):
        self.words = {"holding": array("H", bytes(2 * ADDRESS_SPACE)), "input": array("H", bytes(2 * ADDRESS_SPACE))}
        self.bits = {"coil": bytearray(ADDRESS_SPACE), "discrete": bytearray(ADDRESS_SPACE)}
        self.access = {t: bytearray(ADDRESS_SPACE) for t in TABLES}
        self.at: dict[str, dict[int, MapEntry]] = {t: {} for t in TABLES}
        entries = list(regmap.entries)
        if regmap.heartbeat is not None:
            entries.append(heartbeat_entry(regmap.heartbeat))
        for entry in entries:
            level = WRITABLE if entry.direction == "input" else READABLE
            for a in range(entry.address, entry.end):
                self.access[entry.table][a] = level
                self.at[entry.table][a] = entry

    def put(self, entry: MapEntry, value: float) -> bool:
        """Encode ``value`` into the entry's registers; returns True if it was clamped."""
        raw, clamped = entry.encode(value)
        if entry.is_bit:
            self.bits[entry.table][entry.address] = raw[0]
        else:
            self.words[entry.table][entry.address:entry.end] = array("H", raw)
        return clamped

    def decoded(self, table: str, address: int, count: int) -> list[tuple[MapEntry, float]]:
        """The entries overlapping ``address .. address+count-1`` (each once, in address order),
        each with its value decoded from the image as it is now."""
        at = self.at[table]
        regs = self.bits[table] if table in BIT_TABLES else self.words[table]
        found: list[tuple[MapEntry, float]] = []
        last = None
        for a in range(address, address + count):
            entry = at.get(a)
            if entry is not None and entry is not last:
                last = entry
                found.append((entry, entry.decode(regs[entry.address:entry.end])))
        return found


def heartbeat_entry(hb: Heartbeat) -> MapEntry:
    """The heartbeat as a uint16 holding-register entry (index -1), for reads and decoding."""
    return MapEntry(-1, "<heartbeat>", "holding", hb.address, "uint16", "big", 1.0, 0.0, "input")


def _group(items: list[MapEntry], limit: dict[str, int]) -> list[Block]:
    blocks: list[Block] = []
    items.sort(key=lambda e: (TABLES.index(e.table), e.address))
    current: list[MapEntry] = []
    for entry in items:
        if current:
            head = current[0]
            if (entry.table == head.table and entry.address == current[-1].end
                    and entry.end - head.address <= limit[entry.table]):
                current.append(entry)
                continue
            blocks.append(Block(head.table, head.address, current[-1].end - head.address, tuple(current)))
        current = [entry]
    if current:
        head = current[0]
        blocks.append(Block(head.table, head.address, current[-1].end - head.address, tuple(current)))
    return blocks


def _number(where: str, key: str, value, *, integer: bool = False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{where}: {key} = {value!r} is not {kind}")
    if not integer and not math.isfinite(value):
        raise ValueError(f"{where}: {key} = {value!r} is not finite")
    return value


def _parse_entry(i: int, raw, inputs: set, outputs: set, mode: str) -> MapEntry:
    where = f"modbus.map[{i}]"
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: must be a table with signal, table, address, type")
    signal = raw.get("signal")
    if not isinstance(signal, str) or not signal:
        raise ValueError(f"{where}: 'signal' is missing or not a non-empty string")
    where = f"{where} (signal {signal!r})"
    refuse_unknown_keys(raw, _ENTRY_KEYS, where)
    if signal in inputs and signal in outputs:
        raise ValueError(f"{where}: signal is declared both as an input and as an output")
    if signal in inputs:
        direction = "input"
    elif signal in outputs:
        direction = "output"
    else:
        raise ValueError(f"{where}: signal is not a declared input or output")
    table = raw.get("table")
    if table not in TABLES:
        raise ValueError(f"{where}: table = {table!r} is not one of {', '.join(TABLES)}")
    if mode == "server" and direction == "input" and table not in ("holding", "coil"):
        raise ValueError(f"{where}: in server mode the PLC writes inputs, so an input must be in a "
                         f"writable table (holding or coil), not {table!r}")
    if mode == "client" and direction == "output" and table not in ("holding", "coil"):
        raise ValueError(f"{where}: in client mode outputs are written to the PLC, so an output must be in "
                         f"holding or coil, not {table!r}")
    if "address" not in raw:
        raise ValueError(f"{where}: 'address' is missing")
    address = _number(where, "address", raw["address"], integer=True)
    if table in BIT_TABLES:
        for key in ("type", "word_order", "scale", "offset"):
            if key in raw:
                raise ValueError(f"{where}: {key!r} does not apply to a {table} (its value is 0 or 1)")
        typ, word_order, scale, offset = "bool", "big", 1.0, 0.0
    else:
        typ = raw.get("type")
        if not isinstance(typ, str) or typ not in TYPES:
            raise ValueError(f"{where}: type = {typ!r} is not one of {', '.join(TYPES)}")
        word_order = raw.get("word_order", "big")
        if word_order not in WORD_ORDERS:
            raise ValueError(f"{where}: word_order = {word_order!r} is not 'big' (ABCD) or 'little' (CDAB)")
        scale = float(_number(where, "scale", raw.get("scale", 1.0)))
        offset = float(_number(where, "offset", raw.get("offset", 0.0)))
        if scale == 0.0:
            raise ValueError(f"{where}: scale must not be 0")
    entry = MapEntry(i, signal, table, address, typ, word_order, scale, offset, direction)
    if not 0 <= address or entry.end > ADDRESS_SPACE:
        raise ValueError(f"{where}: address {address} (+{entry.width} {'bit' if entry.is_bit else 'register'}s) "
                         f"is outside 0..{ADDRESS_SPACE - 1}")
    return entry


def _parse_heartbeat(raw) -> Heartbeat | None:
    if raw is None:
        return None
    where = "modbus.heartbeat"
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: must be a table {{ address = N, timeout_ms = T }}")
    unknown = sorted(set(raw) - {"address", "timeout_ms"})
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: address, timeout_ms")
    for key in ("address", "timeout_ms"):
        if key not in raw:
            raise ValueError(f"{where}: {key!r} is missing")
    address = _number(where, "address", raw["address"], integer=True)
    if not 0 <= address < ADDRESS_SPACE:
        raise ValueError(f"{where}: address {address} is outside 0..{ADDRESS_SPACE - 1}")
    timeout_ms = float(_number(where, "timeout_ms", raw["timeout_ms"]))
    if not 0 < timeout_ms <= MAX_TIMEOUT_MS:
        raise ValueError(f"{where}: timeout_ms = {timeout_ms:g} must be > 0 and at most {MAX_TIMEOUT_MS} (a day)")
    return Heartbeat(address, timeout_ms)


def _check_overlaps(entries: list[MapEntry], hb: Heartbeat | None) -> None:
    items = list(entries) + ([heartbeat_entry(hb)] if hb is not None else [])
    items.sort(key=lambda e: (e.table, e.address))
    for prev, cur in zip(items, items[1:]):
        if prev.table == cur.table and cur.address < prev.end:
            first, second = sorted((prev, cur), key=lambda e: e.index)
            a = "modbus.heartbeat" if first.index < 0 else first.name()
            b = "modbus.heartbeat" if second.index < 0 else second.name()
            raise ValueError(f"{b}: {second.table} address {second.address} overlaps {a} "
                             f"({first.table} {first.address}..{first.end - 1})")
