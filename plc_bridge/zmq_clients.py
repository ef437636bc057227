"""The other side of the ZeroMQ bridge (:mod:`plc_bridge.zmq_bridge`): CURVE keys, and the
clients plants and tools use: :class:`SensorPublisher`, :class:`DecisionSubscriber`,
:class:`ControlClient`. :func:`make_keys` is behind ``r1edge keys``."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import NamedTuple

import msgpack
import zmq
import zmq.auth

from . import messages
from .bridge import new_file_paths
from .messages import MessageError
from .metrics import Counters

log = logging.getLogger(__name__)

_CURVE_KEYS = frozenset(("secret_key", "allowed"))
#: The ZAP domain the bridge's sockets authenticate in.
ZAP_DOMAIN = "r1edge"


class CurveServer(NamedTuple):
    """The bridge's CURVE identity and who may connect (``allowed`` None: any client key)."""

    public: bytes
    secret: bytes
    allowed: Path | None


class CurveClient(NamedTuple):
    """A client's CURVE keys and the server public key it expects."""

    server_public: bytes
    public: bytes
    secret: bytes


def make_keys(out_dir: str | os.PathLike, name: str = "server") -> tuple[Path, Path]:
    """Write a CURVE key pair ``NAME.key`` (public) and ``NAME.key_secret`` into ``out_dir``.

    Refuses to overwrite an existing pair. The secret file is made readable by its owner only.
    Returns (public file, secret file).
    """
    out = Path(out_dir)
    new_file_paths(out, name, (".key", ".key_secret"), "key")
    out.mkdir(parents=True, exist_ok=True)
    pub_file, sec_file = zmq.auth.create_certificates(out, name)
    os.chmod(sec_file, 0o600)
    return Path(pub_file), Path(sec_file)


def load_client_curve(server_public_file: str | os.PathLike, client_secret_file: str | os.PathLike) -> CurveClient:
    """Keys for a client: the server's public key file and the client's ``.key_secret`` file."""
    server_public, _ = zmq.auth.load_certificate(server_public_file)
    public, secret = zmq.auth.load_certificate(client_secret_file)
    if secret is None:
        raise ValueError(f"{client_secret_file}: no secret key in this file")
    return CurveClient(server_public, public, secret)


def _client_socket(ctx: zmq.Context, kind: int, curve: CurveClient | None) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.linger = 0
    if curve is not None:
        sock.curve_serverkey = curve.server_public
        sock.curve_publickey = curve.public
        sock.curve_secretkey = curve.secret
    return sock


def curve_from_config(raw, base_dir: Path) -> CurveServer:
    """``[zmq] curve`` -> the bridge's keys and allowed-clients directory (``ValueError``/
    ``FileNotFoundError`` naming the key)."""
    if not isinstance(raw, dict):
        raise ValueError("zmq.curve: must be a table { secret_key = ..., allowed = ... }")
    unknown = sorted(set(raw) - _CURVE_KEYS)
    if unknown:
        raise ValueError(f"zmq.curve: unknown key(s) {', '.join(unknown)}; allowed: secret_key, allowed")
    if not isinstance(raw.get("secret_key"), str):
        raise ValueError("zmq.curve.secret_key: missing; the server's .key_secret file (r1edge keys)")
    secret_path = base_dir / raw["secret_key"]
    if not secret_path.is_file():
        raise FileNotFoundError(f"zmq.curve.secret_key: {secret_path} does not exist")
    try:
        public, secret = zmq.auth.load_certificate(secret_path)
    except (ValueError, OSError) as exc:
        raise ValueError(f"zmq.curve.secret_key: {secret_path}: {exc}") from None
    if secret is None:
        raise ValueError(f"zmq.curve.secret_key: {secret_path} holds no secret key (use the .key_secret file)")
    allowed = None
    if "allowed" in raw:
        if not isinstance(raw["allowed"], str):
            raise ValueError("zmq.curve.allowed: must be a directory of client public key files")
        allowed = base_dir / raw["allowed"]
        if not allowed.is_dir():
            raise FileNotFoundError(f"zmq.curve.allowed: {allowed} is not a directory")
        if not any(allowed.glob("*.key")):
            log.warning("zmq.curve.allowed: %s holds no *.key file; no client will be accepted", allowed)
    return CurveServer(public, secret, allowed)


