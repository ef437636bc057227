"""Modbus/TCP Security (the Modbus Organization's TLS profile of Modbus TCP): settings, TLS
contexts, the role in a client certificate, and the certificates behind ``r1edge modbus-cert``;
and, TLS or not, the server's ``allow`` list of the peers that may connect at all.

Both ends authenticate with X.509 certificates signed by a CA both trust (mutual TLS, TLS 1.2
at least, port 802 by default). A client certificate may carry a role in the extension
:data:`ROLE_OID` (1.3.6.1.4.1.50316.802.1) as an ASN.1 UTF8String, as the specification
defines; the server's ``write_roles`` says which roles may write, every other client may only
read (its writes get exception 01).
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .bridge import new_file_paths, refuse_unknown_keys

ROLE_OID = "1.3.6.1.4.1.50316.802.1"
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_TLS_KEYS = frozenset(("cert", "key", "ca", "write_roles"))


@dataclass(frozen=True)
class TlsSettings:
    """``[modbus.tls]``: ``cert`` and ``key`` (this end's certificate chain and private key, PEM),
    ``ca`` (PEM file of the CA(s) the peer's certificate must chain to), ``write_roles``
    (server mode: the roles whose clients may write; required there, unused in client mode)."""

    cert: Path
    key: Path
    ca: Path
    write_roles: frozenset

    @classmethod
    def from_config(cls, raw, mode: str) -> "TlsSettings":
        """Validate the table and load the files once (``ValueError`` naming the key)."""
        if not isinstance(raw, dict):
            raise ValueError("modbus.tls: must be a table with cert, key, ca (and write_roles in server mode)")
        refuse_unknown_keys(raw, _TLS_KEYS, "modbus.tls")
        paths = {}
        for key in ("cert", "key", "ca"):
            value = raw.get(key)
            if not isinstance(value, str) or not value:
                raise ValueError(f"modbus.tls.{key}: missing or not a file path")
            if not Path(value).is_file():
                raise ValueError(f"modbus.tls.{key}: {value}: no such file")
            paths[key] = Path(value)
        roles = raw.get("write_roles")
        if roles is None and mode == "server":
            raise ValueError('modbus.tls.write_roles: missing; list the certificate roles that may write, '
                             'e.g. write_roles = ["operator"] (an empty list: every client only reads)')
        roles = [] if roles is None else roles
        if not isinstance(roles, list) or not all(isinstance(r, str) and r for r in roles):
            raise ValueError(f"modbus.tls.write_roles: {roles!r} is not a list of role names")
        settings = cls(paths["cert"], paths["key"], paths["ca"], frozenset(roles))
        try:
            settings.server_context() if mode == "server" else settings.client_context()
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(f"modbus.tls: cannot load {settings.cert}, {settings.key} or {settings.ca}: {exc}") from None
        return settings

    def _context(self, purpose: int) -> ssl.SSLContext:
        ctx = ssl.SSLContext(purpose)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_cert_chain(self.cert, self.key)
        ctx.load_verify_locations(cafile=str(self.ca))
        return ctx

    def server_context(self) -> ssl.SSLContext:
        """Server side: a client certificate signed by ``ca`` is required."""
        return self._context(ssl.PROTOCOL_TLS_SERVER)

    def client_context(self) -> ssl.SSLContext:
        """Client side: the PLC's certificate must be signed by ``ca`` and name the host we dial."""
        return self._context(ssl.PROTOCOL_TLS_CLIENT)


def _der_utf8(text: str) -> bytes:
    data = text.encode()
    n = len(data)
    length = bytes((n,)) if n < 0x80 else bytes((0x80 | ((n.bit_length() + 7) // 8),)) + n.to_bytes((n.bit_length() + 7) // 8, "big")
    return b"\x0c" + length + data


def role_of(der: bytes | None) -> str | None:
    """The role in a DER certificate's :data:`ROLE_OID` extension; None when there is no
    certificate, no such extension, or its value is not a well-formed UTF8String."""
    if not der:
        return None
    from cryptography import x509

    try:
        cert = x509.load_der_x509_certificate(der)
        value = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(ROLE_OID)).value.value
    except (ValueError, x509.ExtensionNotFound, AttributeError):
        return None
    if len(value) < 2 or value[0] != 0x0C:
        return None
    n, at = value[1], 2
    if n & 0x80:
        width = n & 0x7F
        n, at = int.from_bytes(value[2:2 + width], "big"), 2 + width
    if at + n != len(value):
        return None
    try:
        return value[at:].decode()
    except UnicodeDecodeError:
        return None


def peer_role(ssl_object) -> str | None:
    """The role of the peer of a TLS connection (``transport.get_extra_info("ssl_object")``)."""
    return None if ssl_object is None else role_of(ssl_object.getpeercert(binary_form=True))


def make_certificates(out_dir: str | os.PathLike, *, server_hosts: Sequence[str] = (),
                      clients: Sequence[tuple[str, str]] = (), days: int = 365) -> list[Path]:
    """Write Modbus/TCP Security certificates (PEM) into ``out_dir``; returns the files written.

    ``ca.pem``/``ca.key`` are made on first use and reused after; ``server.pem``/``server.key``
    when ``server_hosts`` are given (DNS names or IP addresses, in its subject alternative
    names); ``NAME.pem``/``NAME.key`` for each ``(NAME, ROLE)`` in ``clients``, with the role in
    the :data:`ROLE_OID` extension. Keys are RSA 2048 (the profile's mandatory cipher suites
    use RSA), written owner-only; an existing certificate is never overwritten."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    names = [n for n, _ in clients] + (["server"] if server_hosts else [])
    for name in names:
        new_file_paths(out, name, (".pem",), "certificate", reserved=("ca",))
    now = datetime.datetime.now(datetime.timezone.utc)

    def save_key(path: Path, key) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        written.append(path)

    ca_cert_file, ca_key_file = out / "ca.pem", out / "ca.key"
    if ca_cert_file.exists():
        ca_cert = x509.load_pem_x509_certificate(ca_cert_file.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_file.read_bytes(), None)
    else:
        ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "r1edge Modbus CA")])
        ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
                   .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                  critical=True)
                   .sign(ca_key, hashes.SHA256()))
        save_key(ca_key_file, ca_key)
        ca_cert_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        written.append(ca_cert_file)

    def issue(name: str, usage, extensions) -> None:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(ca_cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        for ext in extensions:
            builder = builder.add_extension(ext, critical=False)
        save_key(out / f"{name}.key", key)
        path = out / f"{name}.pem"
        path.write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        written.append(path)

    if server_hosts:
        alt = []
        for host in server_hosts:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                alt.append(x509.DNSName(host))
        issue("server", ExtendedKeyUsageOID.SERVER_AUTH, [x509.SubjectAlternativeName(alt)])
    for name, role in clients:
        role_ext = x509.UnrecognizedExtension(x509.ObjectIdentifier(ROLE_OID), _der_utf8(role))
        issue(name, ExtendedKeyUsageOID.CLIENT_AUTH, [role_ext])
    return written


def parse_allow(raw) -> list[Network]:
    """``[modbus] allow``: a list of addresses or networks (``ValueError`` naming the item)."""
    if isinstance(raw, str) or not isinstance(raw, (list, tuple)):
        raise ValueError("modbus.allow: must be a list of addresses or networks, e.g. [\"10.0.0.5\", \"10.0.1.0/24\"]")
    nets = []
    for i, item in enumerate(raw):
        if not isinstance(item, str):
            raise ValueError(f"modbus.allow[{i}]: {item!r} is not an address or network (a string such as "
                             "\"10.0.0.5\" or \"10.0.1.0/24\")")
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"modbus.allow[{i}]: {item!r} is not an address or network: {exc}") from None
    return nets


def peer_allowed(allow: list[Network] | None, host: str | None) -> bool:
    """Whether a peer at ``host`` may connect (``allow`` None: everyone; an IPv4-mapped IPv6
    address counts as its IPv4 address)."""
    if allow is None:
        return True
    try:
        addr = ipaddress.ip_address(host.split("%")[0]) if host else None
    except ValueError:
        return False
    if addr is None:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in allow)
