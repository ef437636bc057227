"""Modbus TCP bridge on pymodbus 3.16 asyncio: server mode (the PLC writes inputs and reads
outputs) and client mode (we poll the PLC and write outputs back).

The bridge serves one stream (``[modbus] stream``, default "main") and runs its own asyncio
loop in a background thread. The controller's cycle talks to it only through the
:class:`~plc_bridge.bridge.Bridge` methods, which take a lock for microseconds and never touch
the network.

Server mode serves a register image built from the map, with these rules (Modbus
application protocol V1.1b3, section 7):

- only function codes 1, 2, 3, 4, 5, 6, 15, 16, 22 and 23 are served; any other gets
  exception 01 (ILLEGAL FUNCTION);
- a quantity outside the limits of the function (e.g. a read of 0 or more than 125
  registers) gets 03 (ILLEGAL DATA VALUE);
- a read touching any address that is not in the map gets 02 (ILLEGAL DATA ADDRESS);
- a write touching an output, or any address not in the map, gets 02: an output is a valid
  address for reading only, and 02 is the code the protocol defines for "address not
  allowable" (pymodbus' own read-only registers answer the same way);
- a request for another unit id than ``device_id`` (0 and 255, the Modbus/TCP "unit not
  used" values, are accepted too) gets 0B (GATEWAY TARGET DEVICE FAILED TO RESPOND);
- a frame with a bad MBAP header (protocol id not 0, length outside 2..254) cannot be
  re-synchronised on a TCP stream: it is counted and that connection is closed;
- peers outside ``allow`` (addresses or networks) are counted and disconnected at once.

pymodbus handles the sockets, the framing and the PDU codecs; the request loop here replaces
its per-connection handler so that each complete frame in the buffer is answered in order,
and its datastore with the register image above.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import struct
import threading
import time
from array import array
from typing import Callable

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ModbusException
from pymodbus.pdu import ExceptionResponse
from pymodbus.server import ModbusTcpServer
from pymodbus.server.requesthandler import ServerRequestHandler
from pymodbus.simulator import SimData, SimDevice

from .bridge import DecisionImage, InputImage, Inputs, LoopThread, register
from .messages import MAX_NAME_LEN
from .metrics import Counters, LatencyRing, worth_logging
from .registers import ADDRESS_SPACE, BIT_TABLES, NO_ACCESS, READ_ONLY, READ_WRITE, RegisterImage, RegisterMap

log = logging.getLogger(__name__)

#: function code -> table it addresses
FC_TABLE = {1: "coil", 5: "coil", 15: "coil", 2: "discrete", 4: "input",
            3: "holding", 6: "holding", 16: "holding", 22: "holding", 23: "holding"}
EXCEPTION_NAMES = {1: "illegal_function", 2: "illegal_address", 3: "illegal_value",
                   4: "device_failure", 0x0B: "unknown_unit"}
_MBAP = struct.Struct(">HHHB")
_MODBUS_KEYS = frozenset((
    "mode", "stream", "host", "port", "device_id", "heartbeat", "map", "allow", "max_clients", "poll_ms",
    "request_timeout_ms", "reconnect_min_ms", "reconnect_max_ms", "max_read", "stop_linger_ms"))

InputCallback = Callable[[dict], None]


class ModbusBridge(LoopThread):
    """Modbus TCP I/O for one PLC, in server or client mode, in a background thread.

    A :class:`~plc_bridge.bridge.Bridge` serving exactly one stream (``stream``, default
    "main"): the PLC's input registers are that stream's inputs, and its output registers
    carry that stream's decision only.

    Build it with :meth:`from_config`; ``start()``/``stop()`` or use it as a context manager.
    Inputs land in ``image`` (one row over ``columns``) and come out of :meth:`read` or
    :meth:`snapshot` (and the optional ``on_input`` callback, called in the I/O thread with
    ``{name: (value, rx_ns)}`` of the signals just received, after the PLC's request has been
    answered; it must be quick); outputs go in through :meth:`write` or :meth:`publish`.

    Start: server mode serves every output register at its fail-safe value until the first
    :meth:`publish`; client mode writes nothing to the PLC before the first publish it
    accepts, so the plant keeps its own outputs until the controller has decided (a bumpless
    start: the controller's first outputs may track the actuators).

    Fail-safe: with a heartbeat configured, when the PLC's heartbeat register has not changed
    for ``timeout_ms`` (or has not moved yet) the bridge ignores :meth:`publish`; once it had
    published, it writes every output's fail-safe value itself (server mode: into the served
    registers; client mode: to the PLC, again after each reconnection) until the heartbeat
    changes again; the next publish after that writes the controller's outputs.
    :meth:`failsafe_state` tells the controller, so that its rate limits start from what the
    plant got (and :meth:`read` marks the stream's row ``failsafe`` in the image).

    Stop: what was published last reaches the PLC before the connection closes. Client mode
    writes the outputs once more (when connected, within ``request_timeout_ms``); server mode
    keeps answering, while a PLC is connected, until it has read an output register once
    more or ``stop_linger_ms`` has passed. The controller publishes its on-stop outputs (the
    fail-safe values unless ``on_stop = "hold"``) just before stopping the bridge.
    """

    name = "modbus"

    def __init__(self, regmap: RegisterMap, failsafe: dict[str, float], *, mode: str, host: str,
                 port: int, stream: str = "main", device_id: int = 1, allow: list | None = None,
                 max_clients: int = 8, poll_ms: float = 10.0, request_timeout_ms: float = 200.0,
                 reconnect_min_ms: float = 100.0, reconnect_max_ms: float = 5000.0,
                 stop_linger_ms: float = 200.0, on_input: InputCallback | None = None,
                 columns: list[str] | None = None):
        self.regmap = regmap
        self.mode = mode
        self.stream = stream
        self.host = host
        self.port = port
        self.device_id = device_id
        self.units = frozenset((device_id, 0, 255))
        self.allow = allow
        self.max_clients = max_clients
        self.poll_s = poll_ms / 1e3
        self.request_timeout_s = request_timeout_ms / 1e3
        self.reconnect_min_s = reconnect_min_ms / 1e3
        self.reconnect_max_s = reconnect_max_ms / 1e3
        self.stop_linger_s = stop_linger_ms / 1e3
        self.on_input = on_input
        self._output_reads = 0      # server mode: read requests that covered an output register
        self.failsafe = {e.signal: float(failsafe[e.signal]) for e in regmap.outputs}
        self.hb_timeout_ns = int(regmap.heartbeat.timeout_ms * 1e6) if regmap.heartbeat else 0

        self.bad = Counters()       # traffic we refused, by reason
        self.errors = Counters()    # our own I/O trouble, by reason
        self.io = LatencyRing()
        self.lock = threading.Lock()
        self.image = InputImage(columns if columns is not None else [e.signal for e in regmap.inputs], 1, self.lock)
        self.image.row(stream)
        # Server mode: the heartbeat register starts at 0 in our image. Client mode: the first
        # read only sets the baseline; only a change proves the PLC is alive.
        self._hb_value: int | None = 0 if mode == "server" else None
        self._hb_change_ns: int | None = None
        self._failsafe_active = regmap.heartbeat is not None
        self._failsafe_entries = 0
        self._published = False     # client mode writes nothing before the first accepted publish
        self._out_values = dict(self.failsafe)
        self._reconnects = 0
        self._backoff_s = 0.0
        self._clients = 0
        self._connected = False
        self._init_thread()
        self._image = RegisterImage(regmap) if mode == "server" else None
        if self._image is not None:
            for entry in regmap.outputs:
                self._image.put(entry, self.failsafe[entry.signal])

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, modbus: dict, inputs: list[str], outputs: dict[str, float], *,
                    on_input: InputCallback | None = None) -> "ModbusBridge":
        """Build from the deployment TOML's ``[modbus]`` table (with ``map``), the input
        names and ``{output name: failsafe value}``.

        ``stream`` names the one stream this bridge serves (default "main").
        Optional keys besides the design's: ``allow`` (server: list of client addresses or
        networks), ``max_clients`` (server, default 8), ``poll_ms`` (client, default 10),
        ``request_timeout_ms`` (client, 200), ``reconnect_min_ms``/``reconnect_max_ms``
        (client backoff, 100/5000), ``max_read`` (registers per read, 125), ``stop_linger_ms``
        (server: how long a stop waits for a connected PLC to read the outputs once more, 200). ``port = 0``
        binds an ephemeral port (see :attr:`port` after ``start()``).
        Raises ``ValueError`` naming the offending key or map entry.
        """
        if not isinstance(modbus, dict):
            raise ValueError("modbus: must be a table")
        unknown = sorted(set(modbus) - _MODBUS_KEYS)
        if unknown:
            raise ValueError(f"modbus: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_MODBUS_KEYS))}")
        mode = modbus.get("mode")
        if mode not in ("server", "client"):
            raise ValueError(f"modbus.mode: {mode!r} is not 'server' or 'client'")
        stream = modbus.get("stream", "main")
        if not isinstance(stream, str) or not 0 < len(stream) <= MAX_NAME_LEN:
            raise ValueError(f"modbus.stream: {stream!r} is not a stream name "
                             f"(a string of 1..{MAX_NAME_LEN} characters)")
        host = modbus.get("host", "127.0.0.1")
        if not isinstance(host, str) or not host:
            raise ValueError(f"modbus.host: {host!r} is not a host name or address")
        port = _int_key(modbus, "port", 502, 0 if mode == "server" else 1, 65535)
        device_id = _int_key(modbus, "device_id", 1, 0, 255)
        max_clients = _int_key(modbus, "max_clients", 8, 1, 1024)
        max_read = _int_key(modbus, "max_read", 125, 1, 125)
        times = {k: _ms_key(modbus, k, d) for k, d in (("poll_ms", 10.0), ("request_timeout_ms", 200.0),
                                                       ("reconnect_min_ms", 100.0), ("reconnect_max_ms", 5000.0),
                                                       ("stop_linger_ms", 200.0))}
        if times["reconnect_min_ms"] > times["reconnect_max_ms"]:
            raise ValueError("modbus.reconnect_min_ms: must not exceed modbus.reconnect_max_ms")
        allow = None
        if "allow" in modbus:
            if mode != "server":
                raise ValueError("modbus.allow: only applies to server mode")
            allow = _parse_allow(modbus["allow"])
        if not isinstance(outputs, dict):
            raise ValueError("outputs: must map each output name to its failsafe value")
        for name, value in outputs.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"outputs[{name!r}]: failsafe = {value!r} is not a finite number")
        if "map" not in modbus:
            raise ValueError("modbus.map: missing; add [[modbus.map]] entries")
        regmap = RegisterMap.from_config(modbus["map"], inputs=inputs, outputs=list(outputs), mode=mode,
                                         heartbeat=modbus.get("heartbeat"), max_read=max_read)
        if not regmap.entries:
            raise ValueError("modbus.map: no entries")
        for entry in regmap.outputs:
            try:
                entry.encode(float(outputs[entry.signal]))
            except ValueError as exc:
                raise ValueError(f"{entry.name()}: failsafe value cannot be encoded: {exc}") from None
        return cls(regmap, {k: float(v) for k, v in outputs.items()}, mode=mode, host=host, port=port,
                   stream=stream, device_id=device_id, allow=allow, max_clients=max_clients,
                   on_input=on_input, columns=list(inputs), **times)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "ModbusBridge":
        """Start the I/O thread; returns once the server listens (server mode) or the poller
        runs (client mode; the PLC may still be unreachable). Raises ``RuntimeError`` if the
        server cannot bind."""
        return self._start_thread(f"modbus-{self.mode}")

    def stop(self) -> None:
        """Deliver the last published outputs (see the class docstring), stop the I/O thread,
        close every connection and join. Idempotent."""
        super().stop()

    def _label(self) -> str:
        return f"modbus {self.mode} {self.host}:{self.port}"

    # ------------------------------------------------------------------ controller side
    def serves(self, stream: str) -> bool:
        """True for this bridge's one stream only."""
        return stream == self.stream

    def input_streams(self) -> list[str]:
        """This bridge's stream, whether or not the PLC has written an input yet (so that a
        silent PLC shows as missing inputs)."""
        return [self.stream]

    def bound_streams(self) -> list[str]:
        """This bridge's one stream (``[modbus] stream``)."""
        return [self.stream]

    def read(self) -> InputImage:
        """The cycle's one read (``failsafe``: the heartbeat is stale; see :meth:`failsafe_state`)."""
        img = self.image
        img.take()
        now = time.monotonic_ns()
        with self.lock:
            img.failsafe[0] = not self._heartbeat_ok(now)
            img.failsafe_entries[0] = self._failsafe_entries
        img.running = self._io_running()
        return img

    def write(self, decisions: DecisionImage) -> None:
        """The cycle's one write: this bridge's stream's row, as :meth:`publish` takes it."""
        i = decisions.row_of(self.stream)
        if i is not None:
            self._set_outputs(decisions.given(i))

    def snapshot(self, stream: str | None = None) -> Inputs:
        """``{input name: (value, rx time.monotonic_ns())}`` for every input received so far
        (``stream``: this bridge's, the default; ``{}`` for any other). Never blocks on the network."""
        if stream is not None and stream != self.stream:
            return {}
        with self.lock:
            return self.image.received(0)

    def publish(self, outputs: dict[str, float], status: str = "ok", seq: int = 0,
                latency_us: float = 0.0, stream: str | None = None) -> None:
        """Hand the controller's outputs of this bridge's stream over without blocking
        (``stream`` None: this bridge's; another stream raises ``ValueError``).

        Mapped outputs are encoded into their registers (server mode) or queued for the
        I/O thread to write to the PLC (client mode). Names that are not mapped outputs are
        ignored (they may go out over ZeroMQ only). A non-finite value is replaced by that
        output's fail-safe value and counted (``nonfinite_output``), whatever the register
        type: a PLC should never receive NaN. While the heartbeat is stale nothing is written
        but the fail-safe values.
        ``status``, ``seq`` and ``latency_us`` are accepted for symmetry with the ZeroMQ
        bridge; Modbus carries only the values.
        """
        if stream is not None and stream != self.stream:
            raise ValueError(f"modbus bridge serves stream {self.stream!r}, not {stream!r}")
        self._set_outputs(outputs.items())

    def _set_outputs(self, outputs) -> None:
        """``(name, value)`` pairs of the controller's outputs into the registers or the
        client's write queue (see :meth:`publish`)."""
        now = time.monotonic_ns()
        with self.lock:
            if not self._heartbeat_ok(now):
                if not self._failsafe_active:
                    self._enter_failsafe_locked("heartbeat stale at publish")
                return
            self._failsafe_active = False
            self._published = True
            for name, value in outputs:
                entry = self.regmap.by_signal.get(name)
                if entry is None or entry.direction != "output":
                    continue
                value = float(value)
                if not math.isfinite(value):
                    self.errors.inc("nonfinite_output")
                    value = self.failsafe[name]
                self._out_values[name] = value
                if self._image is not None:
                    if self._image.put(entry, value):
                        self.errors.inc("clamped_output")
        if self.mode == "client":
            self._wakeup()

    def failsafe_state(self, stream: str | None = None) -> tuple[bool, int]:
        """``(overriding, entries)``: whether the heartbeat is stale now (a publish would be
        ignored), and how many times the bridge has switched to its fail-safe values."""
        now = time.monotonic_ns()
        with self.lock:
            return not self._heartbeat_ok(now), self._failsafe_entries

    def health(self) -> dict:
        """Connection, heartbeat and fail-safe state, bad traffic by reason, errors, reconnects
        (client: the current backoff delay too, 0 while connected), and the bridge's own I/O
        time in microseconds (server: per request; client: per poll of every block)."""
        now = time.monotonic_ns()
        with self.lock:
            hb_ok = self._heartbeat_ok(now)
            failsafe = self._failsafe_active
            hb_age = None if self._hb_change_ns is None else (now - self._hb_change_ns) / 1e6
        connected = self._clients > 0 if self.mode == "server" else self._connected
        return {
            "mode": self.mode,
            "address": [self.host, self.port],
            "running": self._io_running(),
            "connected": connected,
            "clients": self._clients if self.mode == "server" else int(self._connected),
            "heartbeat_ok": hb_ok,
            "heartbeat_age_ms": hb_age,
            "failsafe": failsafe,
            "reconnects": self._reconnects,
            "reconnect_delay_ms": self._backoff_s * 1e3 if self.mode == "client" else None,
            "bad": self.bad.snapshot(),
            "errors": self.errors.snapshot(),
            "io_us": self.io.percentiles(),
        }

    # ------------------------------------------------------------------ shared internals
    def _heartbeat_ok(self, now: int) -> bool:
        if self.regmap.heartbeat is None:
            return True
        return self._hb_change_ns is not None and now - self._hb_change_ns <= self.hb_timeout_ns

    def _enter_failsafe_locked(self, why: str) -> None:
        self._failsafe_active = True
        self._failsafe_entries += 1
        self.errors.inc("failsafe_entries")
        self._out_values.update(self.failsafe)
        if self._image is not None:
            for entry in self.regmap.outputs:
                self._image.put(entry, self.failsafe[entry.signal])
        log.warning("modbus %s: outputs set to fail-safe (%s)", self.mode, why)

    def _record_inputs(self, updates: dict[str, tuple[float, int]]) -> None:
        """Called by the I/O thread outside the lock, after the image was updated."""
        if self.on_input is not None and updates:
            try:
                self.on_input(updates)
            except Exception:  # a faulty callback must not stop the I/O loop
                self.errors.inc("callback_error")
                log.exception("modbus on_input callback failed")

    def _note_heartbeat_locked(self, value: int, now: int) -> None:
        if self._hb_value is not None and value != self._hb_value:
            self._hb_change_ns = now
        self._hb_value = value

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        if self.mode == "server":
            server = _Server(self, (self.host, self.port))
            await server.serve_forever(background=True)
            self.port = server.transport.sockets[0].getsockname()[1]
            tasks = []
            log.info("modbus server listening on %s:%d (unit %d)", self.host, self.port, self.device_id)
        else:
            server = None
            tasks = [asyncio.create_task(self._client_loop())]
        if self.regmap.heartbeat is not None:
            tasks.append(asyncio.create_task(self._watchdog()))
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            if server is None:
                # The client loop writes the outputs once more and returns (bounded wait).
                await asyncio.wait(tasks[:1], timeout=2 * self.request_timeout_s + self.poll_s)
            elif self._clients:
                reads = self._output_reads
                deadline = time.monotonic() + self.stop_linger_s
                while self._clients and self._output_reads == reads and time.monotonic() < deadline:
                    await asyncio.sleep(0.002)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if server is not None:
                await server.shutdown()

    async def _watchdog(self) -> None:
        """Trips fail-safe when the heartbeat stops, even if nobody publishes (client mode: also
        while the PLC is unreachable; the fail-safe values are written once it answers)."""
        idle_s = min(self.hb_timeout_ns / 4e9, 0.02)
        while not self._stop.is_set():
            now = time.monotonic_ns()
            with self.lock:
                ok = self._heartbeat_ok(now)
                if not ok and not self._failsafe_active:
                    self._enter_failsafe_locked("heartbeat stopped")
                last = self._hb_change_ns
            if ok and last is not None:
                await asyncio.sleep(max((last + self.hb_timeout_ns - now) / 1e9, 0.0) + 1e-4)
            else:
                await asyncio.sleep(idle_s)

    # ------------------------------------------------------------------ server mode
    def _client_allowed(self, host: str | None) -> bool:
        if self.allow is None:
            return True
        try:
            addr = ipaddress.ip_address(host.split("%")[0]) if host else None
        except ValueError:
            return False
        if addr is None:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.allow)

    def _written(self, table: str, address: int, count: int) -> dict[str, tuple[float, int]]:
        """Server mode, lock held: the PLC wrote ``count`` values at ``address``."""
        now = time.monotonic_ns()
        image = self._image
        updates = {}
        for entry in image.entries_in(table, address, count):
            if entry.index < 0:
                self._note_heartbeat_locked(image.words["holding"][entry.address], now)
            elif entry.direction == "input":
                value = image.get(entry)
                self.image.put_named(0, entry.signal, value, now)
                updates[entry.signal] = (value, now)
        return updates

    # ------------------------------------------------------------------ client mode
    async def _client_loop(self) -> None:
        delay = self.reconnect_min_s
        ever_connected = False
        # Loops test the stop flag as well as being cancelled: on Python 3.11,
        # asyncio.wait_for can swallow a cancellation that races with its own wake-up.
        while not self._stop.is_set():
            client = AsyncModbusTcpClient(self.host, port=self.port, timeout=self.request_timeout_s,
                                          retries=0, reconnect_delay=0, name="r1edge-plc")
            try:
                ok = await client.connect()
            except (OSError, ModbusException) as exc:
                log.debug("modbus client connect error: %s", exc)
                ok = False
            if not ok:
                client.close()
                self.errors.inc("connect_failures")
                self._backoff_s = delay
                await asyncio.sleep(delay)
                delay = min(delay * 2.0, self.reconnect_max_s)
                continue
            if ever_connected:
                self._reconnects += 1
            ever_connected = True
            delay = self.reconnect_min_s
            self._backoff_s = 0.0
            self._connected = True
            log.info("modbus client connected to %s:%d", self.host, self.port)
            try:
                await self._poll_connected(client)
            except (ModbusException, OSError, asyncio.TimeoutError) as exc:
                self.errors.inc("io_errors")
                log.warning("modbus client lost %s:%d: %s", self.host, self.port, exc)
            finally:
                self._connected = False
                client.close()
            await asyncio.sleep(self.reconnect_min_s)

    async def _poll_connected(self, client: AsyncModbusTcpClient) -> None:
        regmap = self.regmap
        reads = regmap.read_blocks(regmap.inputs, include_heartbeat=True)
        writes = regmap.write_blocks(regmap.outputs)
        read_fn = {"holding": client.read_holding_registers, "input": client.read_input_registers,
                   "coil": client.read_coils, "discrete": client.read_discrete_inputs}
        dirty = True  # write the current outputs as soon as we (re)connect (once there are any)
        next_poll = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_poll:
                t0 = time.perf_counter_ns()
                updates = {}
                for block in reads:
                    rr = await read_fn[block.table](block.address, count=block.count, device_id=self.device_id)
                    if rr.isError():
                        self.errors.inc(f"plc_{EXCEPTION_NAMES.get(rr.exception_code, f'exception_{rr.exception_code}')}")
                        continue
                    raw = rr.bits if block.table in BIT_TABLES else rr.registers
                    rx = time.monotonic_ns()
                    with self.lock:
                        for entry in block.entries:
                            off = entry.address - block.address
                            if entry.index < 0:
                                self._note_heartbeat_locked(raw[off], rx)
                                continue
                            value = entry.decode(raw[off:off + entry.width])
                            self.image.put_named(0, entry.signal, value, rx)
                            updates[entry.signal] = (value, rx)
                self.io.add(time.perf_counter_ns() - t0)
                self._record_inputs(updates)
                with self.lock:
                    if not self._heartbeat_ok(time.monotonic_ns()):
                        if not self._failsafe_active:
                            self._enter_failsafe_locked("heartbeat stopped")
                        dirty = True  # keep asserting fail-safe while the heartbeat is stale
                next_poll += self.poll_s
                if next_poll < now:
                    next_poll = now + self.poll_s
            if self._wake.is_set():
                self._wake.clear()
                dirty = True
            if dirty and writes and self._published:    # nothing before the first accepted publish
                await self._write_outputs(client, writes)
                dirty = False
            timeout = next_poll - time.monotonic()
            if timeout > 0 and not self._wake.is_set():
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
        if writes and self._published:  # a clean stop: the last published outputs reach the PLC
            await self._write_outputs(client, writes)

    async def _write_outputs(self, client: AsyncModbusTcpClient, writes) -> None:
        with self.lock:
            values = dict(self._out_values)
        for block in writes:
            await self._write_block(client, block, values)

    async def _write_block(self, client: AsyncModbusTcpClient, block, values: dict[str, float]) -> None:
        raw: list[int] = []
        for entry in block.entries:
            words, clamped = entry.encode(values[entry.signal])
            if clamped:
                self.errors.inc("clamped_output")
            raw.extend(words)
        if block.table == "coil":
            rr = await client.write_coils(block.address, [bool(b) for b in raw], device_id=self.device_id)
        else:
            rr = await client.write_registers(block.address, raw, device_id=self.device_id)
        if rr.isError():
            self.errors.inc(f"plc_{EXCEPTION_NAMES.get(rr.exception_code, f'exception_{rr.exception_code}')}")