class SensorPublisher:
    """Sends sensor frames to a bridge's ``sensors`` endpoint.

    It connects an XPUB socket and :meth:`wait_ready` blocks until the bridge's subscription
    has arrived, after which nothing sent is lost to the slow-joiner window.
    """

    def __init__(self, endpoint: str, *, curve: CurveClient | None = None, context: zmq.Context | None = None,
                 hwm: int = 1000):
        self._own_ctx = context is None
        self._ctx = context or zmq.Context()
        self._sock = _client_socket(self._ctx, zmq.XPUB, curve)
        self._sock.sndhwm = hwm
        self._sock.connect(endpoint)
        self._ready = False

    def wait_ready(self, timeout_s: float = 5.0) -> bool:
        """Wait for the bridge's subscription; True once it has arrived."""
        if self._ready:
            return True
        if self._sock.poll(int(timeout_s * 1000), zmq.POLLIN):
            self._sock.recv()
            self._ready = True
        return self._ready

    def send(self, stream: str, seq: int, values: dict[str, float], t_ns: int | None = None) -> None:
        """Send one frame (``t_ns`` defaults to ``time.time_ns()``); never blocks."""
        self.send_bytes(messages.encode_sensor(stream, seq, time.time_ns() if t_ns is None else t_ns, values))

    def send_bytes(self, data: bytes) -> None:
        """Send an already packed message as one frame (tools and tests); never blocks."""
        try:
            self._sock.send(data, zmq.NOBLOCK)
        except zmq.Again:
            pass  # XPUB drops above the high-water mark rather than block

    def close(self) -> None:
        """Close the socket (and the context if this object created it)."""
        self._sock.close(linger=0)
        if self._own_ctx:
            self._ctx.term()

    def __enter__(self) -> "SensorPublisher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DecisionSubscriber:
    """Receives decisions from a bridge's ``decisions`` endpoint, validated."""

    def __init__(self, endpoint: str, *, curve: CurveClient | None = None, context: zmq.Context | None = None):
        self._own_ctx = context is None
        self._ctx = context or zmq.Context()
        self._sock = _client_socket(self._ctx, zmq.SUB, curve)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.connect(endpoint)
        self.bad = Counters()

    def recv(self, timeout_ms: int = 1000) -> dict | None:
        """The next valid decision, or None after ``timeout_ms`` (invalid ones are counted)."""
        deadline = time.monotonic() + timeout_ms / 1e3
        while True:
            left = int((deadline - time.monotonic()) * 1000)
            if left < 0 or not self._sock.poll(max(left, 0), zmq.POLLIN):
                return None
            try:
                return messages.decode_decision(self._sock.recv())
            except MessageError as exc:
                self.bad.inc(exc.reason)

    def close(self) -> None:
        """Close the socket (and the context if this object created it)."""
        self._sock.close(linger=0)
        if self._own_ctx:
            self._ctx.term()

    def __enter__(self) -> "DecisionSubscriber":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ControlClient:
    """Asks a bridge's ``control`` endpoint for status, stats or health, or switches a stream's
    mode (DEALER socket)."""

    def __init__(self, endpoint: str, *, curve: CurveClient | None = None, context: zmq.Context | None = None):
        self._own_ctx = context is None
        self._ctx = context or zmq.Context()
        self._sock = _client_socket(self._ctx, zmq.DEALER, curve)
        self._sock.connect(endpoint)

    def request(self, cmd: str, timeout_ms: int = 2000, **args) -> dict:
        """Send ``{"v":1,"cmd":cmd, **args}`` and return the reply map; ``TimeoutError`` if none
        comes. ``request("mode", stream="main", mode="manual")`` switches a stream."""
        while self._sock.poll(0, zmq.POLLIN):  # a late reply to an earlier, timed-out request
            self._sock.recv()
        self._sock.send(messages.encode_control(cmd, **args))
        if not self._sock.poll(timeout_ms, zmq.POLLIN):
            raise TimeoutError(f"no reply to {cmd!r} within {timeout_ms} ms")
        return msgpack.unpackb(self._sock.recv(), raw=False, strict_map_key=False)

    def close(self) -> None:
        """Close the socket (and the context if this object created it)."""
        self._sock.close(linger=0)
        if self._own_ctx:
            self._ctx.term()

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
