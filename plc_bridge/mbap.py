"""Modbus TCP on the wire: MBAP frames and the PDUs r1edge serves and sends.

Written from the Modbus application protocol specification V1.1b3 and the Modbus messaging on
TCP/IP implementation guide V1.0b; no protocol library is involved, so every byte a peer sends
is checked here and every refusal has a name.

- Server side: :func:`parse_request` turns a request PDU into a :class:`Request` or raises
  :class:`ModbusError` with the exception code to answer; :func:`read_reply`,
  :func:`write_reply` and :func:`exception_reply` build the answers.
- Client side: :func:`read_request`, :func:`write_request` build requests;
  :func:`parse_read_reply` and :func:`check_write_reply` check a PLC's answer against what was
  asked and raise :class:`BadReply` (``kind`` names what was wrong) or :class:`ModbusError`
  (the PLC answered with an exception); :class:`PlcConnection` carries them over one TCP (or
  TLS) connection with transaction ids and a timeout.
"""
from __future__ import annotations

import asyncio
import ssl
import struct
from dataclasses import dataclass

HEADER = struct.Struct(">HHHB")          # transaction id, protocol id (0), length, unit id
HEADER_SIZE = 7
MAX_LENGTH = 254                         # MBAP length field: unit id + PDU of at most 253 bytes
READ_BITS, READ_DISCRETE, READ_HOLDING, READ_INPUT = 1, 2, 3, 4
WRITE_COIL, WRITE_REGISTER, WRITE_COILS, WRITE_REGISTERS, MASK_WRITE, READ_WRITE = 5, 6, 15, 16, 22, 23
#: function code -> the table it addresses
FC_TABLE = {1: "coil", 5: "coil", 15: "coil", 2: "discrete", 4: "input",
            3: "holding", 6: "holding", 16: "holding", 22: "holding", 23: "holding"}
WRITE_FCS = frozenset((5, 6, 15, 16, 22, 23))
ILLEGAL_FUNCTION, ILLEGAL_ADDRESS, ILLEGAL_VALUE, DEVICE_FAILURE, GATEWAY_NO_RESPONSE = 1, 2, 3, 4, 0x0B
EXCEPTION_NAMES = {1: "illegal_function", 2: "illegal_address", 3: "illegal_value",
                   4: "device_failure", 0x0B: "unknown_unit"}
_U16 = struct.Struct(">H")
_ADDR_QTY = struct.Struct(">HH")


class ModbusError(Exception):
    """A Modbus exception code: to answer (server) or answered by the PLC (client)."""

    def __init__(self, code: int):
        super().__init__(EXCEPTION_NAMES.get(code, f"exception_{code}"))
        self.code = code

    @property
    def kind(self) -> str:
        """The code's name, as counted (``illegal_address``, ``exception_9``, ...)."""
        return self.args[0]


class BadReply(Exception):
    """A PLC's answer that does not fit the request; ``kind`` names the fault (``short_response``,
    ``long_response``, ``wrong_function``, ``bad_byte_count``, ``wrong_echo``, ``bad_frame``,
    ``wrong_unit``). ``resync``: the byte stream can no longer be trusted (close the connection)."""

    def __init__(self, kind: str, detail: str, resync: bool = False):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.resync = resync


@dataclass(frozen=True)
class Request:
    """A decoded request: ``reads`` is ``(address, count)`` or None; ``write`` is ``(address,
    values)`` (registers as ints, coils as 0/1) or None; for function 22 ``masks`` is ``(and,
    or)`` and ``write`` addresses the one register."""

    fc: int
    table: str
    read: tuple[int, int] | None
    write: tuple[int, list[int]] | None
    masks: tuple[int, int] | None = None


def frame(tid: int, unit: int, pdu: bytes) -> bytes:
    """One MBAP frame around ``pdu``."""
    return HEADER.pack(tid, 0, len(pdu) + 1, unit) + pdu


def check_header(data: bytes | memoryview, at: int = 0) -> tuple[int, int, int]:
    """``(tid, total frame size, unit)`` of the header at ``data[at:at+7]``; ``BadReply``
    (``bad_frame``, resync) when the protocol id is not 0 or the length is outside 2..254."""
    tid, pid, length, unit = HEADER.unpack_from(data, at)
    if pid != 0 or not 2 <= length <= MAX_LENGTH:
        raise BadReply("bad_frame", f"MBAP protocol id {pid}, length {length}", resync=True)
    return tid, 6 + length, unit


