"""ZeroMQ bridge: sensor frames in (SUB), decisions out (XPUB), control (ROUTER), optional CURVE.

The bridge binds all three endpoints so a plant has one well-known address; sensor
publishers, decision subscribers and control clients connect to it. One I/O thread owns
every socket. The controller's cycle makes one :meth:`ZmqBridge.read` (the newest values of
every stream, copied out of a preallocated :class:`~plc_bridge.bridge.InputImage` the I/O
thread fills) and one :meth:`ZmqBridge.write` (the cycle's decisions, handed to the I/O
thread through an inproc pipe as one frame of arrays; the I/O thread packs and sends them);
neither waits on the network.

- Admission: with ``streams`` (the deployment's ``[model] streams`` as a list) only those
  streams get a row; frames naming another are counted (``unknown_stream``) and dropped. A
  stream that sent nothing for ``stream_idle_s`` (default 60) loses its row (and, in the
  controller, its slot), so a peer that stopped, or an intruder, does not hold one for ever.
- Floods: sensor frames are received under a budget (``max_frames_per_s``, default 10,000,
  spent per 10 ms window); the rest wait in libzmq, outside the interpreter, where the SUB
  socket queues each publisher apart and serves them in turn, so one publisher's flood
  neither takes the control loop's time nor drowns another publisher's frames (the
  flooding peer's excess is dropped at the high-water mark). Windows that ran out are
  counted (``throttled_windows`` in :meth:`health`).
- Supervision: an unexpected exception in the I/O loop is logged with its traceback (the
  first, then rarely), counted (``errors["io_loop"]``) and the loop restarts on the same
  sockets after a capped back-off (0.5 s doubling to 5 s); ``health()["running"]`` and the
  image's ``running`` are false meanwhile, so the controller fails the streams this bridge
  feeds safe (reason ``bridge``).

- Sensors: every frame is decoded and validated (:mod:`plc_bridge.messages`); a bad one is
  counted by reason and dropped. The bridge keeps the newest frame per stream (its own
  per-stream conflation: ZMQ_CONFLATE would keep one message across all streams).
- Decisions: the XPUB socket sees each new subscription and re-sends the newest decision of
  every stream then, so a subscriber that joins late (the PUB/SUB "slow joiner") starts
  with the current decisions instead of nothing. Those re-sent decisions keep their
  ``seq``; a subscriber that was already connected sees them again and can skip a ``seq`` it
  has. :class:`SensorPublisher` does the same on the other side: it uses XPUB and sends
  nothing until the bridge's subscription has arrived, so no first frames are lost.
- Control: ROUTER answers ``{"v":1,"cmd":"status"|"stats"|"health"}`` from REQ or DEALER
  clients with a msgpack map; "status" and "stats" come from providers the controller
  registers. ``{"v":1,"cmd":"mode","stream":s,"mode":"manual"|"auto"}`` switches a stream
  through the mode handler the controller registers (a :class:`~plc_bridge.bridge.ModeSwitch`).
  Commands that change behaviour ("mode", and any later one: :data:`CHANGING_COMMANDS`) are
  carried out only for CURVE-authenticated clients, i.e. when the control socket has
  ``curve.allowed`` (the handshake admits no one else); otherwise they are refused
  (``ok: false``, counted as ``control_unauthenticated``) unless ``insecure_control = true``.
- CURVE (optional, keys and clients in :mod:`plc_bridge.zmq_clients`): the three sockets are CURVE servers with the key from
  ``curve.secret_key``; with ``curve.allowed`` (a directory of client public key files,
  as written by ``r1edge keys``) only those clients get through, the rest fail the
  handshake and are counted. Without ``allowed`` any client key is accepted (encrypted but
  not authenticated). Plain-text clients cannot talk to a CURVE socket at all.
"""
from __future__ import annotations

import logging
import os
import struct
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

import numpy as np

from . import messages
from .bridge import (DecisionImage, InputImage, Inputs, ModeHandler, Provider, Wiring, number_key,
                     refuse_unknown_keys, register, resolve_paths)
from .messages import MessageError
from .metrics import Counters, LatencyRing, worth_logging
from .zmq_clients import (ZAP_DOMAIN, ControlClient, CurveClient, CurveServer, DecisionSubscriber,
                          SensorPublisher, curve_from_config, load_client_curve, make_keys)

