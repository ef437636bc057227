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
- ``heartbeat``: UInt16, the controller's output heartbeat (bumped every cycle, mod 65536);
- ``stats.<counter>``: UInt64 counters and Double latencies in seconds, refreshed once a
  second from the controller's statistics.

Writes to an input are screened before the library sees them: a value of another type than
Double gets ``BadTypeMismatch``; NaN, +-inf or a value outside the input's configured range
gets ``BadOutOfRange``. A refused value does not change the node, but it does reach the
controller as that input's latest value, so the controller's input guard fails the stream
safe in its next cycle with the right reason (``nan``, ``inf`` or ``range``), exactly as a
bad register written over Modbus would. Writes to any other node of the namespace get
``BadNotWritable``. Every refusal is counted in :meth:`OpcUaBridge.health` by reason.

An input's value counts as received when it is written, so a client must write every input
at least every ``stale_ms`` (rewriting an unchanged value), as a PLC does over Modbus.

Security: the endpoint offers exactly the ``security`` policies listed (``"None"`` only when
listed). For secured policies the server presents ``certificate``/``private_key`` and accepts
only client application certificates found in ``trusted_clients`` (a directory of DER or PEM
files): the check runs on the certificate sent in CreateSession and again, at ActivateSession,
on the one the secure channel was opened with. With ``users`` (a TOML file, see
:func:`hash_password`), sessions must log in with a user name and password; without it,
sessions are anonymous (still limited to trusted client certificates on secured endpoints).
"""
from __future__ import annotations

import asyncio
import base64
import datetime as _dt
import hashlib
import hmac
import logging
import math
import os
import re
import secrets
import threading
import time
from pathlib import Path
from typing import NamedTuple, Sequence
from urllib.parse import urlparse

from asyncua import Server, ua
from asyncua.common.utils import ServiceError
from asyncua.crypto import cert_gen, uacrypto
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from asyncua.server.address_space import AttributeService
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from .bridge import InputImage, Inputs, LoopThread, Provider, SnapshotBridge, Wiring, register
from .messages import MAX_NAME_LEN
from .metrics import Counters, LatencyRing, worth_logging

try:
    import tomllib
except ModuleNotFoundError:                               # Python 3.10
    import tomli as tomllib

log = logging.getLogger(__name__)

_OPCUA_KEYS = frozenset(("endpoint", "namespace", "security", "certificate", "private_key", "trusted_clients",
                         "users", "streams", "stats_ms"))
#: Security policy names accepted in ``security`` -> asyncua's policy type.
#: The deprecated Basic128Rsa15 and Basic256 policies (SHA-1) are left out.
SECURITY_POLICIES = {"None": ua.SecurityPolicyType.NoSecurity,
                     **{t.name: t for t in ua.SecurityPolicyType if t.name.startswith(("Basic256Sha256", "Aes"))}}
_USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@\-]{0,63}$")
#: scrypt cost of new password hashes: 16 MiB and about 50 ms per check.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1
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
# UNECE common code of the second ("SEC"), as OPC UA packs it into EUInformation.UnitId.
_UNECE_SECOND = (ord("S") << 16) | (ord("E") << 8) | ord("C")
_UNECE_URI = "http://www.opcfoundation.org/UA/units/un/cefact"


class Signal(NamedTuple):
    """One input or output as the address space shows it: range and engineering unit."""

    name: str
    min: float
    max: float
    unit: str | None = None


# ---------------------------------------------------------------------------- users and passwords

def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """A salted scrypt hash of ``password`` as stored in the users file:
    ``scrypt$N$r$p$<salt, base64>$<key, base64>`` (16 random salt bytes per hash, 32-byte key)."""
    if not password:
        raise ValueError("the password is empty")
    salt = secrets.token_bytes(16) if salt is None else salt
    key = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    b64 = lambda b: base64.b64encode(b).decode()              # noqa: E731
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt)}${b64(key)}"


def verify_password(stored: str, password: str) -> bool:
    """Whether ``password`` matches a hash made by :func:`hash_password` (constant-time compare)."""
    n, r, p, salt, key = _parse_hash(stored)
    got = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=len(key), maxmem=256 * r * n + (1 << 20))
    return hmac.compare_digest(got, key)


def _parse_hash(stored: str) -> tuple[int, int, int, bytes, bytes]:
    parts = stored.split("$") if isinstance(stored, str) else []
    try:
        if len(parts) != 6 or parts[0] != "scrypt":
            raise ValueError
        n, r, p = (int(x) for x in parts[1:4])
        salt, key = base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5], validate=True)
    except ValueError:
        raise ValueError("not a password hash of the form scrypt$N$r$p$SALT$KEY") from None
    if not (1 < n <= 1 << 20 and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16 and len(salt) >= 8
            and len(key) >= 16):
        raise ValueError(f"scrypt parameters out of bounds (N={n}, r={r}, p={p}, salt {len(salt)} B, "
                         f"key {len(key)} B)")
    return n, r, p, salt, key


def read_users(path: str | os.PathLike) -> dict[str, str]:
    """``{user name: password hash}`` from a users file::

        [users.operator]
        password = "scrypt$16384$8$1$...$..."

    Raises ``ValueError`` naming the file and the entry at fault."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such users file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: invalid TOML: {exc}") from None
    unknown = sorted(set(raw) - {"users"})
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; expected [users.NAME] tables")
    users = raw.get("users", {})
    if not isinstance(users, dict):
        raise ValueError(f"{path}: users must be a table of [users.NAME] entries")
    out = {}
    for name, entry in users.items():
        if not _USER_RE.match(name):
            raise ValueError(f"{path}: users.{name}: not a user name (letters, digits, '_', '.', '@', '-')")
        if not isinstance(entry, dict) or set(entry) != {"password"}:
            raise ValueError(f"{path}: users.{name}: must hold exactly one key, password")
        try:
            _parse_hash(entry["password"])
        except ValueError as exc:
            raise ValueError(f"{path}: users.{name}.password: {exc}") from None
        out[name] = entry["password"]
    return out