class _Store:
    """The datastore pymodbus' request PDUs call (``async_getValues``/``async_setValues``),
    backed by the bridge's register image. Nothing here awaits, so each PDU's
    ``datastore_update`` coroutine completes in one step (see ``_Handler._answer``)."""

    def __init__(self, bridge: ModbusBridge):
        self.bridge = bridge
        self.updates: dict[str, tuple[float, int]] = {}

    def device_ids(self) -> list[int]:
        """Unit ids served."""
        return sorted(self.bridge.units)

    async def async_getValues(self, device_id: int, func_code: int, address: int, count: int = 1):
        """Read ``count`` values, or exception 02 if any address is not readable."""
        table = FC_TABLE[func_code]
        end = address + count
        if end > ADDRESS_SPACE:
            return ExcCodes.ILLEGAL_ADDRESS
        bridge = self.bridge
        with bridge.lock:
            if bridge._image.access[table].count(NO_ACCESS, address, end):
                return ExcCodes.ILLEGAL_ADDRESS
            if bridge._image.access[table].count(READ_ONLY, address, end):
                bridge._output_reads += 1
            if table in BIT_TABLES:
                return [bool(b) for b in bridge._image.bits[table][address:end]]
            return bridge._image.words[table][address:end].tolist()

    async def async_setValues(self, device_id: int, func_code: int, address: int, values):
        """Write values, or exception 02 if any address is not writable (outputs, unmapped)."""
        table = FC_TABLE[func_code]
        count = len(values)
        end = address + count
        if end > ADDRESS_SPACE:
            return ExcCodes.ILLEGAL_ADDRESS
        bridge = self.bridge
        with bridge.lock:
            image = bridge._image
            if image.access[table].count(READ_WRITE, address, end) != count:
                return ExcCodes.ILLEGAL_ADDRESS
            if table in BIT_TABLES:
                image.bits[table][address:end] = bytes(1 if v else 0 for v in values)
            else:
                image.words[table][address:end] = array("H", values)
            self.updates.update(bridge._written(table, address, count))
        return None


