"""Who may talk to the OPC UA bridge: the users file (salted scrypt passwords, roles, client
certificates mapped to roles), application certificates, and the watch that lets the bridge
pick up a changed trust list or users file without a restart.

The users file (``[opcua] users``, written by ``r1edge opcua-user``)::

    [users.alice]
    password = "scrypt$16384$8$1$<salt>$<key>"
    role = "operator"                      # or "viewer"

    [certificates.plc]                     # an anonymous session over a secured channel whose
    sha256 = "3f1c...e9"                   # client certificate has this SHA-256 thumbprint
    role = "viewer"                        # (of the DER bytes) gets this role

Roles: ``viewer`` may browse, read and subscribe; ``operator`` may also write the inputs (the
mode input among them). Any other role is refused when the file is read. A user without a
``role`` (files written before roles existed) is an operator, and the bridge warns at start.

Sessions (:class:`Admission`, asyncua's user manager and certificate validator): on a secured
channel the client's application certificate must be in ``trusted_clients`` (checked at
CreateSession and again, at ActivateSession, on the certificate the channel was opened with).
Without a users file every such session is an operator. With one, a session logs in with a
user name and password (refused over a channel without security, where the session could be
taken over) or anonymously with a client certificate listed under ``[certificates]``; X.509
user tokens are refused. A secure channel asking for a policy or mode the endpoint does not offer is answered with
BadSecurityPolicyRejected at once (:class:`GuardedServer`). Every refusal is counted by reason.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from asyncua import Server, ua
from asyncua.common.utils import ServiceError
from asyncua.crypto import cert_gen, uacrypto
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from asyncua.server.binary_server_asyncio import BinaryServer, OPCUAProtocol
from asyncua.server.internal_server import InternalServer
from asyncua.ua.ua_binary import uatcp_to_binary
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from .bridge import new_file_paths
from .metrics import CollapsingLog, Counters

try:
    import tomllib
except ModuleNotFoundError:                               # Python 3.10
    import tomli as tomllib

log = logging.getLogger("plc_bridge.opcua")

#: The roles a users file may give, least privilege first.
ROLES = ("viewer", "operator")
#: The role of a user whose entry names none (users files from before roles existed).
DEFAULT_ROLE = "operator"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@\-]{0,63}$")
#: scrypt cost of new password hashes: 16 MiB and about 50 ms per check.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1


# ---------------------------------------------------------------------------- passwords

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


# ---------------------------------------------------------------------------- the users file

@dataclass
class Users:
    """A users file as read by :func:`read_users`."""

    passwords: dict[str, str] = field(default_factory=dict)        # user name -> scrypt hash
    roles: dict[str, str] = field(default_factory=dict)            # user name -> role
    certificates: dict[str, tuple[str, str]] = field(default_factory=dict)   # sha256 hex -> (name, role)
    unroled: list[str] = field(default_factory=list)               # users given DEFAULT_ROLE

    def certificate_role(self, der: bytes) -> tuple[str, str] | None:
        """``(name, role)`` of the certificate entry matching ``der``'s thumbprint, or None."""
        return self.certificates.get(hashlib.sha256(der).hexdigest())


def thumbprint(cert_file: str | os.PathLike) -> str:
    """The SHA-256 thumbprint (lowercase hex) of a certificate file's DER bytes (DER or PEM file)."""
    data = Path(cert_file).read_bytes()
    try:
        cert = (x509.load_pem_x509_certificate(data) if data.lstrip().startswith(b"-----")
                else x509.load_der_x509_certificate(data))
    except ValueError as exc:
        raise ValueError(f"{cert_file}: not a certificate ({exc})") from None
    return hashlib.sha256(uacrypto.der_from_x509(cert)).hexdigest()


