"""Modbus TCP bridge: server mode (the PLC writes inputs and reads outputs) and client mode
(we poll the PLC and write outputs back), optionally over Modbus/TCP Security (TLS, port 802).

The bridge serves one stream (``[modbus] stream``, default "main") and runs its own asyncio
loop in a background thread. The controller's cycle talks to it only through the
:class:`~plc_bridge.bridge.Bridge` methods, which take a lock for microseconds and never touch
the network. The wire format (MBAP frames, PDUs) is :mod:`plc_bridge.mbap`; TLS contexts and
roles are :mod:`plc_bridge.modbus_tls`.

Server mode serves a register image built from the map, with these rules (Modbus
application protocol V1.1b3, section 7):

- only function codes 1, 2, 3, 4, 5, 6, 15, 16, 22 and 23 are served; any other gets
  exception 01 (ILLEGAL FUNCTION);
- a quantity outside the limits of the function (e.g. a read of 0 or more than 125
  registers), or a body whose length does not match it, gets 03 (ILLEGAL DATA VALUE);
- a read touching any address that is not in the map gets 02 (ILLEGAL DATA ADDRESS);
- a write touching an output, or any address not in the map, gets 02: an output is a valid
  address for reading only, and 02 is the code the protocol defines for "address not
  allowable";
- a request for another unit id than ``device_id`` (0 and 255, the Modbus/TCP "unit not
  used" values, are accepted too) gets 0B (GATEWAY TARGET DEVICE FAILED TO RESPOND);
- with ``[modbus.tls]``, a write from a client whose certificate role is not in
  ``write_roles`` gets 01 (the Modbus/TCP Security specification's answer);
- a frame with a bad MBAP header (protocol id not 0, length outside 2..254) cannot be
  re-synchronised on a TCP stream: it is counted and that connection is closed;
- peers outside ``allow`` (addresses or networks) are counted and disconnected at once;
- a connection without a complete request for ``idle_timeout_s`` is closed, and a new
  connection while ``max_clients`` are held evicts the longest-idle one, so idle peers can
  never lock the PLC out;
- each connection is answered at most ``max_request_rate`` requests per second (a flooding
  peer waits, TCP pushes back): a flood cannot take the controller's CPU.
"""
from __future__ import annotations

import asyncio
import logging
import math
import ssl
import threading
import time
from array import array
from typing import Callable

from . import mbap
import numpy as np

from .bridge import (MISSING, DecisionImage, InputImage, Inputs, LoopThread, number_key, refuse_unknown_keys,
                     register, resolve_paths)
from .mbap import BadReply, ModbusError, PlcConnection
from .messages import MAX_NAME_LEN
from .metrics import Counters, LatencyRing
from .modbus_tls import TlsSettings, parse_allow, peer_allowed, peer_role
from .registers import ADDRESS_SPACE, BIT_TABLES, READABLE, UNMAPPED, WRITABLE, MapEntry, RegisterImage, RegisterMap

log = logging.getLogger(__name__)

_MODBUS_KEYS = frozenset((
    "mode", "stream", "host", "port", "device_id", "heartbeat", "map", "allow", "max_clients", "poll_ms",
    "request_timeout_ms", "reconnect_min_ms", "reconnect_max_ms", "max_read", "stop_linger_ms",
    "idle_timeout_s", "max_request_rate", "tls"))
_READ_FN = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}
_RATE_WINDOW_S = 0.01            # a connection's request budget is spent per window of this length

InputCallback = Callable[[dict], None]


