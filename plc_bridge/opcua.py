"""OPC UA server bridge on asyncua 2.1: the plant's SCADA or PLC writes inputs and reads or
subscribes to outputs, status, the heartbeat and the controller's statistics.

The bridge runs an asyncua server in its own asyncio thread. The controller's cycle talks to
it only through the :class:`~plc_bridge.bridge.Bridge` methods: :meth:`OpcUaBridge.snapshot`
copies a dict under a lock, :meth:`OpcUaBridge.publish` stores the decision and wakes the
server thread, which writes the new values into the address space (coalescing when it falls
behind). Neither waits on the network.

Address space, all string node ids in the ``namespace`` URI (``ns=<its index>;s=<id>``),
under ``Objects/r1edge``:

- ``<stream>.inputs.<name>``: Double, writable, an ``AnalogItemType`` with ``EURange`` (the
  configured ``[min, max]``) and ``EngineeringUnits`` (the signal's ``unit``, when given);
- ``<stream>.outputs.<name>``: Double, read-only, the same properties;
- ``<stream>.status``: String, ``"ok"``, ``"failsafe"`` or ``"hold"``;
- ``<stream>.mode``: String, ``"manual"``, ``"auto"`` or ``"warmup"``; an operator may write
  ``"manual"`` or ``"auto"`` (carried out by the controller's mode handler, as a ZeroMQ
  ``mode`` command; ``BadNotSupported`` without a ``[mode]`` input);
- ``heartbeat``: UInt16, the controller's output heartbeat (bumped every cycle, mod 65536);
- ``stats.<counter>``: UInt64 counters and Double latencies in seconds, refreshed once a
  second from the controller's statistics.

Writes to an input are screened before the library sees them: a session whose role is not
``operator`` gets ``BadUserAccessDenied`` for any write; a value of another type than
Double gets ``BadTypeMismatch``; NaN, +-inf or a value outside the input's configured range
gets ``BadOutOfRange``. A refused value does not change the node, but an out-of-range one
does reach the controller as that input's latest value, so the controller's input guard
fails the stream safe in its next cycle with the right reason (``nan``, ``inf`` or
``range``), exactly as a bad register written over Modbus would. Writes to any other node,
in any namespace, get ``BadNotWritable``. Every refusal is counted in
:meth:`OpcUaBridge.health` by reason.

An input's value counts as received when it is written, so a client must write every input
at least every ``stale_ms`` (rewriting an unchanged value), as a PLC does over Modbus.

Security (:mod:`plc_bridge.opcua_security`): the endpoint offers exactly the ``security``
policies listed (``"None"`` only when listed); a channel asking for another gets
``BadSecurityPolicyRejected``. For secured policies the server presents
``certificate``/``private_key`` and accepts only client application certificates found in
``trusted_clients``. With ``users`` sessions log in with a user name and password, or
anonymously with a client certificate mapped to a role in that file; without it, sessions
are anonymous operators. The users file and the trust list are re-read when they change.

Faults: the bridge's tasks run supervised (:meth:`OpcUaBridge._main`): a failure is logged,
counted and the task restarts after a capped back-off; ``health()["running"]`` is false
meanwhile. Logs: asyncua's per-request lines stay out of the operator's log and repeated
lines collapse (:func:`quiet_library_logs`).
"""
from __future__ import annotations

import asyncio
import datetime as _dt
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import NamedTuple, Sequence
from urllib.parse import urlparse

import numpy as np

from asyncua import Server, ua
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.address_space import AttributeService
from cryptography import x509

from .bridge import (DecisionImage, InputImage, Inputs, LoopThread, ModeHandler, Provider, Wiring, number_key,
                     refuse_unknown_keys, register)
from .messages import MAX_NAME_LEN
from .metrics import CollapsingLog, Counters, LatencyRing
from .opcua_security import Admission, GuardedServer, Login, certificate_uri, check_trusted, read_users

log = logging.getLogger(__name__)

_OPCUA_KEYS = frozenset(("endpoint", "namespace", "security", "certificate", "private_key", "trusted_clients",
                         "users", "streams", "stats_ms"))
#: Security policy names accepted in ``security`` -> asyncua's policy type.
#: The deprecated Basic128Rsa15 and Basic256 policies (SHA-1) are left out.
SECURITY_POLICIES = {"None": ua.SecurityPolicyType.NoSecurity,
                     **{t.name: t for t in ua.SecurityPolicyType if t.name.startswith(("Basic256Sha256", "Aes"))}}