def read_users(path: str | os.PathLike) -> Users:
    """The users, their password hashes and roles, and the certificate-to-role map of a users
    file (see the module docstring). Raises ``ValueError`` naming the file and the entry at fault,
    ``FileNotFoundError`` when there is no such file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such users file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: invalid TOML: {exc}") from None
    unknown = sorted(set(raw) - {"users", "certificates"})
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; expected [users.NAME] and "
                         "[certificates.NAME] tables")
    out = Users()
    for table, keys in (("users", {"password", "role"}), ("certificates", {"sha256", "role"})):
        entries = raw.get(table, {})
        if not isinstance(entries, dict):
            raise ValueError(f"{path}: {table} must be a table of [{table}.NAME] entries")
        for name, entry in entries.items():
            where = f"{path}: {table}.{name}"
            if not _NAME_RE.match(name):
                raise ValueError(f"{where}: not a name (letters, digits, '_', '.', '@', '-'; at most 64)")
            if not isinstance(entry, dict) or not set(entry) <= keys or not (keys - {"role"}) <= set(entry):
                raise ValueError(f"{where}: must hold {' and '.join(sorted(keys - {'role'}))} and a role "
                                 f"(one of {', '.join(ROLES)})")
            role = entry.get("role")
            if role is None and table == "certificates":
                raise ValueError(f"{where}.role: required (one of {', '.join(ROLES)})")
            if role is not None and role not in ROLES:
                raise ValueError(f"{where}.role: {role!r} is not a role (one of {', '.join(ROLES)})")
            if table == "users":
                try:
                    _parse_hash(entry["password"])
                except ValueError as exc:
                    raise ValueError(f"{where}.password: {exc}") from None
                out.passwords[name] = entry["password"]
                out.roles[name] = role or DEFAULT_ROLE
                if role is None:
                    out.unroled.append(name)
            else:
                digest = entry["sha256"]
                digest = digest.replace(":", "").lower() if isinstance(digest, str) else ""
                if not re.fullmatch(r"[0-9a-f]{64}", digest):
                    raise ValueError(f"{where}.sha256: {entry['sha256']!r} is not a SHA-256 thumbprint "
                                     "(64 hex digits, colons allowed)")
                if digest in out.certificates:
                    raise ValueError(f"{where}.sha256: the same certificate as "
                                     f"certificates.{out.certificates[digest][0]}")
                out.certificates[digest] = (name, role)
    return out


def set_user(path: str | os.PathLike, name: str, password: str | None, *, role: str | None = None) -> None:
    """Add or replace user ``name`` in a users file (created if absent), or remove it with
    ``password=None``. ``role`` defaults to the user's present role, else ``operator``. The file
    is rewritten whole (every entry with its role) and made readable by its owner only."""
    users = _load_for_edit(path, name, role)
    if password is None:
        if name not in users.passwords:
            raise ValueError(f"{path}: no user {name!r}")
        del users.passwords[name], users.roles[name]
    else:
        users.passwords[name] = hash_password(password)
        users.roles[name] = role or users.roles.get(name, DEFAULT_ROLE)
    _write_users(Path(path), users)


def set_certificate(path: str | os.PathLike, name: str, certificate: str | os.PathLike | None,
                    role: str | None = None) -> None:
    """Map a client certificate file's thumbprint to ``role`` under ``[certificates.NAME]`` of a
    users file (created if absent), or remove that entry with ``certificate=None``."""
    users = _load_for_edit(path, name, role)
    others = {d: nr for d, nr in users.certificates.items() if nr[0] != name}
    if certificate is None and len(others) == len(users.certificates):
        raise ValueError(f"{path}: no certificate entry {name!r}")
    if certificate is not None:
        if role is None:
            raise ValueError(f"a role is required for a certificate (one of {', '.join(ROLES)})")
        others[thumbprint(certificate)] = (name, role)
    users.certificates = others
    _write_users(Path(path), users)


def _load_for_edit(path, name: str, role: str | None) -> Users:
    if not _NAME_RE.match(name):
        raise ValueError(f"{name!r} is not a name (letters, digits, '_', '.', '@', '-'; at most 64)")
    if role is not None and role not in ROLES:
        raise ValueError(f"{role!r} is not a role (one of {', '.join(ROLES)})")
    return read_users(path) if Path(path).exists() else Users()


def _write_users(path: Path, users: Users) -> None:
    lines = ["# r1edge OPC UA users (scrypt$N$r$p$salt$key) and client certificates, with their roles\n"
             "# (viewer: browse and read; operator: also write inputs), written by `r1edge opcua-user`\n"]
    for user in sorted(users.passwords):
        lines.append(f'\n[users."{user}"]\npassword = "{users.passwords[user]}"\nrole = "{users.roles[user]}"\n')
    for digest, (name, role) in sorted(users.certificates.items(), key=lambda kv: kv[1][0]):
        lines.append(f'\n[certificates."{name}"]\nsha256 = "{digest}"\nrole = "{role}"\n')
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
    application URI put in the certificate (default ``urn:r1edge:NAME``): a client's must be
    the URI its program announces (asyncua's command-line tools:
    ``urn:example.org:FreeOpcUa:opcua-asyncio``), or the server refuses it with
    BadCertificateUriInvalid. ``hosts`` go into its subject alternative names as DNS names or
    IP addresses. A server certificate is for server and client authentication,
    ``client=True`` for client authentication only."""
    out = Path(out_dir)
    cert_file, key_file = new_file_paths(out, name, (".der", ".pem"), "certificate")
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