class ModbusBridge(LoopThread):
    """Modbus TCP I/O for one PLC, in server or client mode, in a background thread.

    A :class:`~plc_bridge.bridge.Bridge` serving exactly one stream (``stream``, default
    "main"): the PLC's input registers are that stream's inputs, and its output registers
    carry that stream's decision only.

    Build it with :meth:`from_config`; ``start()``/``stop()`` or use it as a context manager.
    Inputs come out of :meth:`read` (the cycle's image) or :meth:`snapshot` (and ``on_input``,
    called in the I/O thread with ``{name: (value, rx_ns)}`` of the signals just received, after
    the PLC's request has been answered; it must be quick); outputs go in through
    :meth:`write` or :meth:`publish`.

    Start: server mode serves every output register at its fail-safe value until the first
    :meth:`write` (or :meth:`publish`); client mode writes nothing to the PLC before the first
    one it accepts, so the plant keeps its own outputs until the controller has decided (a bumpless
    start: the controller's first outputs may track the actuators).

    Fail-safe: with a heartbeat configured, when the PLC's heartbeat register has not changed
    for ``timeout_ms`` (or has not moved yet) the bridge ignores :meth:`write` and :meth:`publish`;
    once it had published, it writes every output's fail-safe value itself (server mode: into
    the served registers; client mode: to the PLC, again after each reconnection) until the
    heartbeat changes again; the next write after that puts out the controller's outputs.
    :meth:`read` tells the controller (the stream's row flagged ``failsafe``, and the switches
    counted in ``failsafe_entries``), so that its rate limits start from what the plant got.

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
                 stop_linger_ms: float = 200.0, idle_timeout_s: float = 10.0,
                 max_request_rate: float = 1000.0, tls: TlsSettings | None = None,
                 on_input: InputCallback | None = None, columns: list[str] | None = None):
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
        self.idle_timeout_s = idle_timeout_s
        self.request_burst = max(1, round(max_request_rate * _RATE_WINDOW_S))
        self.tls = tls
        self._ssl: ssl.SSLContext | None = None
        self._conns: dict[asyncio.StreamWriter, _Conn] = {}
        self._listener: asyncio.AbstractServer | None = None
        self.on_input = on_input
        self._output_reads = 0      # server mode: read requests that covered an output register
        self.failsafe = {e.signal: float(failsafe[e.signal]) for e in regmap.outputs}
        self.hb_timeout_ns = int(regmap.heartbeat.timeout_ms * 1e6) if regmap.heartbeat else 0

        self.bad = Counters()       # traffic we refused, by reason
        self.errors = Counters()    # our own I/O trouble, by reason
        self.io = LatencyRing()
        self.lock = threading.Lock()
        # Inputs as the controller reads them (read()): one row over ``columns`` (default: mapped
        # inputs), copied from what the I/O thread received (``_rx_values``/``_rx_stamps``, lock held).
        self.image = InputImage(columns if columns is not None else [e.signal for e in regmap.inputs], 1, self.lock)
        self.image.taken.append((stream, self.image.row(stream)))
        self._column = {name: j for j, name in enumerate(self.image.columns)}
        self._rx_values = np.full(len(self.image.columns), np.nan)
        self._rx_stamps = np.full(len(self.image.columns), MISSING, np.int64)
        # Server mode: the heartbeat register starts at 0 in our image. Client mode: the first
        # read only sets the baseline; only a change proves the PLC is alive.
        self._hb_value: int | None = 0 if mode == "server" else None
        self._hb_change_ns: int | None = None
        # The heartbeat is fresh until this time.monotonic_ns() (no heartbeat configured: always).
        self._hb_fresh_until = -1 if regmap.heartbeat is not None else 1 << 62
        self._failsafe_active = regmap.heartbeat is not None
        self._failsafe_entries = 0
        self._published = False     # client mode writes nothing before the first accepted publish
        self._out_values = dict(self.failsafe)
        self._reconnects = 0
        self._backoff_s = 0.0
        self._throttled = 0         # server mode: times a connection waited for its request budget
        self._connected = False
        self._init_thread(log)
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
        (server: how long a stop waits for a connected PLC to read the outputs once more, 200),
        ``idle_timeout_s`` (server: a connection without a request this long is closed, 10;
        0.1..86400), ``max_request_rate`` (server: requests answered per second and connection,
        1000; 10..1000000), ``tls`` (the ``[modbus.tls]`` table: Modbus/TCP Security, see
        :class:`~plc_bridge.modbus_tls.TlsSettings`; the port defaults to 802 then). ``port = 0``
        binds an ephemeral port (see :attr:`port` after ``start()``).
        Raises ``ValueError`` naming the offending key or map entry.
        """
        if not isinstance(modbus, dict):
            raise ValueError("modbus: must be a table")
        refuse_unknown_keys(modbus, _MODBUS_KEYS, "modbus")
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
        tls = TlsSettings.from_config(modbus["tls"], mode) if "tls" in modbus else None
        port = number_key(modbus, "port", 502 if tls is None else 802, 0 if mode == "server" else 1, 65535, "modbus",
                          integer=True)
        device_id, max_clients, max_read = (number_key(modbus, key, default, lo, hi, "modbus", integer=True)
                                            for key, default, lo, hi in (("device_id", 1, 0, 255),
                                                                         ("max_clients", 8, 1, 1024),
                                                                         ("max_read", 125, 1, 125)))
        times = {k: _ms_key(modbus, k, d) for k, d in (("poll_ms", 10.0), ("request_timeout_ms", 200.0),
                                                       ("reconnect_min_ms", 100.0), ("reconnect_max_ms", 5000.0),
                                                       ("stop_linger_ms", 200.0))}
        idle_timeout_s = number_key(modbus, "idle_timeout_s", 10.0, 0.1, 86400.0, "modbus", unit="seconds")
        max_request_rate = number_key(modbus, "max_request_rate", 1000.0, 10.0, 1e6, "modbus",
                                      unit="requests per second")
        if times["reconnect_min_ms"] > times["reconnect_max_ms"]:
            raise ValueError("modbus.reconnect_min_ms: must not exceed modbus.reconnect_max_ms")
        allow = None
        if "allow" in modbus:
            if mode != "server":
                raise ValueError("modbus.allow: only applies to server mode")
            allow = parse_allow(modbus["allow"])
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
                   idle_timeout_s=idle_timeout_s, max_request_rate=max_request_rate, tls=tls,
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

    bound_streams = input_streams

    def snapshot(self, stream: str | None = None) -> Inputs:
        """``{input name: (value, rx time.monotonic_ns())}`` for every input received so far
        (``stream``: this bridge's, the default; ``{}`` for any other). Never blocks on the network."""
        if stream is not None and stream != self.stream:
            return {}
        with self.lock:
            return {name: (float(v), int(t)) for name, v, t in zip(self.image.columns, self._rx_values.tolist(),
                                                                    self._rx_stamps.tolist()) if t != MISSING}

    def read(self) -> InputImage:
        """The cycle's one read (see :meth:`~plc_bridge.bridge.Bridge.read`): the inputs received
        so far; ``failsafe`` while the heartbeat is stale (the bridge then puts out its fail-safe
        values) and how often it switched to them; whether the I/O thread and its tasks live."""
        img = self.image
        now = time.monotonic_ns()
        with self.lock:
            img.values[0] = self._rx_values
            img.stamps[0] = self._rx_stamps
            img.failsafe[0] = now > self._hb_fresh_until
            img.failsafe_entries[0] = self._failsafe_entries
        img.running = self._running()
        return img

    def write(self, decisions: DecisionImage) -> None:
        """The cycle's one write (see :meth:`~plc_bridge.bridge.Bridge.write`): this bridge's
        stream's outputs, as :meth:`publish` puts them out, straight from its row of the image."""
        d = decisions
        for i in range(d.n):
            if d.names[i] == self.stream:
                row, index, given = d.values[i], d.index, []
                for entry in self.regmap.outputs:
                    j = index.get(entry.signal)
                    if j is not None and row[j] == row[j]:      # NaN: not given for this stream
                        given.append((entry, row[j]))
                self._put_outputs(given)
                return

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
        by_signal = self.regmap.by_signal
        self._put_outputs([(entry, value) for name, value in outputs.items()
                           if (entry := by_signal.get(name)) is not None and entry.direction == "output"])

    def _put_outputs(self, outputs: list[tuple[MapEntry, float]]) -> None:
        """Mapped outputs with their values into the served registers or the client's queue
        (the rules are :meth:`publish`'s)."""
        now = time.monotonic_ns()
        with self.lock:
            if now > self._hb_fresh_until:
                if not self._failsafe_active:
                    self._enter_failsafe_locked("heartbeat stale at publish")
                return
            self._failsafe_active = False
            self._published = True
            for entry, value in outputs:
                value = float(value)
                if not math.isfinite(value):
                    self.errors.inc("nonfinite_output")
                    value = self.failsafe[entry.signal]
                self._out_values[entry.signal] = value
                if self._image is not None and self._image.put(entry, value):
                    self.errors.inc("clamped_output")
        if self.mode == "client":
            self._wakeup()

    def health(self) -> dict:
        """Connection, heartbeat and fail-safe state, bad traffic by reason, errors by kind,
        reconnects (client: the current backoff delay too, 0 while connected), and the bridge's
        own I/O time in microseconds (server: per request; client: per poll of every block).

        ``running`` is false while any I/O task is dead; ``down`` names those tasks
        (``server``, ``idle``, ``poller``, ``watchdog``, or ``thread``), see
        :meth:`~plc_bridge.bridge.LoopThread.down_tasks`. ``errors`` counts, among others,
        ``<task>_failed`` (a task's unexpected exception) and ``plc_<fault>`` (client: a PLC
        answer that was refused: ``plc_short_response``, ``plc_timeout``, ...)."""
        now = time.monotonic_ns()
        with self.lock:
            hb_ok = now <= self._hb_fresh_until
            failsafe = self._failsafe_active
            hb_age = None if self._hb_change_ns is None else (now - self._hb_change_ns) / 1e6
        connected = bool(self._conns) if self.mode == "server" else self._connected
        return {
            "mode": self.mode,
            "address": [self.host, self.port],
            "running": self._running(),
            "down": list(self.down_tasks()),
            "tls": self.tls is not None,
            "connected": connected,
            "clients": len(self._conns) if self.mode == "server" else int(self._connected),
            "heartbeat_ok": hb_ok,
            "heartbeat_age_ms": hb_age,
            "failsafe": failsafe,
            "reconnects": self._reconnects,
            "throttled": self._throttled,
            "reconnect_delay_ms": self._backoff_s * 1e3 if self.mode == "client" else None,
            "bad": self.bad.snapshot(),
            "errors": self.errors.snapshot(),
            "io_us": self.io.percentiles(),
        }

    # ------------------------------------------------------------------ shared internals
    def _enter_failsafe_locked(self, why: str) -> None:
        self._failsafe_active = True
        self._failsafe_entries += 1
        self.errors.inc("failsafe_entries")
        self._out_values.update(self.failsafe)
        if self._image is not None:
            for entry in self.regmap.outputs:
                self._image.put(entry, self.failsafe[entry.signal])
        self._say.warning("failsafe", "modbus %s: outputs set to fail-safe (%s)", self.mode, why)

    def _record_inputs(self, updates: dict[str, tuple[float, int]]) -> None:
        """``on_input(updates)``, called by the I/O thread outside the lock, after the inputs
        were stored."""
        if self.on_input is not None and updates:
            try:
                self.on_input(updates)
            except Exception:  # a faulty callback must not stop the I/O loop
                self.errors.inc("callback_error")
                self._say.exception("callback", "modbus on_input callback failed")

    def _note_heartbeat_locked(self, value: int, now: int) -> None:
        if self._hb_value is not None and value != self._hb_value:
            self._hb_change_ns = now
            self._hb_fresh_until = now + self.hb_timeout_ns
        self._hb_value = value

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        if self.tls is not None:
            self._ssl = self.tls.server_context() if self.mode == "server" else self.tls.client_context()
        if self.mode == "server":
            self._listener = await self._bind()        # a bind error fails start()
            self.port = self._listener.sockets[0].getsockname()[1]
            log.info("modbus server listening on %s:%d (unit %d%s)", self.host, self.port, self.device_id,
                     ", Modbus/TCP Security" if self.tls else "")
            self._spawn("server", self._serve)
            self._spawn("idle", self._close_idle)
        else:
            poller = self._spawn("poller", self._client_loop)
        if self.regmap.heartbeat is not None:
            self._spawn("watchdog", self._watchdog)
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            if self.mode == "client":
                # The client loop writes the outputs once more and returns (bounded wait).
                await asyncio.wait([poller], timeout=2 * self.request_timeout_s + self.poll_s)
            elif self._conns:
                reads = self._output_reads
                deadline = time.monotonic() + self.stop_linger_s
                while self._conns and self._output_reads == reads and time.monotonic() < deadline:
                    await asyncio.sleep(0.002)
            await self._cancel_tasks()
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            handlers = [conn.task for conn in self._conns.values()]
            for writer in list(self._conns):
                writer.transport.abort()
            if handlers:            # they end on the lost connection (Python 3.11 logs a cancelled one)
                await asyncio.wait(handlers, timeout=1.0)
            for task in handlers:
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)

    async def _watchdog(self) -> None:
        """Trips fail-safe when the heartbeat stops, even if nobody publishes (client mode: also
        while the PLC is unreachable; the fail-safe values are written once it answers)."""
        idle_s = min(self.hb_timeout_ns / 4e9, 0.02)
        while not self._stop.is_set():
            now = time.monotonic_ns()
            with self.lock:
                ok = now <= self._hb_fresh_until
                if not ok and not self._failsafe_active:
                    self._enter_failsafe_locked("heartbeat stopped")
                last = self._hb_change_ns
            if ok and last is not None:
                await asyncio.sleep(max((last + self.hb_timeout_ns - now) / 1e9, 0.0) + 1e-4)
            else:
                await asyncio.sleep(idle_s)

    # ------------------------------------------------------------------ server mode
    async def _bind(self) -> asyncio.AbstractServer:
        return await asyncio.start_server(self._connection, self.host, self.port, limit=1 << 16)

    async def _serve(self) -> None:
        """The listener (bound by ``_main`` first; bound again if it ever has to restart)."""
        if self._listener is None:
            self._listener = await self._bind()
        try:
            await self._stop.wait()
        finally:
            if self._listener is not None and not self._stop.is_set():
                self._listener.close()
                self._listener = None

    async def _close_idle(self) -> None:
        """Closes connections without a complete request for ``idle_timeout_s``."""
        every = min(1.0, self.idle_timeout_s / 4)
        while not self._stop.is_set():
            await asyncio.sleep(every)
            limit = time.monotonic() - self.idle_timeout_s
            for writer, conn in list(self._conns.items()):
                if conn.last < limit:
                    self._close_conn(writer, conn, "idle_timeout")

    def _close_conn(self, writer: asyncio.StreamWriter, conn: "_Conn", why: str) -> None:
        conn.closed_by_us = True
        self.bad.inc(why)
        self._say.warning(why, "modbus server: closed %s (%s)", conn.peer, why.replace("_", " "))
        writer.transport.abort()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One peer: allow-list, eviction at ``max_clients``, TLS handshake and role, requests."""
        peer = writer.get_extra_info("peername")
        host = peer[0] if peer else None
        if not peer_allowed(self.allow, host):
            n = self.bad.inc("rejected_client")
            self._say.warning("allow", "modbus server: refused %s (not in modbus.allow; %d refused so far)", host, n)
            writer.transport.abort()
            return
        if len(self._conns) >= self.max_clients:
            idlest = min(self._conns.items(), key=lambda item: item[1].last)
            self._close_conn(*idlest, "evicted")
            del self._conns[idlest[0]]
        conn = _Conn(host, time.monotonic(), asyncio.current_task())
        self._conns[writer] = conn
        try:
            if self._ssl is not None:
                try:
                    await writer.start_tls(self._ssl, ssl_handshake_timeout=min(self.idle_timeout_s, 10.0))
                except (ssl.SSLError, OSError, asyncio.TimeoutError, ConnectionError) as exc:
                    if not conn.closed_by_us:
                        self.bad.inc("tls_handshake_failed")
                        self._say.warning("tls", "modbus server: TLS handshake with %s failed: %s", host, exc)
                    return
                conn.role = peer_role(writer.get_extra_info("ssl_object"))
                conn.may_write = conn.role in self.tls.write_roles
            else:
                conn.may_write = True
            self._say.log(logging.INFO, "connect", "modbus server: client %s connected%s", host,
                          "" if self.tls is None else f" (role {conn.role!r})")
            await self._requests(reader, writer, conn)
        except (ConnectionError, OSError):
            pass
        except Exception:                                 # never let one peer's bytes reach the loop
            self.bad.inc("handler_error")
            self._say.exception("handler", "modbus server: request handling failed; closing that connection")
        finally:
            if self._conns.get(writer) is conn:
                del self._conns[writer]
            writer.transport.abort()

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: "_Conn") -> None:
        window_end, budget = 0.0, self.request_burst
        while True:
            head = b""
            try:
                head = await reader.readexactly(mbap.HEADER_SIZE)
                tid, size, unit = mbap.check_header(head)
                body = await reader.readexactly(size - mbap.HEADER_SIZE)
            except asyncio.IncompleteReadError as exc:     # the peer left, maybe mid-frame
                if (head or exc.partial) and not conn.closed_by_us:
                    self.bad.inc("truncated")
                return
            except BadReply:
                self.bad.inc("bad_frame")
                return
            t0 = time.perf_counter_ns()
            conn.last = time.monotonic()
            reply, updates = self._answer(body, unit, conn.may_write)
            if writer.transport.is_closing():             # the peer left with requests still buffered
                return
            writer.write(mbap.frame(tid, unit, reply))
            self.io.add(time.perf_counter_ns() - t0)
            if updates and self.on_input is not None:
                self._record_inputs(updates)
            if writer.transport.get_write_buffer_size() > 1 << 16:
                await writer.drain()                      # a peer that does not read waits
            budget -= 1
            if budget <= 0:                               # flood control: see max_request_rate
                now = time.monotonic()
                if now < window_end:
                    self._throttled += 1
                    await asyncio.sleep(window_end - now)
                    now = time.monotonic()
                window_end, budget = now + _RATE_WINDOW_S, self.request_burst

    def _answer(self, pdu: bytes, unit: int, may_write: bool) -> tuple[bytes, dict]:
        """The answer PDU to one request and the inputs it wrote (``{}`` for none)."""
        fc = pdu[0]
        try:
            if unit not in self.units:
                raise ModbusError(mbap.GATEWAY_NO_RESPONSE)
            req = mbap.parse_request(pdu)
            if req.write is not None and not may_write:
                self.bad.inc("write_refused")
                return mbap.exception_reply(fc, mbap.ILLEGAL_FUNCTION), {}
            with self.lock:
                values, updates = self._apply_locked(req)
        except ModbusError as exc:
            self.bad.inc(exc.kind)
            return mbap.exception_reply(fc, exc.code), {}
        if values is None:
            return mbap.write_reply(pdu), updates
        return mbap.read_reply(fc, values), updates

    def _apply_locked(self, req: mbap.Request) -> tuple[list[int] | None, dict]:
        """Carry out a request on the register image (lock held): ``(values read or None,
        inputs written)``; ``ModbusError`` 02 when an address is not allowed, before any change."""
        image, table = self._image, req.table
        access = image.access[table]
        if req.write is not None:
            address, values = req.write
            end = address + len(values)
            if end > ADDRESS_SPACE or access.count(WRITABLE, address, end) != len(values):
                raise ModbusError(mbap.ILLEGAL_ADDRESS)
        if req.read is not None:
            raddr, rcount = req.read
            rend = raddr + rcount
            if rend > ADDRESS_SPACE or access.count(UNMAPPED, raddr, rend):
                raise ModbusError(mbap.ILLEGAL_ADDRESS)
        updates: dict = {}
        if req.write is not None:
            if table in BIT_TABLES:
                image.bits[table][address:end] = bytes(values)
            else:
                if req.masks is not None:
                    and_mask, or_mask = req.masks
                    values = [(image.words[table][address] & and_mask) | (or_mask & ~and_mask & 0xFFFF)]
                image.words[table][address:end] = array("H", values)
            now = time.monotonic_ns()
            for entry, value in image.decoded(table, address, len(values)):
                if entry.index < 0:
                    self._note_heartbeat_locked(int(value), now)
                elif (j := self._column.get(entry.signal)) is not None:
                    self._rx_values[j], self._rx_stamps[j] = value, now
                    updates[entry.signal] = (value, now)
        if req.read is None:
            return None, updates
        if access.count(READABLE, raddr, rend):
            self._output_reads += 1
        if table in BIT_TABLES:
            return list(image.bits[table][raddr:rend]), updates
        return image.words[table][raddr:rend].tolist(), updates

    # ------------------------------------------------------------------ client mode
    async def _client_loop(self) -> None:
        """Connect, poll until the connection fails, reconnect with a capped back-off. A PLC's
        bad answer is counted (``plc_<fault>``) and the poll goes on; a connection that can no
        longer be trusted (closed, timed out, garbage on the stream) is closed and made again."""
        delay = self.reconnect_min_s
        ever_connected = False
        # Loops test the stop flag as well as being cancelled: on Python 3.11,
        # asyncio.wait_for can swallow a cancellation that races with its own wake-up.
        while not self._stop.is_set():
            try:
                plc = await PlcConnection.open(self.host, self.port, self.device_id, self.request_timeout_s,
                                               self._ssl, on_stray=lambda: self._plc_fault("wrong_transaction"))
            except (OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
                self.errors.inc("connect_failures")
                self._say.warning("connect", "modbus client cannot connect to %s:%d: %s", self.host, self.port, exc)
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
            self._say.log(logging.INFO, "connect", "modbus client connected to %s:%d", self.host, self.port)
            try:
                await self._poll_connected(plc)
            except (OSError, asyncio.TimeoutError, BadReply) as exc:
                kind = getattr(exc, "kind", "timeout" if isinstance(exc, asyncio.TimeoutError) else "disconnected")
                self._plc_fault(kind)
                self.errors.inc("io_errors")
                self._say.warning("lost", "modbus client lost %s:%d: %s", self.host, self.port,
                                  exc or type(exc).__name__)
            finally:
                self._connected = False
                plc.close()
            await asyncio.sleep(self.reconnect_min_s)

    def _plc_fault(self, kind: str) -> None:
        n = self.errors.inc(f"plc_{kind}")
        self._say.warning(f"plc_{kind}", "modbus client: PLC %s:%d: %s (%d so far)", self.host, self.port,
                          kind.replace("_", " "), n)

    async def _poll_connected(self, plc: PlcConnection) -> None:
        regmap = self.regmap
        reads = regmap.read_blocks(regmap.inputs, include_heartbeat=True)
        writes = regmap.write_blocks(regmap.outputs)
        dirty = True  # write the current outputs as soon as we (re)connect (once there are any)
        next_poll = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_poll:
                t0 = time.perf_counter_ns()
                updates = {}
                for block in reads:
                    updates.update(await self._read_block(plc, block))
                self.io.add(time.perf_counter_ns() - t0)
                self._record_inputs(updates)
                with self.lock:
                    if time.monotonic_ns() > self._hb_fresh_until:
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
                await self._write_outputs(plc, writes)
                dirty = False
            timeout = next_poll - time.monotonic()
            if timeout > 0 and not self._wake.is_set():
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
        if writes and self._published:  # a clean stop: the last published outputs reach the PLC
            await self._write_outputs(plc, writes)

    async def _read_block(self, plc: PlcConnection, block) -> dict:
        """One read of ``block``: its inputs (and the heartbeat) stored; ``{}`` when the PLC's
        answer was refused (counted)."""
        fc = _READ_FN[block.table]
        try:
            raw = mbap.parse_read_reply(fc, block.count, await plc.request(mbap.read_request(fc, block.address,
                                                                                             block.count)))
        except ModbusError as exc:
            self._plc_fault(exc.kind)
            return {}
        except BadReply as exc:
            if exc.resync:
                raise
            self._plc_fault(exc.kind)
            return {}
        rx = time.monotonic_ns()
        updates = {}
        with self.lock:
            for entry in block.entries:
                off = entry.address - block.address
                if entry.index < 0:
                    self._note_heartbeat_locked(raw[off], rx)
                    continue
                value = entry.decode(raw[off:off + entry.width])
                if (j := self._column.get(entry.signal)) is not None:
                    self._rx_values[j], self._rx_stamps[j] = value, rx
                updates[entry.signal] = (value, rx)
        return updates

    async def _write_outputs(self, plc: PlcConnection, writes) -> None:
        with self.lock:
            values = dict(self._out_values)
        for block in writes:
            raw: list[int] = []
            for entry in block.entries:
                words, clamped = entry.encode(values[entry.signal])
                if clamped:
                    self.errors.inc("clamped_output")
                raw.extend(words)
            request = mbap.write_request(block.table, block.address, raw)
            try:
                mbap.check_write_reply(request, await plc.request(request))
            except ModbusError as exc:
                self._plc_fault(exc.kind)
            except BadReply as exc:
                if exc.resync:
                    raise
                self._plc_fault(exc.kind)


class _Conn:
    """Server mode: what the bridge keeps of one peer's connection."""

    __slots__ = ("peer", "last", "task", "role", "may_write", "closed_by_us")

    def __init__(self, peer: str | None, now: float, task: asyncio.Task):
        self.peer = peer
        self.task = task              # the connection's handler, cancelled at stop
        self.last = now               # time.monotonic() of the last complete request (or the connect)
        self.role: str | None = None  # the role in the peer's certificate (Modbus/TCP Security)
        self.may_write = False
        self.closed_by_us = False


def _ms_key(cfg: dict, key: str, default: float) -> float:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 86_400_000:
        raise ValueError(f"modbus.{key}: {value!r} is not a positive number of milliseconds (at most a day, 86400000)")
    return float(value)


register("modbus", lambda table, wiring: ModbusBridge.from_config(  # the registry's factory and [modbus.tls] paths
    table, [s.name for s in wiring.inputs], {s.name: s.failsafe for s in wiring.outputs}),
    lambda table, base: resolve_paths(table, base, "tls", ("cert", "key", "ca")))
