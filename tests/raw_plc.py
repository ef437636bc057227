"""A PLC for tests that speaks Modbus TCP by hand (MBAP and PDUs packed with struct, no Modbus
library), so that it can answer anything a real, misbehaving PLC could: short or long answers,
another function code or transaction id, exception codes, garbage, a connection closed
mid-frame. Runs an asyncio server on 127.0.0.1 in a thread of its own."""
from __future__ import annotations

import asyncio
import ssl
import struct
import threading

HEADER = struct.Struct(">HHHB")


def correct_reply(regs: dict, pdu: bytes) -> bytes:
    """The right answer PDU to ``pdu`` over the register tables ``regs`` (writes applied)."""
    fc = pdu[0]
    if fc in (1, 2, 3, 4):
        address, count = struct.unpack_from(">HH", pdu, 1)
        table = regs[{1: "coil", 2: "discrete", 3: "holding", 4: "input"}[fc]]
        values = [table.get(address + i, 0) for i in range(count)]
        if fc <= 2:
            data = bytearray((count + 7) // 8)
            for i, v in enumerate(values):
                data[i // 8] |= (1 if v else 0) << (i % 8)
            return bytes((fc, len(data))) + bytes(data)
        return bytes((fc, 2 * count)) + struct.pack(f">{count}H", *values)
    if fc == 16:
        address, count, _ = struct.unpack_from(">HHB", pdu, 1)
        for i, v in enumerate(struct.unpack_from(f">{count}H", pdu, 6)):
            regs["holding"][address + i] = v
        return pdu[:5]
    if fc == 15:
        address, count, _ = struct.unpack_from(">HHB", pdu, 1)
        for i in range(count):
            regs["coil"][address + i] = (pdu[6 + i // 8] >> (i % 8)) & 1
        return pdu[:5]
    return bytes((fc | 0x80, 1))


class RawPLC:
    """``RawPLC(fault=None).start()``; ``fault(tid, unit, pdu, reply) -> bytes | None`` may
    replace the whole answer frame (``None``: close the connection, ``b""``: send nothing,
    ``(data, "close")``: send ``data`` then close);
    without it (or when it returns ``...``) the right frame goes out. ``regs`` holds the tables
    as ``{address: value}`` dicts; ``requests`` counts the requests by function code."""

    def __init__(self, fault=None, ssl_context: ssl.SSLContext | None = None):
        self.fault = fault
        self.ssl_context = ssl_context
        self.regs = {"coil": {}, "discrete": {}, "holding": {}, "input": {}}
        self.requests: dict[int, int] = {}
        self.port = 0
        self.connections = 0
        self._loop = None
        self._server = None
        self._thread = None

    async def _serve(self, reader, writer) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readexactly(7)
                tid, _pid, length, unit = HEADER.unpack(head)
                pdu = await reader.readexactly(length - 1)
                self.requests[pdu[0]] = self.requests.get(pdu[0], 0) + 1
                reply = correct_reply(self.regs, pdu)
                frame = HEADER.pack(tid, 0, len(reply) + 1, unit) + reply
                if self.fault is not None:
                    out = self.fault(tid, unit, pdu, reply)
                    if out is None:
                        return
                    if isinstance(out, tuple):
                        writer.write(out[0])
                        await writer.drain()
                        return
                    if out is not ...:
                        frame = out
                writer.write(frame)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def start(self) -> "RawPLC":
        started = threading.Event()

        async def main():
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, ssl=self.ssl_context)
            self.port = self._server.sockets[0].getsockname()[1]
            started.set()
            async with self._server:
                await self._server.serve_forever()

        def run():
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(main())
            except asyncio.CancelledError:
                pass
            finally:
                self._loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert started.wait(5)
        return self

    def stop(self) -> None:
        if self._thread is None:
            return

        def cancel():
            for task in asyncio.all_tasks(self._loop):
                task.cancel()
        self._loop.call_soon_threadsafe(cancel)
        self._thread.join(5)
        self._thread = None

    def __enter__(self) -> "RawPLC":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def reply_frame(tid: int, unit: int, pdu: bytes) -> bytes:
    """An MBAP frame around ``pdu``."""
    return HEADER.pack(tid, 0, len(pdu) + 1, unit) + pdu