# The clients and keys live in zmq_clients; importing them from here keeps working.
__all__ = ["ZmqBridge", "CHANGING_COMMANDS", "ControlClient", "CurveClient", "CurveServer", "DecisionSubscriber",
           "SensorPublisher", "load_client_curve", "make_keys"]

log = logging.getLogger(__name__)

_ZMQ_KEYS = frozenset(("sensors", "decisions", "control", "curve", "max_message_bytes", "max_values",
                       "max_streams", "hwm", "stream_idle_s", "insecure_control", "max_frames_per_s"))
#: Control commands that change behaviour: CURVE-authenticated clients only (or ``insecure_control``).
CHANGING_COMMANDS = frozenset(("mode",))
#: The receive budget is spent per window of this many nanoseconds.
BUDGET_WINDOW_NS = 10_000_000
_MONITOR_EVENTS = (zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
                   | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                   | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
_HANDSHAKE_FAILURES = {zmq.EVENT_HANDSHAKE_FAILED_AUTH: "auth_denied",
                       zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake_protocol",
                       zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake_failed"}
_KIND_DECISION, _KIND_STOP, _KIND_CYCLE = b"d", b"s", b"c"
# Hand-off frame from publish() to the I/O thread: kind, publish time (perf_counter_ns),
# stream name length, then the stream name and the packed decision. One frame, so one send
# (each send lets the I/O thread take the GIL from the caller).
_HANDOFF = struct.Struct("<cqH")
# A cycle's decisions from write(): kind, write time (perf_counter_ns), seq, t_ns, latency_us,
# rows; then the stream names (NUL-separated), one status byte a row, the float64 values.
_CYCLE = struct.Struct("<cqqqdH")
_STATUS_CODES = ("ok", "failsafe", "hold")


class ZmqBridge:
    """ZeroMQ I/O for sensor frames, decisions and control, in a background thread.

    A :class:`~plc_bridge.bridge.Bridge` serving every stream: inputs of each stream its
    sensor publishers send, and decisions of every stream the controller runs. Also a
    :class:`~plc_bridge.bridge.Reporter`: the control socket answers "status" and "stats"
    from the providers registered.

    Build it with :meth:`from_config`; ``start()``/``stop()`` or use it as a context manager.
    ``endpoints`` holds the bound addresses after ``start()`` (a ``:*`` port becomes the real
    one). ``on_input(stream, frame)`` is called in the I/O thread for each accepted frame; a
    :meth:`publish` made from inside it goes straight to the socket, without a thread hand-off.
    """

    name = "zmq"

    def __init__(self, *, sensors: str | None = None, decisions: str | None = None, control: str | None = None,
                 curve: CurveServer | None = None, inputs: Sequence[str] | None = None,
                 max_message_bytes: int = messages.MAX_MESSAGE_BYTES, max_values: int = messages.MAX_VALUES,
                 max_streams: int = 64, hwm: int = 1000,
                 on_input: Callable[[str, dict], None] | None = None, streams: Sequence[str] | None = None,
                 stream_idle_s: float = 60.0, insecure_control: bool = False, max_frames_per_s: int = 10_000):
        self.requested = {"sensors": sensors, "decisions": decisions, "control": control}
        self.endpoints: dict[str, str] = {}
        self.curve = curve
        self.inputs = frozenset(inputs) if inputs is not None else None
        self.max_bytes = max_message_bytes
        self.max_values = max_values
        self.max_streams = max_streams
        self.hwm = hwm
        self.on_input = on_input
        self.streams = frozenset(streams) if streams is not None else None
        self.stream_idle_ns = int(stream_idle_s * 1e9)
        self.insecure_control = insecure_control
        self.frames_per_window = max(1, max_frames_per_s * BUDGET_WINDOW_NS // 1_000_000_000)
        self.authenticated_control = curve is not None and curve.allowed is not None
        # With known inputs the newest values live in a preallocated image (one row a stream).
        self.image = None if inputs is None else InputImage(
            list(inputs), len(self.streams) if self.streams is not None else max_streams)
        self._dcols: list[str] = []
        self._down = False
        self.bad = Counters()
        self.errors = Counters()
        self.io = LatencyRing()
        self.publish_lat = LatencyRing()
        self._lock = threading.Lock()
        self._pub_lock = threading.Lock()
        self._frames: dict[str, dict] = {}
        self._values: dict[str, dict[str, tuple[float, int]]] = {}
        self._last_seq: dict[str, int] = {}
        self._n = {"frames": 0, "published": 0, "requests": 0, "throttled_windows": 0, "released_streams": 0,
                   "restarts": 0}
        self._peers = {k: set() for k in self.requested}
        self._reconnects = 0
        self._status_provider: Provider | None = None
        self._stats_provider: Provider | None = None
        self._mode_handler: ModeHandler | None = None
        self._ctx: zmq.Context | None = None
        self._auth = None
        self._sender: zmq.Socket | None = None
        self._pipe = f"inproc://r1edge-zmq-{id(self)}"
        self._io_ident: int | None = None
        self._xpub: zmq.Socket | None = None
        self._last_decision: dict[bytes, bytes] = {}
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._running = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, zmq_cfg: dict, base_dir: str | os.PathLike, inputs: Sequence[str] | None = None, *,
                    on_input: Callable[[str, dict], None] | None = None,
                    streams: Sequence[str] | None = None) -> "ZmqBridge":
        """Build from the deployment TOML's ``[zmq]`` table; ``base_dir`` resolves relative key
        paths (the directory of the TOML file). ``inputs``, if given, are the signal names
        kept from sensor frames (others are counted as ``unknown_signal`` and dropped).

        Optional keys besides the design's: ``max_message_bytes`` (65536), ``max_values``
        (256), ``max_streams`` (64), ``hwm`` (1000 messages per socket), ``stream_idle_s`` (60:
        a stream silent this long loses its row), ``insecure_control`` (false: "mode" needs a
        CURVE-authenticated client), ``max_frames_per_s`` (10,000: the sensor receive budget;
        64 streams at 100 Hz send 6,400).
        ``streams`` (the deployment's stream names, or None for any) admits only those.
        Raises ``ValueError`` naming the offending key, ``FileNotFoundError`` for key paths.
        """
        if not isinstance(zmq_cfg, dict):
            raise ValueError("zmq: must be a table")
        refuse_unknown_keys(zmq_cfg, _ZMQ_KEYS, "zmq")
        eps = {}
        for key in ("sensors", "decisions", "control"):
            value = zmq_cfg.get(key)
            if value is not None and (not isinstance(value, str) or "://" not in value):
                raise ValueError(f"zmq.{key}: {value!r} is not a ZeroMQ endpoint such as 'tcp://127.0.0.1:5556'")
            eps[key] = value
        if not any(eps.values()):
            raise ValueError("zmq: none of sensors, decisions, control is set")
        limits = {}
        for key, default, lo, hi in (("max_message_bytes", messages.MAX_MESSAGE_BYTES, 64, 1 << 24),
                                     ("max_values", messages.MAX_VALUES, 1, 65536),
                                     ("max_streams", 64, 1, 65536), ("hwm", 1000, 1, 1 << 20)):
            limits[key] = number_key(zmq_cfg, key, default, lo, hi, "zmq", integer=True)
        limits["max_frames_per_s"] = number_key(zmq_cfg, "max_frames_per_s", 10_000, 100, 10_000_000, "zmq",
                                                integer=True)
        idle = number_key(zmq_cfg, "stream_idle_s", 60.0, 0.01, 86400, "zmq", unit="seconds")
        insecure = zmq_cfg.get("insecure_control", False)
        if not isinstance(insecure, bool):
            raise ValueError(f"zmq.insecure_control: {insecure!r} is not true or false")
        curve = None
        if "curve" in zmq_cfg:
            curve = curve_from_config(zmq_cfg["curve"], Path(base_dir))
        return cls(**eps, curve=curve, inputs=inputs, on_input=on_input, streams=streams,
                   stream_idle_s=float(idle), insecure_control=insecure, **limits)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "ZmqBridge":
        """Bind the sockets and start the I/O thread. Raises ``RuntimeError`` if a bind fails."""
        if self._thread is not None:
            return self
        self._ready.clear()
        self._error = None
        self._ctx = zmq.Context()
        if self.curve is not None:
            from zmq.auth.thread import ThreadAuthenticator

            self._auth = ThreadAuthenticator(self._ctx, log=logging.getLogger(__name__ + ".auth"))
            self._auth.start()
            location = str(self.curve.allowed) if self.curve.allowed is not None else zmq.auth.CURVE_ALLOW_ANY
            self._auth.configure_curve(domain=ZAP_DOMAIN, location=location)
        self._running = True
        self._thread = threading.Thread(target=self._run, name="zmq-bridge", daemon=True)
        self._thread.start()
        self._ready.wait(timeout=10.0)
        if self._error is not None or not self._ready.is_set():
            error = self._error or TimeoutError("I/O thread did not start within 10 s")
            self.stop()
            raise RuntimeError(f"zmq bridge: {error}") from error
        if self.insecure_control and "control" in self.endpoints:
            log.warning("zmq: [zmq] insecure_control = true: any client that reaches %s may switch streams between "
                        "manual and auto; use CURVE with curve.allowed instead (r1edge keys)", self.endpoints["control"])
        sender = self._ctx.socket(zmq.PAIR)
        sender.linger = 0
        sender.sndhwm = self.hwm
        sender.connect(self._pipe)
        self._sender = sender
        return self

    def stop(self) -> None:
        """Stop the I/O thread, close every socket and the context. Idempotent."""
        if self._thread is None and self._ctx is None:
            return
        self._running = False
        with self._pub_lock:
            if self._sender is not None:
                try:
                    self._sender.send(_KIND_STOP, zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
        stuck = False
        if self._thread is not None:
            self._thread.join(timeout=10.0)
            stuck = self._thread.is_alive()
            if stuck:
                log.error("zmq bridge thread did not stop within 10 s; leaving its context open")
            self._thread = None
        with self._pub_lock:
            if self._sender is not None:
                self._sender.close(linger=0)
                self._sender = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._ctx is not None:
            if not stuck:
                self._ctx.term()
            self._ctx = None

    def __enter__(self) -> "ZmqBridge":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ controller side
    def latest_frames(self) -> dict[str, dict]:
        """``{stream: frame}``: the newest accepted frame of each stream, with its receive time
        ``rx_ns`` (``time.monotonic_ns()``) added. Frames are shared, treat them as read-only."""
        with self._lock:
            return dict(self._frames)

    def serves(self, stream: str) -> bool:
        """True: decisions of every stream go out on the ``decisions`` socket."""
        return True

    def input_streams(self) -> list[str]:
        """The streams that have sent an accepted sensor frame (and not gone idle since)."""
        with self._lock:
            return list(self._frames)

    def bound_streams(self) -> list[str]:
        """None by configuration: peers name their streams."""
        return []

    def snapshot(self, stream: str = "main") -> Inputs:
        """``{input name: (value, rx_ns)}``: the newest value of each signal of ``stream``
        (a frame may carry a subset of the signals)."""
        with self._lock:
            if self.image is not None:
                r = self.image.rows.get(stream)
                return {} if r is None else self.image.received(r)
            values = self._values.get(stream)
            return dict(values) if values else {}

    def down_tasks(self) -> tuple[str, ...]:
        """``("io_loop",)`` while the I/O loop is down after a failure (see the module docstring)."""
        thread = self._thread
        return ("io_loop",) if self._down or (thread is not None and not thread.is_alive()) else ()

    def read(self) -> InputImage:
        """The cycle's one read: every stream's newest values (a row a stream, see
        :class:`~plc_bridge.bridge.InputImage`); ``running`` false while the I/O loop is down.
        Needs ``inputs`` (the image's columns)."""
        img = self.image
        if img is None:
            raise RuntimeError("zmq bridge built without inputs has no image to read")
        img.take()
        img.running = self._thread is not None and not self.down_tasks()
        return img

    def write(self, decisions: DecisionImage) -> None:
        """The cycle's one write: every row of ``decisions`` as one frame to the I/O thread,
        which packs each stream's decision and sends it (never blocks; a full hand-over queue
        drops the cycle's decisions, counted as ``publish_dropped``)."""
        d = decisions
        if d.n == 0:
            return
        if self._dcols is not d.columns:
            self._dcols = d.columns
        t0 = time.perf_counter_ns()
        names = "\0".join(d.names[:d.n]).encode()
        status = bytes(_STATUS_CODES.index(st) for st in d.status[:d.n])
        msg = b"".join((_CYCLE.pack(_KIND_CYCLE, t0, d.seq, time.time_ns(), d.latency_us, d.n), status,
                        d.values[:d.n].tobytes(), names))
        with self._pub_lock:
            if self._sender is None:
                self.errors.inc("publish_not_running")
                return
            try:
                self._sender.send(msg, zmq.NOBLOCK)
            except zmq.Again:
                self.errors.inc("publish_dropped")

    def publish(self, outputs: dict[str, float], status: str, seq: int, latency_us: float,
                stream: str = "main", t_ns: int | None = None) -> None:
        """Send a decision without blocking. ``t_ns`` defaults to ``time.time_ns()``.

        Raises ``ValueError`` for arguments outside the schema (a programming error). If the
        hand-over queue is full (the I/O thread is stalled) the decision is dropped and
        counted as ``publish_dropped``.
        """
        t0 = time.perf_counter_ns()
        data = messages.encode_decision(stream, seq, time.time_ns() if t_ns is None else t_ns,
                                        outputs, status, latency_us, max_values=self.max_values)
        if threading.get_ident() == self._io_ident:
            # Called from on_input, in the I/O thread that owns the socket: send directly.
            self._send_decision(stream.encode(), data, t0)
            return
        with self._pub_lock:
            if self._sender is None:
                self.errors.inc("publish_not_running")
                return
            try:
                name = stream.encode()
                self._sender.send(_HANDOFF.pack(_KIND_DECISION, t0, len(name)) + name + data, zmq.NOBLOCK)
            except zmq.Again:
                self.errors.inc("publish_dropped")

    def set_status_provider(self, fn: Provider | None) -> None:
        """Register the callable answering control "status" (called in the I/O thread)."""
        self._status_provider = fn

    def set_mode_handler(self, fn: ModeHandler | None) -> None:
        """Register the callable carrying out control "mode" requests (called in the I/O thread)."""
        self._mode_handler = fn

    def set_stats_provider(self, fn: Provider | None) -> None:
        """Register the callable answering control "stats" (called in the I/O thread)."""
        self._stats_provider = fn

    def health(self) -> dict:
        """Peers per endpoint, counts, bad messages and errors by reason, and timing in
        microseconds: ``io_us`` (a sensor frame from receive to stored) and ``publish_us``
        (``publish()`` call to handed to the socket). ``reconnects`` counts peers that
        connected after an earlier peer of the same endpoint dropped."""
        peers = {k: len(v) for k, v in self._peers.items()}
        with self._lock:
            streams = len(self._frames)
        return {
            "running": self._thread is not None and not self.down_tasks(),
            "down": list(self.down_tasks()),
            "endpoints": dict(self.endpoints),
            "curve": self.curve is not None,
            "connected": any(peers.values()),
            "peers": peers,
            "heartbeat_ok": True,
            "streams": streams,
            "frames": self._n["frames"],
            "published": self._n["published"],
            "requests": self._n["requests"],
            "reconnects": self._reconnects,
            "throttled_windows": self._n["throttled_windows"],
            "released_streams": self._n["released_streams"],
            "restarts": self._n["restarts"],
            "bad": self.bad.snapshot(),
            "errors": self.errors.snapshot(),
            "io_us": self.io.percentiles(),
            "publish_us": self.publish_lat.percentiles(),
        }

    # ------------------------------------------------------------------ I/O thread
    def _run(self) -> None:
        self._io_ident = threading.get_ident()
        socks: list[zmq.Socket] = []
        try:
            ctx = self._ctx
            pipe = ctx.socket(zmq.PAIR)
            pipe.linger = 0
            pipe.rcvhwm = self.hwm
            pipe.bind(self._pipe)
            socks.append(pipe)
            roles = {}
            for role, kind in (("sensors", zmq.SUB), ("decisions", zmq.XPUB), ("control", zmq.ROUTER)):
                endpoint = self.requested[role]
                if endpoint is None:
                    continue
                sock = ctx.socket(kind)
                sock.linger = 0
                sock.sndhwm = self.hwm
                sock.rcvhwm = self.hwm
                # libzmq drops a peer whose message exceeds this; smaller oversize messages are
                # received and counted as "oversize" by the decoder.
                sock.maxmsgsize = 16 * self.max_bytes
                if kind == zmq.SUB:
                    sock.setsockopt(zmq.SUBSCRIBE, b"")
                if kind == zmq.XPUB:
                    sock.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscription, not only the first
                if self.curve is not None:
                    sock.curve_secretkey = self.curve.secret
                    sock.curve_publickey = self.curve.public
                    sock.curve_server = True
                    sock.zap_domain = ZAP_DOMAIN.encode()
                monitor = sock.get_monitor_socket(_MONITOR_EVENTS)
                socks.extend((sock, monitor))
                try:
                    sock.bind(endpoint)
                except zmq.ZMQError as exc:
                    raise RuntimeError(f"zmq.{role}: cannot bind {endpoint}: {exc}") from None
                self.endpoints[role] = sock.last_endpoint.decode()
                roles[role] = (sock, monitor)
            log.info("zmq bridge bound %s%s", self.endpoints, " (CURVE)" if self.curve else "")
        except BaseException as exc:
            self._error = exc
            self._io_ident = None
            for sock in socks:
                sock.close(linger=0)
            self._ready.set()
            return
        self._ready.set()
        self._last_decision.clear()
        try:
            self._supervise(pipe, roles)
        finally:
            self._xpub = None
            self._io_ident = None
            for role, (sock, _monitor) in roles.items():
                try:
                    sock.disable_monitor()
                except zmq.ZMQError:
                    pass
            xpub = roles.get("decisions", (None, None))[0]
            for sock in socks:
                # Decisions already queued (the controller's on-stop outputs) get a moment to leave.
                sock.close(linger=200 if sock is xpub else 0)

    RESTART_MIN_S = 0.5
    RESTART_MAX_S = 5.0

    def _supervise(self, pipe: zmq.Socket, roles: dict) -> None:
        """Run the I/O loop; after an unexpected exception log it (the first with its
        traceback, then rarely), count it, stay down for a capped back-off and run it again on
        the same sockets. Returns when the bridge stops."""
        delay = self.RESTART_MIN_S
        while self._running:
            try:
                self._loop(pipe, roles)
                return
            except Exception as exc:
                n = self.errors.inc("io_loop")
                if worth_logging(n):
                    log.error("zmq bridge: the I/O loop failed (%d so far); the streams it feeds fail safe, "
                              "restarting in %.1f s", n, delay, exc_info=exc)
            self._down = True
            deadline = time.monotonic() + delay
            while self._running and time.monotonic() < deadline:
                if pipe.poll(50, zmq.POLLIN) and pipe.recv()[:1] == _KIND_STOP:
                    return                                # decisions meanwhile are dropped: we are down
            delay = min(2 * delay, self.RESTART_MAX_S)
            self._n["restarts"] += 1
            self._down = False

    def _loop(self, pipe: zmq.Socket, roles: dict) -> None:
        sub = roles.get("sensors", (None, None))[0]
        xpub = roles.get("decisions", (None, None))[0]
        router = roles.get("control", (None, None))[0]
        poller, throttled = zmq.Poller(), zmq.Poller()   # throttled: the sensor socket left out
        monitors = {}
        for p in (poller, throttled):
            p.register(pipe, zmq.POLLIN)
            for role, (sock, monitor) in roles.items():
                if sock is not sub:
                    p.register(sock, zmq.POLLIN)
                p.register(monitor, zmq.POLLIN)
                monitors[monitor] = role
        if sub is not None:
            poller.register(sub, zmq.POLLIN)
        self._xpub = xpub
        disconnected = {role: 0 for role in roles}
        budget, window_end, next_idle = self.frames_per_window, 0, 0
        while self._running:
            now = time.monotonic_ns()
            if now >= window_end:
                window_end, budget = now + BUDGET_WINDOW_NS, self.frames_per_window
            if budget > 0:
                events = dict(poller.poll(1000))
            else:                                          # budget spent: wait for the next window
                events = dict(throttled.poll(max(1, (window_end - now) // 1_000_000)))
            if sub is not None and sub in events and budget > 0:
                budget = self._receive_sensors(sub, budget)
                if budget == 0:
                    self._n["throttled_windows"] += 1
            if pipe in events:
                for _ in range(1000):
                    try:
                        msg = pipe.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    kind = msg[:1]
                    if kind == _KIND_STOP:
                        return
                    if kind == _KIND_CYCLE:
                        self._send_cycle(msg)
                        continue
                    _, t0, n = _HANDOFF.unpack_from(msg)
                    start = _HANDOFF.size + n
                    self._send_decision(msg[_HANDOFF.size:start], msg[start:], t0)
            if xpub is not None and xpub in events:
                for _ in range(1000):
                    try:
                        sub_msg = xpub.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if sub_msg[:1] == b"\x01":  # a new subscription: catch the joiner up
                        for data in self._last_decision.values():
                            try:
                                xpub.send(data, zmq.NOBLOCK)
                            except zmq.Again:
                                self.errors.inc("publish_dropped")
            if router is not None and router in events:
                for _ in range(100):
                    try:
                        frames = router.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_control(router, frames)
            for monitor, role in monitors.items():
                if monitor in events:
                    self._on_monitor(monitor, role, disconnected)
            if now >= next_idle:
                next_idle = now + 1_000_000_000
                self._release_idle(now)

    def _receive_sensors(self, sub: zmq.Socket, budget: int) -> int:
        """Take up to ``budget`` sensor frames; returns what is left of it. Every 32 frames the
        interpreter is handed to any thread waiting for it (the control loop), so a burst never
        holds it for long."""
        while budget > 0:
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            budget -= 1
            self._on_sensor(frames)
            if budget & 31 == 0:
                time.sleep(0)
        return budget

    def _release_idle(self, now: int) -> None:
        """Forget the streams that sent nothing for ``stream_idle_s``."""
        with self._lock:
            idle = [s for s, f in self._frames.items() if now - f["rx_ns"] > self.stream_idle_ns]
            for stream in idle:
                del self._frames[stream]
                self._values.pop(stream, None)
                self._last_seq.pop(stream, None)
                if self.image is not None:
                    self.image.release(stream)
        for stream in idle:
            self._n["released_streams"] += 1
            log.info("zmq: stream %r released after %.0f s without frames", stream, self.stream_idle_ns / 1e9)

    def _send_cycle(self, msg: bytes) -> None:
        """I/O thread: a cycle's decisions from :meth:`write`, packed and sent stream by stream."""
        _, t0, seq, t_ns, latency_us, n = _CYCLE.unpack_from(msg)
        at = _CYCLE.size
        status = msg[at:at + n]
        cols = self._dcols
        k = len(cols)
        values = np.frombuffer(msg, np.float64, n * k, at + n).reshape(n, k).tolist()
        names = msg[at + n + 8 * n * k:].split(b"\0")
        for i in range(n):
            outputs = {c: v for c, v in zip(cols, values[i]) if v == v}
            try:
                data = messages.encode_decision(names[i].decode(), seq, t_ns, outputs, _STATUS_CODES[status[i]],
                                                latency_us, max_values=self.max_values)
            except ValueError as exc:
                if worth_logging(self.errors.inc("encode_failed")):
                    log.warning("zmq: a decision could not be packed: %s", exc)
                continue
            self._send_decision(names[i], data, t0)

    def _send_decision(self, stream: bytes, data: bytes, t0: int) -> None:
        """I/O thread: send a packed decision and keep it for late joiners."""
        xpub = self._xpub
        if xpub is not None:
            self._last_decision[stream] = data
            try:
                xpub.send(data, zmq.NOBLOCK)
                self._n["published"] += 1
            except zmq.Again:
                self.errors.inc("publish_dropped")
        self.publish_lat.add(time.perf_counter_ns() - t0)

    def _on_sensor(self, frames: list[bytes]) -> None:
        t0 = time.perf_counter_ns()
        if len(frames) != 1:
            self.bad.inc("multipart")
            return
        try:
            frame = messages.decode_sensor(frames[0], max_bytes=self.max_bytes, max_values=self.max_values)
        except MessageError as exc:
            self.bad.inc(exc.reason)
            log.debug("sensor frame dropped: %s", exc)
            return
        stream = frame["stream"]
        values = frame["values"]
        if self.streams is not None and stream not in self.streams:
            n = self.bad.inc("unknown_stream")
            if worth_logging(n):
                log.warning("zmq: frames for stream %r dropped: not one of [model] streams (%d so far)", stream, n)
            return
        if self.inputs is not None:
            unknown = [name for name in values if name not in self.inputs]
            if unknown:
                self.bad.inc("unknown_signal")
                for name in unknown:
                    del values[name]
                if not values:
                    return
        rx = time.monotonic_ns()
        frame["rx_ns"] = rx
        with self._lock:
            image = self.image
            if image is not None:
                r = image.row(stream)
                if r is None:
                    self.bad.inc("too_many_streams")
                    return
                index = image.index
                for name, value in values.items():
                    image.put(r, index[name], value, rx)
            else:
                per_stream = self._values.get(stream)
                if per_stream is None:
                    if len(self._frames) >= self.max_streams:
                        self.bad.inc("too_many_streams")
                        return
                    per_stream = self._values[stream] = {}
                for name, value in values.items():
                    per_stream[name] = (value, rx)
            self._frames[stream] = frame
        last = self._last_seq.get(stream)
        if last is not None and frame["seq"] != last + 1:
            self.errors.inc("seq_gaps")
        self._last_seq[stream] = frame["seq"]
        self._n["frames"] += 1
        self.io.add(time.perf_counter_ns() - t0)
        if self.on_input is not None:
            try:
                self.on_input(stream, frame)
            except Exception:
                self.errors.inc("callback_error")
                log.exception("zmq on_input callback failed")

    def _on_control(self, router: zmq.Socket, frames: list[bytes]) -> None:
        # ROUTER prepends the peer identity; REQ clients add an empty delimiter frame.
        if len(frames) == 2:
            envelope, payload = frames[:1], frames[1]
        elif len(frames) == 3 and frames[1] == b"":
            envelope, payload = frames[:2], frames[2]
        else:
            self.bad.inc("control_envelope")
            return
        self._n["requests"] += 1
        try:
            request = messages.decode_control(payload, max_bytes=min(self.max_bytes, 4096))
        except MessageError as exc:
            self.bad.inc(f"control_{exc.reason}")
            reply = {"v": 1, "ok": False, "error": str(exc)}
        else:
            reply = self._answer(request)
        try:
            router.send_multipart(envelope + [messages.encode_reply(reply)], zmq.NOBLOCK)
        except zmq.ZMQError:
            self.errors.inc("control_reply_dropped")

    def _answer(self, request: dict) -> dict:
        cmd = request["cmd"]
        if cmd in CHANGING_COMMANDS and not (self.authenticated_control or self.insecure_control):
            n = self.bad.inc("control_unauthenticated")
            if worth_logging(n):
                log.warning("zmq: %r refused from a client that is not CURVE-authenticated (%d so far)", cmd, n)
            return {"v": 1, "ok": False, "cmd": cmd,
                    "error": f"{cmd!r} changes behaviour: it is accepted only from CURVE-authenticated clients "
                             "([zmq] curve with allowed = a directory of client keys, see `r1edge keys`), or "
                             "over a plain socket with [zmq] insecure_control = true"}
        if cmd == "health":
            return {"v": 1, "ok": True, "cmd": cmd, "result": self.health()}
        if cmd == "mode":
            handler = self._mode_handler
            if handler is None:
                return {"v": 1, "ok": False, "cmd": cmd, "error": "no mode handler registered"}
            try:
                return {"v": 1, "ok": True, "cmd": cmd, "result": handler(request["stream"], request["mode"])}
            except (KeyError, ValueError) as exc:         # an unknown stream, no [mode] input
                self.bad.inc("control_refused")
                return {"v": 1, "ok": False, "cmd": cmd, "error": str(exc.args[0] if exc.args else exc)}
        provider = self._status_provider if cmd == "status" else self._stats_provider
        if provider is None:
            return {"v": 1, "ok": False, "cmd": cmd, "error": f"no {cmd} provider registered"}
        try:
            result = provider()
        except Exception as exc:
            self.errors.inc("provider_error")
            log.exception("control %s provider failed", cmd)
            return {"v": 1, "ok": False, "cmd": cmd, "error": f"{type(exc).__name__}: {exc}"}
        return {"v": 1, "ok": True, "cmd": cmd, "result": result}

    def _on_monitor(self, monitor: zmq.Socket, role: str, disconnected: dict) -> None:
        for _ in range(100):
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind = event["event"]
            if kind == zmq.EVENT_ACCEPTED:
                if disconnected[role]:
                    self._reconnects += 1
                self._peers[role].add(event["value"])
            elif kind == zmq.EVENT_DISCONNECTED:
                disconnected[role] += 1
                self._peers[role].discard(event["value"])
            elif kind in _HANDSHAKE_FAILURES:
                reason = _HANDSHAKE_FAILURES[kind]
                n = self.bad.inc(reason)
                if worth_logging(n):
                    log.warning("zmq.%s: %s from a peer (%d so far)", role, reason, n)


def _from_deploy(table: dict, wiring: Wiring) -> ZmqBridge:
    """``[zmq]`` -> bridge (the registry's factory)."""
    return ZmqBridge.from_config(table, wiring.base_dir, [s.name for s in wiring.inputs], streams=wiring.streams)


register("zmq", _from_deploy, lambda table, base: resolve_paths(table, base, "curve", ("secret_key", "allowed")))