def set_user(path: str | os.PathLike, name: str, password: str | None) -> None:
    """Add or replace user ``name`` in a users file (created if absent), or remove it with
    ``password=None``. The file is rewritten whole and made readable by its owner only."""
    path = Path(path)
    if not _USER_RE.match(name):
        raise ValueError(f"{name!r} is not a user name (letters, digits, '_', '.', '@', '-'; at most 64)")
    users = read_users(path) if path.exists() else {}
    if password is None:
        if name not in users:
            raise ValueError(f"{path}: no user {name!r}")
        del users[name]
    else:
        users[name] = hash_password(password)
    lines = ["# r1edge OPC UA users: scrypt$N$r$p$salt$key, written by `r1edge opcua-user`\n"]
    for user, stored in sorted(users.items()):
        lines.append(f'\n[users."{user}"]\npassword = "{stored}"\n')
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(lines))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- certificates

def make_certificate(out_dir: str | os.PathLike, name: str = "server", *, uri: str | None = None,
                     hosts: Sequence[str] = ("localhost", "127.0.0.1"), client: bool = False,
                     days: int = 365) -> tuple[Path, Path]:
    """Write a self-signed OPC UA application certificate ``NAME.der`` and its private key
    ``NAME.pem`` (owner-only) into ``out_dir``; refuses to overwrite. ``uri`` is the
    application URI put in the certificate (default ``urn:r1edge:NAME``); ``hosts`` go into
    its subject alternative names as DNS names or IP addresses. A server certificate is
    for server and client authentication, ``client=True`` for client authentication only."""
    import ipaddress

    out = Path(out_dir)
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"certificate name {name!r} must be a plain file name")
    cert_file, key_file = out / f"{name}.der", out / f"{name}.pem"
    for path in (cert_file, key_file):
        if path.exists():
            raise FileExistsError(f"{path} exists; not overwriting")
    uri = uri or f"urn:r1edge:{name}"
    alt: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
    for host in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt.append(x509.DNSName(host))
    usage = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [ExtendedKeyUsageOID.SERVER_AUTH,
                                                              ExtendedKeyUsageOID.CLIENT_AUTH]
    key = cert_gen.generate_private_key()
    cert = cert_gen.generate_self_signed_app_certificate(key, name, {}, alt, extended=usage, days=days)
    out.mkdir(parents=True, exist_ok=True)
    cert_file.write_bytes(uacrypto.der_from_x509(cert))
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(cert_gen.dump_private_key_as_pem(key))
    return cert_file, key_file


def _check_trusted(folder: Path) -> None:
    """Every ``*.der``/``*.pem`` file in ``folder`` must be a certificate (the trust store reads
    them all): a private key left there would otherwise stop the server at start."""
    for path in sorted(folder.iterdir()):
        if not re.match(r".*(der|pem)$", path.name.lower()):
            continue
        data = path.read_bytes()
        try:
            if path.name.lower().endswith("pem"):
                x509.load_pem_x509_certificate(data)
            else:
                x509.load_der_x509_certificate(data)
        except ValueError as exc:
            raise ValueError(f"opcua.trusted_clients: {path}: not a certificate ({exc})") from None