def check_trusted(folder: Path) -> int:
    """Every ``*.der``/``*.pem`` file in ``folder`` must be a certificate (the trust store reads
    them all): a private key left there would otherwise stop the server. Returns how many there
    are; raises ``ValueError`` naming the first file that is not one."""
    n = 0
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
        n += 1
    return n


def certificate_uri(cert: x509.Certificate) -> str | None:
    """The application URI in a certificate's subject alternative names, or None."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


class FileWatch:
    """Tells whether a file, or the files in a directory, changed since the last look (name,
    size and modification time of each), so that the bridge re-reads them without a restart."""

    def __init__(self, path: Path):
        self.path = path
        self._seen = self._state()

    def _state(self) -> tuple:
        try:
            if self.path.is_dir():
                return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns)
                                    for e in os.scandir(self.path) if e.is_file()))
            st = self.path.stat()
            return ((self.path.name, st.st_size, st.st_mtime_ns),)
        except OSError:                                   # gone, or being replaced: a change
            return ()

    def changed(self) -> bool:
        """True once for each change seen since the previous call (or since construction)."""
        state = self._state()
        if state == self._seen:
            return False
        self._seen = state
        return True


# ---------------------------------------------------------------------------- sessions

_CERT_REASONS = {ua.StatusCodes.BadCertificateUntrusted: "untrusted_certificate",
                 ua.StatusCodes.BadCertificateUriInvalid: "certificate_uri_invalid"}


@dataclass
class Login(User):
    """An activated session's user with its role (``viewer`` or ``operator``)."""

    access: str = DEFAULT_ROLE