class _Handler(ServerRequestHandler):
    """One PLC connection: allow-list, MBAP checks, in-order answers, counters, timing."""

    def __init__(self, server: "_Server"):
        super().__init__(server, None, None, None)
        self.bridge = server.bridge
        self.store = server.store
        # Frames are parsed here, so the buffer only bounds a flood of pipelined requests.
        self.max_buffer_size = 1 << 20
        self._accepted = False
        self._pending = 0

    def connection_made(self, transport) -> None:
        """A PLC connected: apply the allow-list and ``max_clients``."""
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        host = peer[0] if peer else None
        bridge = self.bridge
        if not bridge._client_allowed(host):
            n = bridge.bad.inc("rejected_client")
            if worth_logging(n):
                log.warning("modbus server: refused %s (not in modbus.allow; %d refused so far)", host, n)
            self.close()
            return
        if bridge._clients >= bridge.max_clients:
            bridge.bad.inc("too_many_clients")
            log.debug("modbus server: refused %s (max_clients = %d reached)", host, bridge.max_clients)
            self.close()
            return
        self._accepted = True
        bridge._clients += 1
        log.info("modbus server: client %s connected", host)

    def _forget(self) -> None:
        if self._accepted:
            self._accepted = False
            self.bridge._clients -= 1
        if self._pending:
            self.bridge.bad.inc("truncated")
            self._pending = 0

    def _drop(self) -> None:
        self._forget()
        self.close()

    def callback_disconnected(self, exc: Exception | None) -> None:
        """The peer went away (a frame left half-sent counts as ``truncated``)."""
        self._forget()
        super().callback_disconnected(exc)

    def send(self, data: bytes, addr: tuple | None = None) -> None:
        """Write a response frame."""
        # The base class clears its receive buffer on every send, which would lose the
        # start of a pipelined request; we only write.
        if self.transport:
            self.transport.write(data)

    def callback_data(self, data: bytes, addr: tuple | None = None) -> int:
        """Answer every complete frame in ``data``; returns the bytes consumed."""
        n = len(data)
        used = 0
        try:
            while n - used >= 8:
                tid, pid, length, unit = _MBAP.unpack_from(data, used)
                if pid != 0 or not 2 <= length <= 254:
                    self.bridge.bad.inc("bad_frame")
                    self._pending = 0
                    self._drop()
                    return n
                end = used + 6 + length
                if end > n:
                    break
                t0 = time.perf_counter_ns()
                self._answer(tid, unit, data[used + 7:end])
                self.bridge.io.add(time.perf_counter_ns() - t0)
                used = end
        except Exception:  # never let one connection's bytes reach the loop
            if worth_logging(self.bridge.bad.inc("handler_error")):
                log.exception("modbus server: request handling failed; closing that connection")
            self._pending = 0
            self._drop()
            return n
        self._pending = n - used
        return used

    def _reply_exception(self, fc: int, code: int, tid: int, unit: int) -> None:
        self.bridge.bad.inc(EXCEPTION_NAMES.get(code, f"exception_{code}"))
        self.pdu_send(ExceptionResponse(fc & 0x7F, code, device_id=unit, transaction=tid))

    def _answer(self, tid: int, unit: int, pdu_bytes: bytes) -> None:
        fc = pdu_bytes[0]
        if unit not in self.bridge.units:
            self._reply_exception(fc, 0x0B, tid, unit)
            return
        if fc not in FC_TABLE:
            self._reply_exception(fc, 0x01, tid, unit)
            return
        if fc == 5 and pdu_bytes[3:5] not in (b"\xff\x00", b"\x00\x00"):
            self._reply_exception(fc, 0x03, tid, unit)  # a coil is written with FF00 or 0000 only
            return
        pdu = self.server.decoder.decode(pdu_bytes)
        if pdu is None or (fc == 15 and not 1 <= pdu.count <= 1968):
            self._reply_exception(fc, 0x03, tid, unit)  # quantity or layout refused
            return
        coro = pdu.datastore_update(self.store, unit)
        try:
            coro.send(None)
        except StopIteration as done:
            response = done.value
        else:
            coro.close()
            raise RuntimeError(f"datastore for function {fc} suspended")
        updates, self.store.updates = self.store.updates, {}
        if isinstance(response, ExceptionResponse):
            self._reply_exception(fc, response.exception_code, tid, unit)
        else:
            response.transaction_id = tid
            response.dev_id = unit
            self.pdu_send(response)
        self.bridge._record_inputs(updates)