def _bits_to_bytes(bits: list[int]) -> bytes:
    out = bytearray((len(bits) + 7) // 8)
    for i, b in enumerate(bits):
        if b:
            out[i >> 3] |= 1 << (i & 7)
    return bytes(out)


def _bytes_to_bits(data: bytes, count: int) -> list[int]:
    return [(data[i >> 3] >> (i & 7)) & 1 for i in range(count)]


# ---------------------------------------------------------------------------------------- server
def parse_request(pdu: bytes) -> Request:
    """Decode a request PDU of a served function; ``ModbusError`` with the code to answer:
    01 for a function not served, 03 for a quantity outside the function's limits or a body
    whose length or byte count does not match (section 7 of the specification)."""
    fc = pdu[0]
    table = FC_TABLE.get(fc)
    if table is None:
        raise ModbusError(ILLEGAL_FUNCTION)
    n = len(pdu)
    if fc in (1, 2, 3, 4):
        if n != 5:
            raise ModbusError(ILLEGAL_VALUE)
        address, count = _ADDR_QTY.unpack_from(pdu, 1)
        if not 1 <= count <= (2000 if fc <= 2 else 125):
            raise ModbusError(ILLEGAL_VALUE)
        return Request(fc, table, (address, count), None)
    if fc in (5, 6):
        if n != 5:
            raise ModbusError(ILLEGAL_VALUE)
        address, value = _ADDR_QTY.unpack_from(pdu, 1)
        if fc == 5:
            if value not in (0xFF00, 0x0000):
                raise ModbusError(ILLEGAL_VALUE)         # a coil is written with FF00 or 0000 only
            value = 1 if value else 0
        return Request(fc, table, None, (address, [value]))
    if fc in (15, 16):
        if n < 6:
            raise ModbusError(ILLEGAL_VALUE)
        address, count = _ADDR_QTY.unpack_from(pdu, 1)
        nbytes = pdu[5]
        want = (count + 7) // 8 if fc == 15 else 2 * count
        if not 1 <= count <= (1968 if fc == 15 else 123) or nbytes != want or n != 6 + nbytes:
            raise ModbusError(ILLEGAL_VALUE)
        body = pdu[6:]
        values = _bytes_to_bits(body, count) if fc == 15 else list(struct.unpack(f">{count}H", body))
        return Request(fc, table, None, (address, values))
    if fc == 22:
        if n != 7:
            raise ModbusError(ILLEGAL_VALUE)
        address, and_mask, or_mask = struct.unpack_from(">HHH", pdu, 1)
        return Request(fc, table, None, (address, [0]), (and_mask, or_mask))
    # 23: read/write multiple registers; the write happens before the read.
    if n < 10:
        raise ModbusError(ILLEGAL_VALUE)
    raddr, rcount, waddr, wcount, nbytes = struct.unpack_from(">HHHHB", pdu, 1)
    if not 1 <= rcount <= 125 or not 1 <= wcount <= 121 or nbytes != 2 * wcount or n != 10 + nbytes:
        raise ModbusError(ILLEGAL_VALUE)
    return Request(fc, table, (raddr, rcount), (waddr, list(struct.unpack(f">{wcount}H", pdu[10:]))))


def read_reply(fc: int, values: list[int]) -> bytes:
    """The answer PDU to a read (functions 1-4, 23) of ``values``."""
    if fc in (1, 2):
        data = _bits_to_bytes(values)
    else:
        data = struct.pack(f">{len(values)}H", *values)
    return bytes((fc, len(data))) + data


def write_reply(pdu: bytes) -> bytes:
    """The answer PDU to a successful write (functions 5, 6, 15, 16, 22): the request's echo
    (5, 6, 22) or its address and quantity (15, 16)."""
    return pdu[:5] if pdu[0] in (15, 16) else pdu


def exception_reply(fc: int, code: int) -> bytes:
    """The exception answer PDU."""
    return bytes(((fc & 0x7F) | 0x80, code))


# ---------------------------------------------------------------------------------------- client
def read_request(fc: int, address: int, count: int) -> bytes:
    """A read request PDU (functions 1-4)."""
    return bytes((fc,)) + _ADDR_QTY.pack(address, count)


def write_request(table: str, address: int, values: list[int]) -> bytes:
    """A write request PDU: function 15 for coils, 16 for registers."""
    if table == "coil":
        data = _bits_to_bytes(values)
        return bytes((WRITE_COILS,)) + _ADDR_QTY.pack(address, len(values)) + bytes((len(data),)) + data
    return (bytes((WRITE_REGISTERS,)) + _ADDR_QTY.pack(address, len(values)) + bytes((2 * len(values),))
            + struct.pack(f">{len(values)}H", *values))


def _check_function(fc: int, reply: bytes) -> None:
    if not reply:
        raise BadReply("short_response", "empty PDU")
    if reply[0] == (fc | 0x80):
        if len(reply) != 2:
            raise BadReply("bad_exception", f"exception answer of {len(reply)} bytes")
        raise ModbusError(reply[1])
    if reply[0] != fc:
        raise BadReply("wrong_function", f"asked function {fc}, got {reply[0]}")


def parse_read_reply(fc: int, count: int, reply: bytes) -> list[int]:
    """The ``count`` registers (or bits, as 0/1) of a PLC's answer to a read of function ``fc``;
    ``BadReply`` when it holds fewer or more than asked or is inconsistent, ``ModbusError``
    for an exception answer."""
    _check_function(fc, reply)
    if len(reply) < 2:
        raise BadReply("short_response", "no byte count")
    nbytes = reply[1]
    if len(reply) != 2 + nbytes:
        raise BadReply("bad_byte_count", f"byte count {nbytes} with {len(reply) - 2} data bytes")
    want = (count + 7) // 8 if fc in (1, 2) else 2 * count
    if nbytes != want:
        kind = "short_response" if nbytes < want else "long_response"
        raise BadReply(kind, f"{nbytes} data bytes for {count} {'bits' if fc in (1, 2) else 'registers'}")
    if fc in (1, 2):
        return _bytes_to_bits(reply[2:], count)
    return list(struct.unpack(f">{count}H", reply[2:]))


def check_write_reply(request: bytes, reply: bytes) -> None:
    """Check a PLC's answer to a function 15/16 ``request``: the same address and quantity."""
    _check_function(request[0], reply)
    if len(reply) != 5:
        raise BadReply("short_response" if len(reply) < 5 else "long_response", f"{len(reply)}-byte write answer")
    if reply[1:5] != request[1:5]:
        raise BadReply("wrong_echo", "the answer names another address or quantity")


class PlcConnection:
    """One client connection to a PLC: requests one at a time, each matched to its answer by
    transaction id, within ``timeout_s``.

    ``request`` raises ``asyncio.TimeoutError`` when no matching answer came in time,
    ``ConnectionError`` when the PLC closed the connection (mid-frame included),
    ``BadReply`` for a frame that cannot be parsed (``resync``: close and reconnect) and
    ``ModbusError``/``BadReply`` from the checks above. An answer with another transaction id
    (a late answer to an earlier request, or a confused PLC) is counted through ``on_stray``
    and skipped.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, unit: int,
                 timeout_s: float, on_stray=None):
        self.reader, self.writer = reader, writer
        self.unit = unit
        self.timeout_s = timeout_s
        self.on_stray = on_stray
        self._tid = 0

    @classmethod
    async def open(cls, host: str, port: int, unit: int, timeout_s: float,
                   ssl_context: ssl.SSLContext | None = None, on_stray=None) -> "PlcConnection":
        """Connect (and with ``ssl_context``, complete the TLS handshake) within ``timeout_s``."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ssl_context, limit=1 << 16), timeout_s)
        return cls(reader, writer, unit, timeout_s, on_stray)

    async def request(self, pdu: bytes) -> bytes:
        """Send ``pdu``; the answer's PDU (see the class docstring for the failures)."""
        self._tid = (self._tid + 1) & 0xFFFF
        tid = self._tid
        self.writer.write(frame(tid, self.unit, pdu))
        return await asyncio.wait_for(self._answer(tid), self.timeout_s)

    async def _answer(self, tid: int) -> bytes:
        while True:
            try:
                head = await self.reader.readexactly(HEADER_SIZE)
                rtid, size, unit = check_header(head)
                body = await self.reader.readexactly(size - HEADER_SIZE)
            except asyncio.IncompleteReadError as exc:
                raise ConnectionError(f"PLC closed the connection ({len(exc.partial)} bytes into a frame)") from None
            if rtid != tid:
                if self.on_stray is not None:
                    self.on_stray()
                continue
            if unit != self.unit:
                raise BadReply("wrong_unit", f"answer from unit {unit}, asked {self.unit}")
            return body

    def close(self) -> None:
        """Close the connection (no wait)."""
        self.writer.close()