def _certificate_uri(cert: x509.Certificate) -> str | None:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


# ---------------------------------------------------------------------------- the bridge

class OpcUaBridge(SnapshotBridge, LoopThread):
    """An OPC UA server for the streams listed in ``[opcua] streams`` (default ``["main"]``).

    A :class:`~plc_bridge.bridge.Bridge` (inputs of its streams come from client writes; it
    serves their decisions) and a :class:`~plc_bridge.bridge.Reporter` (its ``stats.`` nodes
    come from the stats provider the controller registers). See the module docstring for the
    address space, the write rules and security. Build it with :meth:`from_config`.
    """

    START_TIMEOUT_S = 60.0        # building the standard address space takes a few seconds
    JOIN_TIMEOUT_S = 10.0

    name = "opcua"

    def __init__(self, *, endpoint: str, namespace: str, streams: Sequence[str], inputs: Sequence[Signal],
                 outputs: Sequence[Signal], security: Sequence[str], certificate: Path | None = None,
                 private_key: Path | None = None, trusted_clients: Path | None = None,
                 users: dict[str, str] | None = None, stats_ms: float = 1000.0):
        self.endpoint = endpoint
        self.namespace = namespace
        self.streams = list(streams)
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.security = list(security)
        self.certificate, self.private_key, self.trusted_clients = certificate, private_key, trusted_clients
        self.users = users
        self.stats_s = stats_ms / 1e3
        self.bad = Counters()       # client requests refused, by reason
        self.errors = Counters()    # our own trouble, by reason
        self.io = LatencyRing()     # an input write, from its screening to stored
        self.lock = threading.Lock()
        self._streams = frozenset(self.streams)
        self._values: dict[str, dict[str, tuple[float, int]]] = {s: {} for s in self.streams}
        self._pending: dict[str, tuple[dict[str, float], str]] = {}
        self._heartbeat: int | None = None
        self._wake_pending = False
        self._n = {"writes": 0, "published": 0}
        self._stats_provider: Provider | None = None
        self._trust: TrustStore | None = None
        self._init_thread()
        self._server: Server | None = None
        self._ns = 0
        self._input_nodes: dict[ua.NodeId, tuple[str, Signal]] = {}
        self._output_nodes: dict[str, list[tuple[str, ua.NodeId]]] = {}
        self._status_nodes: dict[str, ua.NodeId] = {}
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
        unknown = sorted(set(opcua) - _OPCUA_KEYS)
        if unknown:
            raise ValueError(f"opcua: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_OPCUA_KEYS))}")
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
        if (not isinstance(streams, list) or not streams or len(set(streams)) != len(streams)
                or any(not isinstance(s, str) or not 0 < len(s) <= MAX_NAME_LEN or "." in s for s in streams)):
            raise ValueError(f"opcua.streams: {streams!r} must be a list of distinct stream names "
                             f"(1..{MAX_NAME_LEN} characters, no '.')")
        stats_ms = opcua.get("stats_ms", 1000)
        if isinstance(stats_ms, bool) or not isinstance(stats_ms, (int, float)) or not 10 <= stats_ms <= 3_600_000:
            raise ValueError(f"opcua.stats_ms: {stats_ms!r} is not a number of milliseconds in 10..3600000")
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
            _check_trusted(paths["trusted_clients"])
        if paths["certificate"] is not None:
            try:
                x509.load_der_x509_certificate(paths["certificate"].read_bytes())
            except ValueError as exc:
                raise ValueError(f"opcua.certificate: {paths['certificate']}: not a DER certificate ({exc})") from None
        users = None
        if paths["users"] is not None:
            try:
                users = read_users(paths["users"])
            except ValueError as exc:
                raise ValueError(f"opcua.users: {exc}") from None
        for kind, signals in (("inputs", inputs), ("outputs", outputs)):
            for s in signals:
                if not (math.isfinite(s.min) and math.isfinite(s.max) and s.min < s.max):
                    raise ValueError(f"{kind} {s.name!r}: range [{s.min}, {s.max}] is not a finite interval")
        return cls(endpoint=endpoint, namespace=namespace, streams=streams, inputs=inputs, outputs=outputs,
                   security=security, certificate=paths["certificate"], private_key=paths["private_key"],
                   trusted_clients=paths["trusted_clients"], users=users, stats_ms=float(stats_ms))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "OpcUaBridge":
        """Start the server thread; returns once the endpoint listens (building the standard
        address space takes a few seconds). Raises ``RuntimeError`` if it cannot start."""
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

    def snapshot(self, stream: str = "main") -> Inputs:
        """``{input name: (value, write time time.monotonic_ns())}`` of every input written so
        far (refused values included, see the module docstring); ``{}`` for other streams."""
        values = self._values.get(stream)
        if values is None:
            return {}
        with self.lock:
            return dict(values)

    def publish(self, outputs: dict[str, float], status: str = "ok", seq: int = 0, latency_us: float = 0.0,
                stream: str = "main") -> None:
        """Hand one stream's decision to the server thread without blocking; its output,
        status and heartbeat nodes change as soon as that thread runs (only the newest
        decision per stream is written when it falls behind). ``_heartbeat`` in ``outputs``
        goes to the ``heartbeat`` node; names that are not outputs are ignored."""
        if stream not in self._streams:
            raise ValueError(f"opcua bridge does not serve stream {stream!r} (it serves {self.streams})")
        with self.lock:
            self._pending[stream] = (outputs, status)
            hb = outputs.get("_heartbeat")
            if hb is not None:
                self._heartbeat = int(hb) & 0xFFFF
            self._n["published"] += 1
            if self._wake_pending:
                return
            self._wake_pending = True
        self._wakeup()

    def set_stats_provider(self, fn: Provider | None) -> None:
        """Register the callable whose ``stats()`` map feeds the ``stats.`` nodes."""
        self._stats_provider = fn

    def set_status_provider(self, fn: Provider | None) -> None:
        """Accepted for the Reporter interface; stream status arrives with each publish."""

    def health(self) -> dict:
        """Endpoint, security, connected clients, writes and publishes, refused requests by
        reason (``type_mismatch``, ``out_of_range``, ``not_writable``, ``unknown_user``,
        ``bad_password``, ``untrusted_certificate``), errors, and the time in microseconds from
        an input write's screening to its value being stored."""
        server = self._server
        clients = len(server.bserver.clients) if server is not None and server.bserver is not None else 0
        return {
            "running": self._io_running(),
            "endpoint": self.endpoint,
            "security": list(self.security),
            "users": None if self.users is None else len(self.users),
            "connected": clients > 0,
            "clients": clients,
            "heartbeat_ok": True,
            "writes": self._n["writes"],
            "published": self._n["published"],
            "bad": self.bad.snapshot(),
            "errors": self.errors.snapshot(),
            "io_us": self.io.percentiles(),
        }

    # ------------------------------------------------------------------ server thread
    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        server = Server(user_manager=_UserManager(self))
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("r1edge")
        server.set_security_policy([SECURITY_POLICIES[s] for s in self.security])
        server.set_identity_tokens([ua.UserNameIdentityToken] if self.users is not None
                                   else [ua.AnonymousIdentityToken])
        if self.certificate is not None:
            await server.load_certificate(str(self.certificate))
            await server.load_private_key(str(self.private_key))
            uri = _certificate_uri(server.iserver.certificate)
            if uri:                                       # clients check the two agree
                await server.set_application_uri(uri)
        if self.trusted_clients is not None:
            store = TrustStore([self.trusted_clients], [])
            await store.load()
            self._trust = store
            validator = CertificateValidator(CertificateValidatorOptions.TRUSTED_VALIDATION
                                             | CertificateValidatorOptions.PEER_CLIENT, store)
            server.set_certificate_validator(self._counting(validator))
        server.iserver.attribute_service = _ScreenedAttributes(server.iserver.aspace, self)
        self._ns = await server.register_namespace(self.namespace)
        await self._build(server)
        await server.start()
        self._server = server
        log.info("opcua server listening on %s (security %s, %s)", self.endpoint, ", ".join(self.security),
                 "user names" if self.users is not None else "anonymous sessions")
        if "None" in self.security:
            log.warning("opcua: security policy None is enabled: traffic on that endpoint is neither signed "
                        "nor encrypted")
        writer = asyncio.create_task(self._writer())
        stats = asyncio.create_task(self._stats_loop())
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            for task in (writer, stats):
                task.cancel()
            await asyncio.gather(writer, stats, return_exceptions=True)
            self._server = None
            await server.stop()

    def _counting(self, validator: CertificateValidator):
        async def validate(cert: x509.Certificate, app: ua.ApplicationDescription) -> None:
            try:
                await validator(cert, app)
            except ServiceError:
                n = self.bad.inc("untrusted_certificate")
                if worth_logging(n):
                    log.warning("opcua: client certificate refused (%s; %d so far)", cert.subject.rfc4514_string(), n)
                raise
        return validate

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
        while True:
            await wake.wait()
            wake.clear()
            with self.lock:
                pending, self._pending = self._pending, {}
                hb = self._heartbeat
                self._wake_pending = False
            now = _dt.datetime.now(_dt.timezone.utc)
            try:
                for stream, (outputs, status) in pending.items():
                    for name, node_id in self._output_nodes[stream]:
                        value = outputs.get(name)
                        if value is not None:
                            await self._write(server, node_id, ua.Variant(float(value), ua.VariantType.Double), now)
                    await self._write(server, self._status_nodes[stream], ua.Variant(status, ua.VariantType.String), now)
                if hb is not None:
                    await self._write(server, hb_node, ua.Variant(hb, ua.VariantType.UInt16), now)
            except Exception as exc:                      # never let one bad value stop the writer
                n = self.errors.inc("write_failed")
                if worth_logging(n):
                    log.exception("opcua: writing outputs failed (%d so far): %s", n, exc)

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
                except Exception as exc:
                    n = self.errors.inc("stats_failed")
                    if worth_logging(n):
                        log.exception("opcua: refreshing the stats nodes failed (%d so far): %s", n, exc)
            await asyncio.sleep(self.stats_s)

    # ------------------------------------------------------------------ client writes
    def _screen(self, wv: ua.WriteValue) -> ua.StatusCode | None:
        """The status code refusing a client's write, or None to let the library apply it."""
        node_id = wv.NodeId
        target = self._input_nodes.get(node_id)
        if target is None:
            if node_id.NamespaceIndex == self._ns and self._ns:
                return self._refuse("not_writable", ua.StatusCodes.BadNotWritable)
            return None
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
            self._values[stream][sig.name] = (value, time.monotonic_ns())
        return self._refuse("out_of_range", ua.StatusCodes.BadOutOfRange)

    def _accepted(self, wv: ua.WriteValue, t0: int) -> None:
        stream, sig = self._input_nodes[wv.NodeId]
        now = time.monotonic_ns()
        with self.lock:
            self._values[stream][sig.name] = (float(wv.Value.Value.Value), now)
            self._n["writes"] += 1
        self.io.add(time.monotonic_ns() - t0)

    def _refuse(self, reason: str, code: int) -> ua.StatusCode:
        n = self.bad.inc(reason)
        if worth_logging(n):
            log.warning("opcua: write refused: %s (%d so far)", reason, n)
        return ua.StatusCode(code)