class Admission:
    """Decides, counts and logs who may open a session (asyncua's user manager, with
    :meth:`validate` as its certificate validator), and re-reads the users file and the
    trusted-client directory when they change (:meth:`refresh`).

    ``bad`` counts refusals by reason (``untrusted_certificate``, ``certificate_uri_invalid``,
    ``identity_rejected``, ``unknown_user``, ``bad_password``, ``security_policy_rejected``,
    ``secure_channel_refused``); ``errors`` counts files that could not be re-read. Repeated
    lines collapse through ``say``."""

    def __init__(self, users_file: Path | None, trusted_clients: Path | None, bad: Counters, errors: Counters,
                 say: CollapsingLog | None = None):
        self.users_file, self.trusted_clients = users_file, trusted_clients
        self.users = read_users(users_file) if users_file is not None else None
        self.bad, self.errors = bad, errors
        self.say = say or CollapsingLog(log)
        self.reloads = Counters()
        self.trust: TrustStore | None = None
        self._validator: CertificateValidator | None = None
        self._watches = {key: FileWatch(path) for key, path in (("users", users_file),
                                                                  ("trusted_clients", trusted_clients)) if path}
        # Checked against unknown names too, so that a refusal takes as long either way.
        self._dummy = hash_password(secrets.token_hex(8))

    def refuse(self, reason: str, code: int, detail: str) -> ServiceError:
        """Count and log a refused session; the error to raise towards the client."""
        n = self.bad.inc(reason)
        self.say.warning(reason, "opcua: session refused: %s, %s (%s; %d so far)", reason, detail,
                         ua.StatusCode(code).name, n)
        return ServiceError(code)

    async def load(self) -> None:
        """Read the trusted client certificates (at each server start)."""
        if self.trusted_clients is not None:
            self.trust = TrustStore([self.trusted_clients], [])
            await self.trust.load()
            self._validator = CertificateValidator(CertificateValidatorOptions.TRUSTED_VALIDATION
                                                   | CertificateValidatorOptions.PEER_CLIENT, self.trust)

    async def refresh(self) -> None:
        """Re-read the users file or the trusted-client directory if either changed since the
        last look. A file that does not read keeps the previous one in force (logged, counted
        in ``errors`` as ``users_reload`` or ``trust_reload``)."""
        watch = self._watches.get("trusted_clients")
        if watch is not None and watch.changed():
            try:
                n = check_trusted(watch.path)
                if self.trust is not None:
                    await self.trust.load_trust()
            except (ValueError, OSError) as exc:
                self.errors.inc("trust_reload")
                log.error("opcua: %s changed but does not read, keeping the previous trust list: %s", watch.path, exc)
            else:
                self.reloads.inc("trusted_clients")
                log.info("opcua: trusted client certificates re-read from %s (%d)", watch.path, n)
        watch = self._watches.get("users")
        if watch is not None and watch.changed():
            try:
                self.users = read_users(watch.path)
            except (ValueError, OSError) as exc:
                self.errors.inc("users_reload")
                log.error("opcua: %s changed but does not read, keeping the previous users: %s", watch.path, exc)
            else:
                self.reloads.inc("users")
                log.info("opcua: users re-read from %s (%d users, %d certificates)", watch.path,
                         len(self.users.passwords), len(self.users.certificates))
                self.warn_unroled()

    def warn_unroled(self) -> None:
        """Warn about users whose entry names no role (they are operators)."""
        if self.users is not None and self.users.unroled:
            log.warning("opcua: %s: no role for %s, so they may write inputs (operator); give each a role "
                        "(viewer or operator) with `r1edge opcua-user --role`", self.users_file,
                        ", ".join(self.users.unroled))

    async def validate(self, cert: x509.Certificate, app: ua.ApplicationDescription) -> None:
        """The certificate check at CreateSession: trusted, and its application URI the one
        the client announces."""
        try:
            if self._validator is not None:
                await self._validator(cert, app)
        except ServiceError as exc:
            reason = _CERT_REASONS.get(exc.code, "certificate_refused")
            detail = cert.subject.rfc4514_string()
            if reason == "certificate_uri_invalid":
                detail += (f": its application URI {certificate_uri(cert)!r} is not the URI the client announces, "
                           f"{app.ApplicationUri!r}")
            raise self.refuse(reason, exc.code, detail) from None

    def get_user(self, iserver, username: str | None = None, password: str | None = None,
                 certificate: bytes | None = None) -> Login | None:
        """The user of a session being activated, or a refusal (see the module docstring).
        ``certificate`` is the secure channel's client certificate (empty without security)."""
        channel = certificate or b""
        if channel and self.trust is not None and not self.trust.validate(x509.load_der_x509_certificate(channel)):
            raise self.refuse("untrusted_certificate", ua.StatusCodes.BadCertificateUntrusted,
                              "the secure channel's certificate is not in trusted_clients")
        users = self.users
        if users is None:
            if username is not None:
                raise self.refuse("identity_rejected", ua.StatusCodes.BadIdentityTokenRejected,
                                  f"user name {username!r} given but the server has no users file")
            return Login(role=UserRole.User, name=None, access="operator")
        if username is None:
            entry = users.certificate_role(channel) if channel else None
            if entry is None:
                raise self.refuse("identity_rejected", ua.StatusCodes.BadIdentityTokenRejected,
                                  "anonymous session without a client certificate listed in the users file")
            return Login(role=UserRole.User, name=f"certificate {entry[0]}", access=entry[1])
        if not channel:
            raise self.refuse("identity_rejected", ua.StatusCodes.BadIdentityTokenRejected,
                              f"user {username!r} over a channel without security")
        stored = users.passwords.get(username)
        ok = verify_password(stored or self._dummy, password or "")
        if stored is None or not ok:
            n = self.bad.inc("unknown_user" if stored is None else "bad_password")
            self.say.warning("login", "opcua: login refused for user %r (%s; %d so far)", username,
                             "unknown user" if stored is None else "wrong password", n)
            return None                                   # asyncua answers BadUserAccessDenied
        return Login(role=UserRole.User, name=username, access=users.roles[username])