#: The statistics published under ``stats.``: node name -> (path into ``stats()``, variant type).
STATS_NODES = {
    "cycles": (("cycles",), ua.VariantType.UInt64),
    "deadline_misses": (("deadline_misses",), ua.VariantType.UInt64),
    "skipped_ticks": (("skipped_ticks",), ua.VariantType.UInt64),
    "failsafe_cycles": (("failsafe_cycles",), ua.VariantType.UInt64),
    "held_cycles": (("held_cycles",), ua.VariantType.UInt64),
    "latency_p50_seconds": (("latency_us", "p50"), ua.VariantType.Double),
    "latency_p99_seconds": (("latency_us", "p99"), ua.VariantType.Double),
    "latency_max_seconds": (("latency_us", "max"), ua.VariantType.Double),
}
#: ``<stream>.mode`` values by the controller's ``_mode`` output (0, 1, 2).
MODE_NAMES = ("manual", "auto", "warmup")
# UNECE common code of the second ("SEC"), as OPC UA packs it into EUInformation.UnitId.
_UNECE_SECOND = (ord("S") << 16) | (ord("E") << 8) | ord("C")
_UNECE_URI = "http://www.opcfoundation.org/UA/units/un/cefact"


class _Forward(logging.Handler):
    """Hands asyncua's records (WARNING and above at the default level) to the operator's log
    as ``plc_bridge.opcua.asyncua`` lines naming the library's logger, repeats collapsed per
    message (and per first argument when it is a string, such as a status code's text)."""

    def __init__(self) -> None:
        super().__init__()
        self._say = CollapsingLog(logging.getLogger(f"{__name__}.asyncua"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            first = record.args[0] if isinstance(record.args, tuple) and record.args else None
            key = f"{record.name}|{record.msg}|{first if isinstance(first, str) else ''}"
            self._say.log(record.levelno, key, "%s: %s", record.name, record.getMessage(), exc_info=record.exc_info)
        except Exception:
            self.handleError(record)


def quiet_library_logs() -> None:
    """The log policy of the OPC UA bridge (idempotent): asyncua's per-request lines (INFO)
    stay out of the operator's log unless the root logger is at DEBUG (``r1edge -v``); its
    warnings and errors reach it collapsed (:class:`_Forward`). A deployment that configured
    the ``asyncua`` logger itself is left alone. The bridge's own repeated lines collapse
    through its ``_say`` (:class:`~plc_bridge.metrics.CollapsingLog`)."""
    for name in ("asyncua", "asyncuagds"):                # asyncua's trust store logs as asyncuagds
        lib = logging.getLogger(name)
        if lib.handlers or lib.level != logging.NOTSET or not lib.propagate:
            continue
        if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
            lib.setLevel(logging.WARNING)
        lib.addHandler(_Forward())
        lib.propagate = False


class Signal(NamedTuple):
    """One input or output as the address space shows it: range and engineering unit."""

    name: str
    min: float
    max: float
    unit: str | None = None


# ---------------------------------------------------------------------------- the bridge

class OpcUaBridge(LoopThread):
    """An OPC UA server for the streams listed in ``[opcua] streams`` (default ``["main"]``).

    A :class:`~plc_bridge.bridge.Bridge` (inputs of its streams come from client writes; it
    serves their decisions) and a :class:`~plc_bridge.bridge.Reporter` (its ``stats.`` nodes
    come from the stats provider the controller registers). See the module docstring for the
    address space, the write rules and security. Build it with :meth:`from_config`.
    """

    START_TIMEOUT_S = 60.0        # building the standard address space takes a few seconds
    JOIN_TIMEOUT_S = 10.0
    RELOAD_S = 1.0                # how often the users file and trust list are checked for changes

    name = "opcua"

    def __init__(self, *, endpoint: str, namespace: str, streams: Sequence[str], inputs: Sequence[Signal],
                 outputs: Sequence[Signal], security: Sequence[str], certificate: Path | None = None,
                 private_key: Path | None = None, trusted_clients: Path | None = None,
                 users: Path | None = None, stats_ms: float = 1000.0):
        self.endpoint = endpoint
        self.namespace = namespace
        self.streams = list(streams)
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.security = list(security)
        self.certificate, self.private_key, self.trusted_clients = certificate, private_key, trusted_clients
        self.stats_s = stats_ms / 1e3
        self.bad = Counters()       # client requests refused, by reason
        self.errors = Counters()    # our own trouble, by reason (a task's failures as "<task>_failed")
        self._init_thread(log)
        self.admission = Admission(users, trusted_clients, self.bad, self.errors, self._say)
        self.io = LatencyRing()     # an input write, from its screening to stored
        self.lock = threading.Lock()
        self._streams = frozenset(self.streams)
        # What clients wrote, per stream a row over the inputs (the server thread puts, the
        # controller's read() takes: see InputImage).
        self.image = InputImage([sig.name for sig in self.inputs], len(self.streams), self.lock)
        for stream in self.streams:
            self.image.row(stream)
        # The newest decision of each stream, a row over the outputs then _heartbeat and _mode
        # (NaN: not given): the loop's write() copies rows in, the server thread writes the
        # nodes of the rows marked pending (all of the given ones again after a restart).
        self._columns = [sig.name for sig in self.outputs] + ["_heartbeat", "_mode"]
        self._column = {name: j for j, name in enumerate(self._columns)}
        self._stream_row = {stream: k for k, stream in enumerate(self.streams)}
        self._rows = np.full((len(self.streams), len(self._columns)), np.nan)
        self._row_status = ["failsafe"] * len(self.streams)
        self._given = [False] * len(self.streams)
        self._pending: set[int] = set()
        self._source_columns: list[str] | None = None    # the decision image's columns ...
        self._take = np.zeros(len(self._columns), np.int64)   # ... where each of ours is in them
        self._absent = np.zeros(len(self._columns), bool)      # ... or not
        self._heartbeat: int | None = None
        self._wake_pending = False
        self._n = {"writes": 0, "published": 0, "mode_requests": 0}
        self._stats_provider: Provider | None = None
        self._server: Server | None = None
        self._ns = 0
        self._input_nodes: dict[ua.NodeId, tuple[str, Signal]] = {}
        self._output_nodes: dict[str, list[tuple[str, ua.NodeId]]] = {}
        self._status_nodes: dict[str, ua.NodeId] = {}
        self._mode_nodes: dict[ua.NodeId, str] = {}                 # <stream>.mode -> stream
        self._mode_handler: ModeHandler | None = None
        self._written: dict[ua.NodeId, object] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, opcua: dict, base_dir: str | os.PathLike, inputs: Sequence[Signal],
                    outputs: Sequence[Signal]) -> "OpcUaBridge":
        """Build from the deployment TOML's ``[opcua]`` table; relative paths resolve against
        ``base_dir``. ``inputs``/``outputs`` are the signals with their ranges and units.

        Keys: ``endpoint`` (``opc.tcp://HOST:PORT/PATH``, required), ``namespace`` (URI,
        default ``"urn:r1edge"``), ``security`` (list, default
        ``["Basic256Sha256_SignAndEncrypt"]``; any of ``"None"``, ``"Basic256Sha256_Sign"``,
        ``"Basic256Sha256_SignAndEncrypt"``, ``"Aes128Sha256RsaOaep_Sign[AndEncrypt]"``,
        ``"Aes256Sha256RsaPss_Sign[AndEncrypt]"``),
        ``certificate`` (DER) and ``private_key`` (PEM) and ``trusted_clients`` (a directory),
        all three required unless ``security = ["None"]``; ``users`` (a users file; without it
        sessions are anonymous); ``streams`` (default ``["main"]``); ``stats_ms`` (refresh of
        the ``stats.`` nodes, default 1000). Raises ``ValueError`` naming the key at fault,
        ``FileNotFoundError`` for a missing file.
        """
        if not isinstance(opcua, dict):
            raise ValueError("opcua: must be a table")
        refuse_unknown_keys(opcua, _OPCUA_KEYS, "opcua")
        endpoint = opcua.get("endpoint")
        url = urlparse(endpoint) if isinstance(endpoint, str) else None
        try:
            port = url.port if url is not None else None
        except ValueError:
            port = None
        if url is None or url.scheme != "opc.tcp" or not url.hostname or not port:
            raise ValueError(f"opcua.endpoint: {endpoint!r} is not an endpoint such as "
                             "'opc.tcp://127.0.0.1:4840/r1edge' (a port from 1 to 65535 is required)")
        namespace = opcua.get("namespace", "urn:r1edge")
        if not isinstance(namespace, str) or not namespace:
            raise ValueError(f"opcua.namespace: {namespace!r} is not a namespace URI")
        security = opcua.get("security", ["Basic256Sha256_SignAndEncrypt"])
        if (not isinstance(security, list) or not security
                or any(not isinstance(s, str) or s not in SECURITY_POLICIES for s in security)):
            raise ValueError(f"opcua.security: {security!r} must be a non-empty list of "
                             f"{', '.join(repr(s) for s in SECURITY_POLICIES)}")
        if len(set(security)) != len(security):
            raise ValueError(f"opcua.security: {security!r} lists a policy twice")
        streams = opcua.get("streams", ["main"])
        if (not isinstance(streams, list) or not streams
                or any(not isinstance(s, str) or not 0 < len(s) <= MAX_NAME_LEN or "." in s for s in streams)
                or len(set(streams)) != len(streams)):
            raise ValueError(f"opcua.streams: {streams!r} must be a list of distinct stream names "
                             f"(1..{MAX_NAME_LEN} characters, no '.')")
        stats_ms = number_key(opcua, "stats_ms", 1000, 10, 3_600_000, "opcua", unit="milliseconds")
        base = Path(base_dir)
        paths: dict[str, Path | None] = {}
        secured = security != ["None"]
        for key, kind in (("certificate", "file"), ("private_key", "file"), ("trusted_clients", "dir"),
                          ("users", "file")):
            value = opcua.get(key)
            if value is None:
                if secured and key != "users":
                    raise ValueError(f"opcua.{key}: required with security {security!r} "
                                     "(only security = [\"None\"] works without it)")
                paths[key] = None
                continue
            if not isinstance(value, str) or not value:
                raise ValueError(f"opcua.{key}: {value!r} is not a path")
            path = Path(value).expanduser()
            path = path if path.is_absolute() else (base / path).resolve()
            if not (path.is_dir() if kind == "dir" else path.is_file()):
                raise FileNotFoundError(f"opcua.{key}: {path}: no such {'directory' if kind == 'dir' else 'file'}")
            paths[key] = path
        if paths["trusted_clients"] is not None:
            check_trusted(paths["trusted_clients"])
        if paths["certificate"] is not None:
            try:
                x509.load_der_x509_certificate(paths["certificate"].read_bytes())
            except ValueError as exc:
                raise ValueError(f"opcua.certificate: {paths['certificate']}: not a DER certificate ({exc})") from None
        if paths["users"] is not None:
            if not secured:
                raise ValueError("opcua.users: user names and passwords travel only over secured channels; "
                                 "list a secured policy in security (e.g. \"Basic256Sha256_SignAndEncrypt\")")
            try:
                read_users(paths["users"])
            except ValueError as exc:
                raise ValueError(f"opcua.users: {exc}") from None
        for kind, signals in (("inputs", inputs), ("outputs", outputs)):
            for s in signals:
                if not (math.isfinite(s.min) and math.isfinite(s.max) and s.min < s.max):
                    raise ValueError(f"{kind} {s.name!r}: range [{s.min}, {s.max}] is not a finite interval")
        return cls(endpoint=endpoint, namespace=namespace, streams=streams, inputs=inputs, outputs=outputs,
                   security=security, certificate=paths["certificate"], private_key=paths["private_key"],
                   trusted_clients=paths["trusted_clients"], users=paths["users"], stats_ms=float(stats_ms))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "OpcUaBridge":
        """Start the server thread; returns once the endpoint listens (building the standard
        address space takes a few seconds). Raises ``RuntimeError`` if it cannot start.
        Applies the bridge's log policy first (:func:`quiet_library_logs`)."""
        quiet_library_logs()
        return self._start_thread("opcua-server")

    def _label(self) -> str:
        return f"opcua {self.endpoint}"

    # ------------------------------------------------------------------ controller side
    def serves(self, stream: str) -> bool:
        """True for the streams listed in ``[opcua] streams``."""
        return stream in self._streams

    def input_streams(self) -> list[str]:
        """Every configured stream, whether or not a client has written yet (so that a silent
        client shows as missing inputs)."""
        return self.streams

    bound_streams = input_streams

    def snapshot(self, stream: str = "main") -> Inputs:
        """``{input name: (value, write time time.monotonic_ns())}`` of every input written so
        far (refused values included, see the module docstring); ``{}`` for other streams."""
        row = self.image.rows.get(stream)
        if row is None:
            return {}
        with self.lock:
            return self.image.received(row)

    def read(self) -> InputImage:
        """The cycle's one read (see :meth:`~plc_bridge.bridge.Bridge.read`): every stream's
        inputs as clients wrote them, copied; whether the server's thread and tasks live."""
        img = self.image
        img.take()
        img.running = self._running()
        return img

    def write(self, decisions: DecisionImage) -> None:
        """The cycle's one write (see :meth:`~plc_bridge.bridge.Bridge.write`): each served
        stream's row of the image copied into this bridge's rows, for the server thread."""
        d = decisions
        if d.columns is not self._source_columns:
            self._take[:] = [d.index.get(name, 0) for name in self._columns]
            self._absent[:] = [name not in d.index for name in self._columns]
            self._source_columns = d.columns
        take, absent, rows = self._take, self._absent if self._absent.any() else None, self._rows
        given = False
        with self.lock:
            for i in range(d.n):
                k = self._stream_row.get(d.names[i])
                if k is not None:
                    np.take(d.values[i], take, out=rows[k])
                    if absent is not None:
                        rows[k, absent] = np.nan
                    self._row_status[k] = d.status[i]
                    self._mark_given_locked(k)
                    given = True
        if given:
            self._wake_writer()

    def publish(self, outputs: dict[str, float], status: str = "ok", seq: int = 0, latency_us: float = 0.0,
                stream: str = "main") -> None:
        """Hand one stream's decision to the server thread without blocking; its output,
        status and heartbeat nodes change as soon as that thread runs (only the newest
        decision per stream is written when it falls behind). ``_heartbeat`` in ``outputs``
        goes to the ``heartbeat`` node; names that are not outputs are ignored, and so is a
        value that is not a number (counted, ``errors["bad_value"]``). NaN means "not given",
        as in the decision image: that output's node keeps its value."""
        k = self._stream_row.get(stream)
        if k is None:
            raise ValueError(f"opcua bridge does not serve stream {stream!r} (it serves {self.streams})")
        with self.lock:
            row = self._rows[k]
            row.fill(np.nan)
            for name, value in outputs.items():
                j = self._column.get(name)
                if j is not None:
                    try:
                        row[j] = value
                    except (TypeError, ValueError, OverflowError):
                        self.errors.inc("bad_value")
            self._row_status[k] = status
            self._mark_given_locked(k)
        self._wake_writer()

    def _mark_given_locked(self, k: int) -> None:
        hb = self._rows[k, self._column["_heartbeat"]]
        if hb == hb:
            self._heartbeat = int(hb) & 0xFFFF
        self._given[k] = True
        self._pending.add(k)
        self._n["published"] += 1

    def _wake_writer(self) -> None:
        with self.lock:
            if self._wake_pending:
                return
            self._wake_pending = True
        self._wakeup()

    def set_stats_provider(self, fn: Provider | None) -> None:
        """Register the callable whose ``stats()`` map feeds the ``stats.`` nodes."""
        self._stats_provider = fn

    def set_mode_handler(self, fn: ModeHandler | None) -> None:
        """Register the callable that carries out a client's write of ``<stream>.mode``."""
        self._mode_handler = fn

    def set_status_provider(self, fn: Provider | None) -> None:
        """Accepted for the Reporter interface; stream status arrives with each publish."""

    def health(self) -> dict:
        """Endpoint, security, connected clients, writes and publishes, refused requests by
        reason (writes: ``type_mismatch``, ``out_of_range``, ``not_writable``, ``access_denied``,
        ``rejected``; sessions: see :class:`~plc_bridge.opcua_security.Admission`), errors by
        kind (``writer_failed``, ``stats_failed``, ``watch_failed`` for a supervised task that
        failed and was restarted), re-reads of the users file and the trust list, and the time
        in microseconds from an input write's screening to its value being stored. ``running``
        is false while any task is down (``down`` names them)."""
        server = self._server
        clients = len(server.bserver.clients) if server is not None and server.bserver is not None else 0
        users = self.admission.users
        return {
            "running": self._running(),
            "down": list(self.down_tasks()),
            "endpoint": self.endpoint,
            "security": list(self.security),
            "users": None if users is None else len(users.passwords),
            "connected": clients > 0,
            "clients": clients,
            "heartbeat_ok": True,
            "writes": self._n["writes"],
            "published": self._n["published"],
            "mode_requests": self._n["mode_requests"],
            "reloads": self.admission.reloads.snapshot(),
            "bad": self.bad.snapshot(),
            "errors": self.errors.snapshot(),
            "io_us": self.io.percentiles(),
        }

    # ------------------------------------------------------------------ server thread
    async def _main(self) -> None:
        """Start the server (a failure here is ``start()``'s to report), then run the writer, the
        stats refresh and the watch on the users file and trust list as supervised tasks
        (:meth:`~plc_bridge.bridge.LoopThread._spawn`: a failure is logged, counted and the task
        restarted after a capped back-off) until ``_stop``."""
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        server = self._server = await self._open()
        log.info("opcua server listening on %s (security %s, %s)", self.endpoint, ", ".join(self.security),
                 "anonymous sessions" if self.admission.users is None else "user names and mapped client certificates")
        if "None" in self.security:
            log.warning("opcua: security policy None is enabled: traffic on that endpoint is neither signed "
                        "nor encrypted")
        self.admission.warn_unroled()
        self._ready.set()
        for name, task in (("writer", self._writer), ("stats", self._stats_loop), ("watch", self._watch)):
            self._spawn(name, task)
        try:
            await self._stop.wait()
        finally:
            await self._cancel_tasks()
            self._server = None
            await server.stop()

    async def _open(self) -> GuardedServer:
        """Build the address space and start listening."""
        server = GuardedServer(self.admission)
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("r1edge")
        server.set_security_policy([SECURITY_POLICIES[s] for s in self.security])
        server.set_identity_tokens([ua.AnonymousIdentityToken] if self.admission.users is None
                                   else [ua.UserNameIdentityToken, ua.AnonymousIdentityToken])
        if self.certificate is not None:
            await server.load_certificate(str(self.certificate))
            await server.load_private_key(str(self.private_key))
            uri = certificate_uri(server.iserver.certificate)
            if uri:                                       # clients check the two agree
                await server.set_application_uri(uri)
        await self.admission.load()
        if self.trusted_clients is not None:
            server.set_certificate_validator(self.admission.validate)
        server.iserver.attribute_service = _ScreenedAttributes(server.iserver.aspace, self)
        self._ns = await server.register_namespace(self.namespace)
        await self._build(server)
        await server.start()
        return server

    async def _watch(self) -> None:
        """Re-reads the users file and the trusted-client directory when they change."""
        while True:
            await asyncio.sleep(self.RELOAD_S)
            await self.admission.refresh()

    async def _build(self, server: Server) -> None:
        """The address space of the module docstring."""
        ns = self._ns
        nid = lambda s: ua.NodeId(s, ns)                  # noqa: E731
        root = await server.nodes.objects.add_object(nid("r1edge"), ua.QualifiedName("r1edge", ns))
        for stream in self.streams:
            obj = await root.add_object(nid(stream), ua.QualifiedName(stream, ns))
            for kind, signals in (("inputs", self.inputs), ("outputs", self.outputs)):
                folder = await obj.add_object(nid(f"{stream}.{kind}"), ua.QualifiedName(kind, ns))
                for sig in signals:
                    node_id = nid(f"{stream}.{kind}.{sig.name}")
                    await _add_analog(server, folder.nodeid, node_id, ua.QualifiedName(sig.name, ns), sig,
                                      writable=kind == "inputs")
                    if kind == "inputs":
                        self._input_nodes[node_id] = (stream, sig)
                    else:
                        self._output_nodes.setdefault(stream, []).append((sig.name, node_id))
            status = await obj.add_variable(nid(f"{stream}.status"), ua.QualifiedName("status", ns), "",
                                            varianttype=ua.VariantType.String)
            self._status_nodes[stream] = status.nodeid
            mode = await obj.add_variable(nid(f"{stream}.mode"), ua.QualifiedName("mode", ns), "",
                                          varianttype=ua.VariantType.String)
            await mode.set_writable()
            self._mode_nodes[mode.nodeid] = stream
        await root.add_variable(nid("heartbeat"), ua.QualifiedName("heartbeat", ns), 0,
                                varianttype=ua.VariantType.UInt16)
        stats = await root.add_object(nid("stats"), ua.QualifiedName("stats", ns))
        for name, (_, vtype) in STATS_NODES.items():
            var = await stats.add_variable(nid(f"stats.{name}"), ua.QualifiedName(name, ns),
                                           0.0 if vtype == ua.VariantType.Double else 0, varianttype=vtype)
            if name.endswith("_seconds"):
                await var.add_property(nid(f"stats.{name}.EngineeringUnits"), ua.QualifiedName("EngineeringUnits", 0),
                                       _eu("s", _UNECE_SECOND), datatype=ua.NodeId(ua.ObjectIds.EUInformation))

    async def _writer(self) -> None:
        """Writes the newest decisions into the address space whenever publish() wakes it."""
        server, wake = self._server, self._wake
        hb_node = ua.NodeId("heartbeat", self._ns)
        with self.lock:                                   # a restarted writer writes the newest decisions,
            self._pending = {k for k, given in enumerate(self._given) if given}   # every node of them again
        self._written.clear()
        wake.set()
        while True:
            await wake.wait()
            wake.clear()
            with self.lock:
                pending, self._pending = sorted(self._pending), set()
                decided = [(self.streams[k], self._rows[k].tolist(), self._row_status[k]) for k in pending]
                hb = self._heartbeat
                self._wake_pending = False
            now = _dt.datetime.now(_dt.timezone.utc)
            column = self._column
            try:
                for stream, row, status in decided:
                    for name, node_id in self._output_nodes[stream]:
                        value = row[column[name]]
                        if value == value:
                            await self._write(server, node_id, ua.Variant(value, ua.VariantType.Double), now)
                    await self._write(server, self._status_nodes[stream], ua.Variant(status, ua.VariantType.String), now)
                    mode = row[column["_mode"]]
                    if 0 <= mode < len(MODE_NAMES):
                        await self._write(server, ua.NodeId(f"{stream}.mode", self._ns),
                                          ua.Variant(MODE_NAMES[int(mode)], ua.VariantType.String), now)
                if hb is not None:
                    await self._write(server, hb_node, ua.Variant(hb, ua.VariantType.UInt16), now)
            except (ua.UaError, ValueError, TypeError, OverflowError) as exc:   # one bad value: the next goes on
                n = self.errors.inc("write_failed")
                self._say.log(logging.ERROR, "write_failed", "opcua: writing outputs failed (%d so far): %s", n, exc)

    async def _write(self, server: Server, node_id: ua.NodeId, variant: ua.Variant, now) -> None:
        if self._written.get(node_id) == variant.Value:   # unchanged: no data change to notify
            return
        self._written[node_id] = variant.Value
        await server.write_attribute_value(node_id, ua.DataValue(variant, SourceTimestamp=now, ServerTimestamp=now))

    async def _stats_loop(self) -> None:
        """Refreshes the ``stats.`` nodes from the stats provider every ``stats_ms``."""
        server = self._server
        while True:
            provider = self._stats_provider
            if provider is not None:
                try:
                    stats = provider()
                    now = _dt.datetime.now(_dt.timezone.utc)
                    for name, (path, vtype) in STATS_NODES.items():
                        value = stats
                        for key in path:
                            value = value[key]
                        value = value / 1e6 if vtype == ua.VariantType.Double else int(value)
                        await self._write(server, ua.NodeId(f"stats.{name}", self._ns), ua.Variant(value, vtype), now)
                except Exception as exc:                  # the provider is the controller's: never fatal here
                    n = self.errors.inc("stats_provider")
                    self._say.log(logging.ERROR, "stats_provider", "opcua: the stats provider failed (%d so far): %s",
                                  n, exc)
            await asyncio.sleep(self.stats_s)

    # ------------------------------------------------------------------ client writes
    def _screen(self, wv: ua.WriteValue) -> ua.StatusCode | None:
        """The status code refusing a client's write, or None to let the library apply it."""
        target = self._input_nodes.get(wv.NodeId)
        if target is None and wv.NodeId in self._mode_nodes and wv.AttributeId == ua.AttributeIds.Value:
            return self._switch_mode(self._mode_nodes[wv.NodeId], wv)
        if target is None:                                # clients write inputs only, in any namespace
            return self._refuse("not_writable", ua.StatusCodes.BadNotWritable)
        if wv.AttributeId != ua.AttributeIds.Value:
            return self._refuse("not_writable", ua.StatusCodes.BadNotWritable)
        variant = wv.Value.Value if wv.Value is not None else None
        if variant is None or variant.VariantType != ua.VariantType.Double or variant.is_array:
            return self._refuse("type_mismatch", ua.StatusCodes.BadTypeMismatch)
        value = float(variant.Value)
        stream, sig = target
        if math.isfinite(value) and sig.min <= value <= sig.max:
            return None
        with self.lock:                                   # the controller sees it and fails safe
            self.image.put(self.image.rows[stream], self.image.index[sig.name], value, time.monotonic_ns())
        return self._refuse("out_of_range", ua.StatusCodes.BadOutOfRange)

    def _switch_mode(self, stream: str, wv: ua.WriteValue) -> ua.StatusCode:
        """A client's write of ``<stream>.mode``: "manual" or "auto", carried out by the mode
        handler (the node then shows the mode the controller publishes, ``warmup`` included)."""
        variant = wv.Value.Value if wv.Value is not None else None
        if variant is None or variant.VariantType != ua.VariantType.String or variant.is_array:
            return self._refuse("type_mismatch", ua.StatusCodes.BadTypeMismatch)
        if variant.Value not in ("manual", "auto"):
            return self._refuse("out_of_range", ua.StatusCodes.BadOutOfRange)
        handler = self._mode_handler
        if handler is None:
            return self._refuse("not_writable", ua.StatusCodes.BadNotWritable)
        try:
            handler(stream, variant.Value)
        except ValueError:                                # no [mode] input configured
            return self._refuse("mode_unsupported", ua.StatusCodes.BadNotSupported)
        except KeyError:                                  # the stream has not run yet
            return self._refuse("mode_too_early", ua.StatusCodes.BadWaitingForInitialData)
        with self.lock:
            self._n["mode_requests"] += 1
        return ua.StatusCode(ua.StatusCodes.Good)

    def _accepted(self, wv: ua.WriteValue, t0: int) -> None:
        stream, sig = self._input_nodes[wv.NodeId]
        now = time.monotonic_ns()
        with self.lock:
            self.image.put(self.image.rows[stream], self.image.index[sig.name], float(wv.Value.Value.Value), now)
            self._n["writes"] += 1
        self.io.add(time.monotonic_ns() - t0)

    def _refuse(self, reason: str, code: int) -> ua.StatusCode:
        n = self.bad.inc(reason)
        self._say.warning(reason, "opcua: write refused: %s (%d so far)", reason, n)
        return ua.StatusCode(code)


class _ScreenedAttributes(AttributeService):
    """asyncua's attribute service with the bridge's screening in front of every client's
    write: a session whose role is not ``operator`` may write nothing (``BadUserAccessDenied``),
    an operator only the inputs' values (anything else ``BadNotWritable``)."""

    def __init__(self, aspace, bridge: OpcUaBridge):
        super().__init__(aspace)
        self._bridge = bridge

    async def write(self, params: ua.WriteParameters, user: User = User(role=UserRole.Admin)) -> list[ua.StatusCode]:
        bridge = self._bridge
        if not isinstance(user, Login):                   # the server's own writes (its namespace array, ...)
            return await super().write(params, user)
        if user.access != "operator":
            return [bridge._refuse("access_denied", ua.StatusCodes.BadUserAccessDenied) for _ in params.NodesToWrite]
        results = []
        for wv in params.NodesToWrite:
            t0 = time.monotonic_ns()
            code = bridge._screen(wv)
            if code is None:
                [code] = await super().write(ua.WriteParameters(NodesToWrite=[wv]), user)
                if code.is_good() and wv.NodeId in bridge._input_nodes:
                    bridge._accepted(wv, t0)
                elif not code.is_good():                  # refused by the library: counted all the same
                    bridge._refuse("not_writable" if code.value == ua.StatusCodes.BadNotWritable else "rejected",
                                   code.value)
            results.append(code)
        return results


def _eu(unit: str, unit_id: int = -1) -> ua.EUInformation:
    return ua.EUInformation(NamespaceUri=_UNECE_URI if unit_id != -1 else "", UnitId=unit_id,
                            DisplayName=ua.LocalizedText(unit), Description=ua.LocalizedText(unit))


async def _add_analog(server: Server, parent: ua.NodeId, node_id: ua.NodeId, bname: ua.QualifiedName,
                      sig: Signal, *, writable: bool) -> None:
    """A Double ``AnalogItemType`` variable with its ``EURange`` and, for a signal with a
    unit, ``EngineeringUnits`` properties."""
    attrs = ua.VariableAttributes()
    attrs.DisplayName = ua.LocalizedText(sig.name)
    attrs.Description = ua.LocalizedText(f"{sig.name} [{sig.min:g}, {sig.max:g}]" + (f" {sig.unit}" if sig.unit else ""))
    attrs.DataType = ua.NodeId(ua.ObjectIds.Double)
    attrs.ValueRank = ua.ValueRank.Scalar
    attrs.Value = ua.Variant(0.0, ua.VariantType.Double)
    level = ua.AccessLevel.CurrentRead.mask | (ua.AccessLevel.CurrentWrite.mask if writable else 0)
    attrs.AccessLevel = attrs.UserAccessLevel = level
    item = ua.AddNodesItem(ParentNodeId=parent, ReferenceTypeId=ua.NodeId(ua.ObjectIds.HasComponent),
                           RequestedNewNodeId=node_id, BrowseName=bname, NodeClass=ua.NodeClass.Variable,
                           NodeAttributes=attrs, TypeDefinition=ua.NodeId(ua.ObjectIds.AnalogItemType))
    [result] = await server.iserver.isession.add_nodes([item])
    result.StatusCode.check()
    var = server.get_node(node_id)
    ns = node_id.NamespaceIndex
    await var.add_property(ua.NodeId(f"{node_id.Identifier}.EURange", ns), ua.QualifiedName("EURange", 0),
                           ua.Range(Low=sig.min, High=sig.max), datatype=ua.NodeId(ua.ObjectIds.Range))
    if sig.unit:
        await var.add_property(ua.NodeId(f"{node_id.Identifier}.EngineeringUnits", ns),
                               ua.QualifiedName("EngineeringUnits", 0), _eu(sig.unit),
                               datatype=ua.NodeId(ua.ObjectIds.EUInformation))


def _from_deploy(table: dict, wiring: Wiring) -> OpcUaBridge:
    """``[opcua]`` -> bridge (the registry's factory): every input is a writable node, every
    output but the internal ``_heartbeat``/``_mode`` a read-only one."""
    bridge = OpcUaBridge.from_config(
        table, wiring.base_dir, [Signal(s.name, s.min, s.max, s.unit) for s in wiring.inputs],
        [Signal(s.name, s.min, s.max, s.unit) for s in wiring.outputs if not s.name.startswith("_")])
    return bridge


register("opcua", _from_deploy)