class _ScreenedAttributes(AttributeService):
    """asyncua's attribute service with the bridge's screening in front of every write."""

    def __init__(self, aspace, bridge: OpcUaBridge):
        super().__init__(aspace)
        self._bridge = bridge

    async def write(self, params: ua.WriteParameters, user: User = User(role=UserRole.Admin)) -> list[ua.StatusCode]:
        results = []
        for wv in params.NodesToWrite:
            t0 = time.monotonic_ns()
            code = self._bridge._screen(wv)
            if code is None:
                [code] = await super().write(ua.WriteParameters(NodesToWrite=[wv]), user)
                if code.is_good() and wv.NodeId in self._bridge._input_nodes:
                    self._bridge._accepted(wv, t0)
            results.append(code)
        return results


class _UserManager:
    """Sessions: the secure channel's client certificate must be trusted (secured endpoints),
    and with a users file the user name and password must match."""

    def __init__(self, bridge: OpcUaBridge):
        self._bridge = bridge
        # Checked against unknown names too, so that a refusal takes as long either way.
        self._dummy = hash_password(secrets.token_hex(8))

    def get_user(self, iserver, username: str | None = None, password: str | None = None,
                 certificate=None) -> User | None:
        bridge = self._bridge
        if certificate is not None and bridge._trust is not None:
            if isinstance(certificate, bytes):
                certificate = x509.load_der_x509_certificate(certificate)
            if not bridge._trust.validate(certificate):
                bridge.bad.inc("untrusted_certificate")
                raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)
        if bridge.users is None:
            return User(role=UserRole.User, name=None)
        stored = bridge.users.get(username or "")
        ok = verify_password(stored or self._dummy, password or "")
        if stored is None or not ok:
            n = bridge.bad.inc("unknown_user" if stored is None else "bad_password")
            if worth_logging(n):
                log.warning("opcua: login refused for user %r (%s)", username,
                            "unknown user" if stored is None else "wrong password")
            return None
        return User(role=UserRole.User, name=username)


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
    bridge.image = InputImage([s.name for s in wiring.inputs], len(bridge.streams))
    return bridge


register("opcua", _from_deploy)