class _Server(ModbusTcpServer):
    """pymodbus' TCP listener with our handler per connection."""

    def __init__(self, bridge: ModbusBridge, address: tuple[str, int]):
        # pymodbus requires a device description; requests never reach it (see _Handler).
        super().__init__(SimDevice(0, simdata=[SimData(0)]), address=address)
        self.bridge = bridge
        self.store = _Store(bridge)

    def callback_new_connection(self) -> _Handler:
        """A handler for each accepted connection."""
        return _Handler(self)


def _int_key(cfg: dict, key: str, default: int, lo: int, hi: int) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"modbus.{key}: {value!r} is not an integer in {lo}..{hi}")
    return value


def _ms_key(cfg: dict, key: str, default: float) -> float:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"modbus.{key}: {value!r} is not a positive number of milliseconds")
    return float(value)


def _parse_allow(raw) -> list:
    if isinstance(raw, str) or not isinstance(raw, (list, tuple)):
        raise ValueError("modbus.allow: must be a list of addresses or networks, e.g. [\"10.0.0.5\", \"10.0.1.0/24\"]")
    nets = []
    for i, item in enumerate(raw):
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"modbus.allow[{i}]: {item!r} is not an address or network: {exc}") from None
    return nets


register("modbus", lambda table, wiring: ModbusBridge.from_config(  # the registry's factory
    table, [s.name for s in wiring.inputs], {s.name: s.failsafe for s in wiring.outputs}))