class GuardedServer(Server):
    """asyncua's Server, whose connections answer a secure channel they cannot open (a policy
    or mode the endpoint does not offer, a certificate that fails) with an Error message
    carrying the status code, counted by the admission, and close; the library would leave
    the client waiting for its idle timeout."""

    def __init__(self, admission: Admission):
        super().__init__(iserver=_GuardedInternalServer(user_manager=admission))
        self.admission = admission

    async def start(self) -> None:
        """asyncua 2.1's ``Server.start``, with the guarded connections. Every identity token
        then reaches :meth:`Admission.get_user`, which decides and counts (the endpoints still
        advertise only the tokens set with ``set_identity_tokens``)."""
        if self.iserver.certificate is not None:
            uacrypto.check_certificate(self.iserver.certificate, self._application_uri, socket.gethostname())
        await self._setup_server_nodes()
        await self.iserver.start()
        self.iserver.supported_tokens = (ua.AnonymousIdentityToken, ua.UserNameIdentityToken, ua.X509IdentityToken)
        try:
            host, port = self._get_bind_socket_info()
            self.bserver = _GuardedBinaryServer(self.admission, self.iserver, host, port, self.limits)
            self.bserver.set_policies(self._policies)
            await self.bserver.start()
        except Exception:
            await self.iserver.stop()
            raise


class _GuardedInternalServer(InternalServer):
    """X.509 user identity tokens are not accepted: refused and counted like any identity."""

    def verify_x509_token(self, isession, token, signature) -> bytes:
        raise self.user_manager.refuse("identity_rejected", ua.StatusCodes.BadIdentityTokenRejected,
                                       "X.509 user identity tokens are not accepted")


class _GuardedBinaryServer(BinaryServer):
    def __init__(self, admission: Admission, *args):
        super().__init__(*args)
        self._admission = admission

    def _make_protocol(self) -> OPCUAProtocol:
        return _GuardedProtocol(self._admission, iserver=self.iserver, policies=self._policies, clients=self.clients,
                                closing_tasks=self.closing_tasks, limits=self.limits)


class _GuardedProtocol(OPCUAProtocol):
    def __init__(self, admission: Admission, **kwargs):
        super().__init__(**kwargs)
        self._admission = admission

    async def _process_one_msg(self, header, buf) -> bool:
        try:
            return await super()._process_one_msg(header, buf)
        except Exception as exc:
            if header.MessageType != ua.MessageType.SecureOpen:
                raise
            code = getattr(exc, "code", None)
            if code is None:
                code = (ua.StatusCodes.BadSecurityPolicyRejected if "No matching policy" in str(exc)
                        else ua.StatusCodes.BadSecurityChecksFailed)
            reason = ("security_policy_rejected" if code == ua.StatusCodes.BadSecurityPolicyRejected
                      else "secure_channel_refused")
            self._admission.refuse(reason, code, f"secure channel from {self.peer_name}: {exc}")
            if self.transport is not None:
                error = ua.ErrorMessage(ua.StatusCode(code), f"{ua.StatusCode(code).name}: {exc}")
                self.transport.write(uatcp_to_binary(ua.MessageType.Error, error))
                self.transport.close()
            return False
